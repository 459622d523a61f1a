"""The resolved configuration of a pretraining run, and its checks (run before any heavy work)."""

import math
from dataclasses import asdict, dataclass, field

import timm

from mpp.data.augment import DECODE_MODES
from mpp.errors import UsageError
from mpp.models.targets import TARGETS
from mpp.training.trackers import check_trackers

# Reference batch of the paper's learning rate (Appendix B.1.2: Adam, 2e-4 at batch 4096).
PAPER_BASE_LR, PAPER_REF_BATCH = 2e-4, 4096


@dataclass
class PretrainConfig:
    # data
    dataset: str = "mnist5k"
    dataset_config: str | None = None
    split: str = "train"
    image_column: str | None = None
    streaming: bool = False
    workers: int | None = None  # None: 0 on CPU machines with <= 4 cores, else the process's cores but one
    decode: str = "cpu"  # cpu | pil | gpu: see augment.py
    crop_scale: tuple[float, float] = (0.35, 1.0)
    hflip: float = 0.5
    strict_data: bool = False
    # model
    model: str = "vit_tiny_patch16_224"
    img_size: int = 28
    patch_size: int = 7
    grad_checkpointing: bool = False
    # objective
    target: str = "mean3bit"
    mask_ratio: float = 0.5
    mask_probs: tuple[float, float, float] = (0.8, 0.1, 0.1)
    random_from: str = "batch"
    corrupt_at: str = "auto"  # embedding | pixels | auto: embedding for plain patch embeddings, pixels for hybrids
    # optimisation
    batch_size: int = 128
    grad_accum: int = 1
    max_steps: int | None = None
    epochs: float = 8.0
    lr: float | None = None
    base_lr: float | None = None
    ref_batch: int = PAPER_REF_BATCH
    warmup_steps: int = 30
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 1.0
    # run
    output_dir: str | None = None
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    resume: str | None = None
    seed: int = 0
    log_every: int = 10
    log_images_every: int = 0  # steps between prediction pictures in TensorBoard (0: never)
    eval_dataset: str | None = None  # labelled set with train/test splits for frozen-feature monitoring
    eval_every_steps: int = 100
    progress: bool = True
    threads: int | None = None  # CPU threads per process; None: the machine's cores / processes on it
    compile: bool = False
    report_to: str = "tensorboard"  # accelerate trackers: tensorboard, wandb, mlflow, all, none
    push_to_hub: str | None = None  # Hub repo id the finished run folder is uploaded to
    hub_private: bool = False
    max_nonfinite_steps: int = 5  # 0: no finiteness check (and no host-device sync per step)
    # filled in by resolve()
    derived: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_LR = 3e-4  # best of 1e-4, 3e-4, 1e-3, 3e-3 on mnist5k with these defaults (README, "Defaults")


def validate(cfg: PretrainConfig) -> None:
    """Checks that need no data, model or process group. Raises UsageError naming the flag."""
    if cfg.img_size <= 0 or cfg.patch_size <= 0:
        raise UsageError(f"--img-size and --patch-size must be positive, got {cfg.img_size} and {cfg.patch_size}")
    if cfg.img_size % cfg.patch_size:
        raise UsageError(f"--img-size {cfg.img_size} is not divisible by --patch-size {cfg.patch_size}")
    if (cfg.img_size // cfg.patch_size) ** 2 < 2:
        raise UsageError(
            f"--img-size {cfg.img_size} / --patch-size {cfg.patch_size} gives one patch; MPP needs at least 2"
        )
    if not 0 < cfg.mask_ratio < 1:
        raise UsageError(f"--mask-ratio must be in (0, 1), got {cfg.mask_ratio}")
    if len(cfg.mask_probs) != 3 or any(p < 0 or not math.isfinite(p) for p in cfg.mask_probs):
        raise UsageError(
            f"--mask-probs needs three non-negative numbers (mask, random, unchanged), got {cfg.mask_probs}"
        )
    if abs(sum(cfg.mask_probs) - 1) > 1e-6:
        raise UsageError(
            f"--mask-probs must sum to 1, got {' '.join(map(str, cfg.mask_probs))} (sum {sum(cfg.mask_probs):g})"
        )
    if not timm.is_model(cfg.model):
        raise UsageError(
            f"--model {cfg.model!r} is not a timm model; supported: timm VisionTransformer, DeiT distilled, hybrid "
            "ViTs "
            "and Eva, e.g. vit_tiny_patch16_224"
        )
    if cfg.target not in TARGETS:
        raise UsageError(f"--target {cfg.target!r} is not one of: {', '.join(TARGETS)}")
    if cfg.random_from not in ("batch", "image"):
        raise UsageError(f"--random-from must be 'batch' or 'image', got {cfg.random_from!r}")
    if cfg.corrupt_at not in ("auto", "embedding", "pixels"):
        raise UsageError(f"--corrupt-at must be auto, embedding or pixels, got {cfg.corrupt_at!r}")
    validate_run(cfg)
    if cfg.ref_batch < 1:
        raise UsageError(f"--ref-batch must be at least 1, got {cfg.ref_batch}")
    if cfg.log_images_every < 0:
        raise UsageError(f"--log-images-every must be 0 (off) or a number of steps, got {cfg.log_images_every}")
    if cfg.eval_every_steps < 1:
        raise UsageError(f"--eval-every-steps must be at least 1, got {cfg.eval_every_steps}")
    if cfg.decode not in DECODE_MODES:
        raise UsageError(f"--decode must be one of {', '.join(DECODE_MODES)}, got {cfg.decode!r}")
    if cfg.decode == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise UsageError(
                "--decode gpu needs a CUDA GPU (nvJPEG) and this machine has none; use --decode cpu (the default) or "
                "pil"
            )
    from mpp.data.builtin import BUILTIN_SPLITS, check_split

    check_split(cfg.dataset, cfg.split, "--split")
    if not {"train", "test"} <= set(BUILTIN_SPLITS.get(cfg.eval_dataset, ("train", "test"))):
        raise UsageError(
            f"--eval-dataset needs a labelled set with train and test splits: {cfg.eval_dataset} has the splits "
            f"{', '.join(BUILTIN_SPLITS[cfg.eval_dataset])}"
        )
    if cfg.streaming and cfg.max_steps is None:
        raise UsageError("--streaming needs --max-steps (a stream has no known length)")
    if cfg.lr is not None and cfg.base_lr is not None:
        raise UsageError("give --lr (the rate at the global batch) or --base-lr (scaled from --ref-batch), not both")
    for flag, value in [("--lr", cfg.lr), ("--base-lr", cfg.base_lr)]:
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise UsageError(f"{flag} must be a positive number, got {value}")
    if cfg.warmup_steps < 0 or cfg.weight_decay < 0 or cfg.min_lr < 0 or cfg.clip_grad < 0:
        raise UsageError("--warmup-steps, --weight-decay, --min-lr and --clip-grad must not be negative")
    if not all(0 <= b < 1 for b in cfg.betas):
        raise UsageError(f"--betas must be two numbers in [0, 1), got {cfg.betas}")


def validate_run(cfg) -> None:
    """Checks of the flags both recipes have (cli.add_run_flags)."""
    for flag, value in [
        ("--batch-size", cfg.batch_size),
        ("--grad-accum", cfg.grad_accum),
        ("--log-every", cfg.log_every),
        ("--checkpoint-every", cfg.checkpoint_every),
        ("--keep-checkpoints", cfg.keep_checkpoints),
    ]:
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise UsageError(f"--max-steps must be at least 1, got {cfg.max_steps}")
    if not cfg.epochs > 0:
        raise UsageError(f"--epochs must be positive, got {cfg.epochs}")
    if (cfg.workers or 0) < 0 or (cfg.threads or 0) < 0 or cfg.max_nonfinite_steps < 0:
        raise UsageError("--workers, --threads and --max-nonfinite-steps must not be negative")
    check_trackers(cfg.report_to)
    if cfg.push_to_hub:
        from mpp.models.publish import check_can_push

        # network, token, write access, a private repo: before any heavy work, not after hours of training
        check_can_push(cfg.push_to_hub, private=cfg.hub_private)
    lo, hi = cfg.crop_scale
    if not 0 < lo <= hi <= 1:
        raise UsageError(f"--crop-scale needs 0 < min <= max <= 1, got {lo} {hi}")
    if not 0 <= cfg.hflip <= 1:
        raise UsageError(f"--hflip is a probability in [0, 1], got {cfg.hflip}")


def check_batch_fits(batch_size: int, processes: int, images: int, what: str, grad_accum: int = 1) -> None:
    """drop_last batches: the dataset must fill at least one batch, and one accumulation of
    --grad-accum batches, on every process."""
    if images < batch_size * processes:
        raise UsageError(
            f"--batch-size {batch_size} x {processes} processes is more than the {images} images of {what}"
        )
    batches = images // (batch_size * processes)  # per process and epoch, as the prepared loader deals them
    if batches < grad_accum:
        raise UsageError(
            f"--grad-accum {grad_accum} is more than the {batches} batches of {batch_size} per process in an epoch of "
            f"{what}; lower --grad-accum or --batch-size"
        )


def optimizer_steps(epochs: float, batches_per_epoch: int, grad_accum: int) -> int:
    """Optimiser steps in `epochs` epochs, counted the way accelerate takes them: one after every
    grad_accum micro-batches and one at each epoch's end (its short last accumulation)."""
    per_epoch = math.ceil(batches_per_epoch / grad_accum)
    return max(1, math.ceil(round(epochs * per_epoch, 9)))  # round: 0.1 * 30 is 3.0000000000000004


def resolve_lr(cfg: PretrainConfig, global_batch: int) -> float:
    """--lr is taken as is; --base-lr scales linearly: lr = base_lr * global_batch / ref_batch."""
    if cfg.base_lr is not None:
        return cfg.base_lr * global_batch / cfg.ref_batch
    return cfg.lr if cfg.lr is not None else DEFAULT_LR


def lr_at(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup to peak_lr over warmup_steps, then cosine decay to min_lr at total_steps."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
