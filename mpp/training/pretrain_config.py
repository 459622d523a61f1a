"""The resolved configuration of a pretraining run, and its checks (run before any heavy work)."""

import math
from dataclasses import asdict, dataclass, field

import timm

from mpp.data.augment import DECODE_MODES
from mpp.errors import UsageError
from mpp.flags import flag
from mpp.models.attention_kernel import SDPA_BACKENDS, check_sdpa_backend
from mpp.models.families import SUPPORTED
from mpp.models.targets import TARGETS
from mpp.training.fast_paths import FP8_LAYERS, FP8_RECIPES, check_fp8
from mpp.training.run_config import RunConfig, validate_run

# Reference batch of the paper's learning rate (Appendix B.1.2: Adam, 2e-4 at batch 4096).
PAPER_BASE_LR, PAPER_REF_BATCH = 2e-4, 4096


DEFAULT_LR = 3e-4  # best of 1e-4, 3e-4, 1e-3, 3e-3 on mnist5k with these defaults (docs/training.md, "Defaults")


@dataclass
class PretrainConfig(RunConfig):
    dataset: str = flag(
        "mnist5k",
        group="data",
        help="built-in (mnist5k, fashion-mnist[-upstream|-downstream], photos, clipart[-upstream|-downstream], "
        "colour-mix), a local folder (imagefolder or save_to_disk), parquet files, .tar webdataset shards, or a "
        "Hub id",
    )
    dataset_config: str | None = flag(None, group="data", help="the Hub dataset's configuration name")
    split: str = flag("train", group="data", help="dataset split to pretrain on")
    image_column: str | None = flag(None, group="data", help="image column (detected when there is only one)")
    streaming: bool = flag(
        False, group="data", help="stream the dataset (iterable, sharded per process); needs --max-steps"
    )
    decode: str = flag(
        "cpu",
        group="data",
        choices=DECODE_MODES,
        help="how JPEGs are decoded: cpu (at 1/2-1/8 scale in the DCT domain when the crop is at least twice the "
        "output, else libjpeg-turbo through torchvision and torch's resize), pil (Pillow, the whole image, as "
        "before), gpu (nvJPEG on the training device; needs CUDA). Other formats always take the pil path",
    )
    model: str = flag(
        "vit_tiny_patch16_224",
        group="model",
        help=f"a timm ViT of a supported family: {SUPPORTED}; ResNets, ConvNeXt, Swin and other non-ViTs are refused",
    )
    img_size: int = flag(28, group="model", help="input resolution")
    patch_size: int = flag(
        7,
        group="model",
        help="patch size (must divide --img-size); timm's argument, so for a hybrid it is the patch on the CNN "
        "feature map (usually 1) and each token stands for img-size / grid pixels",
    )
    grad_checkpointing: bool = flag(
        False, group="model", help="timm's activation checkpointing (less memory, ~30%% slower)"
    )
    fp8: str = flag(
        "none",
        group="model",
        choices=list(FP8_RECIPES),
        help="FP8 linear layers through torchao's float8 training, scaled per tensor or per row (a CUDA GPU with "
        "FP8 tensor cores; pip install 'vit-mpp[fp8]'); the weights and their export stay as they are",
    )
    fp8_layers: str = flag(
        "auto",
        group="model",
        choices=list(FP8_LAYERS),
        help="which Linear layers --fp8 converts: auto (torchao's rule: only GEMMs large enough to gain) or all "
        "(every one with dimensions that are multiples of 16)",
    )
    sdpa_backend: str = flag(
        "auto",
        group="model",
        choices=list(SDPA_BACKENDS),
        help="the kernel behind the training step's attention (torch's scaled_dot_product_attention, which timm's "
        "fused attention calls): auto is torch's choice",
    )
    target: str = flag("mean3bit", group="objective", choices=list(TARGETS), help="what each corrupted patch predicts")
    mask_ratio: float = flag(0.5, group="objective", help="share of patches corrupted per image")
    mask_probs: tuple[float, float, float] = flag(
        (0.8, 0.1, 0.1),
        group="objective",
        metavar=("MASK", "RANDOM", "KEEP"),
        help="of the corrupted: [mask] token / random other patch / unchanged",
    )
    random_from: str = flag(
        "batch", group="objective", choices=["batch", "image"], help="where random replacement patches come from"
    )
    corrupt_at: str = flag(
        "auto",
        group="objective",
        choices=["auto", "embedding", "pixels"],
        help="embedding: corrupt patch embeddings after the projection (the paper's, with a learnable [mask] "
        "embedding); pixels: corrupt the regions' pixels before the patch embedding (a learnable [mask] colour, "
        "starting at the normalisation mean); auto: embedding for plain patch embeddings, pixels for hybrids, whose "
        "CNN stem sees across region borders and would read a hidden region's colour from its neighbours",
    )
    lr: float | None = flag(
        None,
        group="optimisation",
        help=f"peak learning rate at the actual global batch (default {DEFAULT_LR:g} unless --base-lr)",
    )
    base_lr: float | None = flag(
        None, group="optimisation", help="instead of --lr: lr = base_lr x global_batch / ref_batch (paper: 2e-4)"
    )
    ref_batch: int = flag(
        PAPER_REF_BATCH, group="optimisation", help=f"reference batch of --base-lr (paper: {PAPER_REF_BATCH})"
    )
    warmup_steps: int = flag(30, group="optimisation", help="linear warmup steps, then cosine decay")
    min_lr: float = flag(0.0, group="optimisation", help="learning rate at the end of the cosine")
    weight_decay: float = flag(0.05, group="optimisation", help="AdamW weight decay (not on biases, norms, embeddings)")
    betas: tuple[float, float] = flag((0.9, 0.999), group="optimisation", help="AdamW betas")
    clip_grad: float = flag(1.0, group="optimisation", help="global gradient-norm clip (0: off)")
    log_images_every: int = flag(0, group="run", help="steps between MPP prediction pictures in TensorBoard (0: never)")
    eval_dataset: str | None = flag(
        None,
        group="run",
        help="labelled set (train and test splits, e.g. fashion-mnist) on which k-NN and 10-shot linear accuracy of "
        "the frozen encoder are logged every --eval-every-steps",
    )
    eval_every_steps: int = flag(100, group="run", help="steps between frozen-feature evaluations")
    # filled in by resolve()
    derived: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


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
    check_fp8(cfg.fp8, cfg.fp8_layers)
    check_sdpa_backend(cfg.sdpa_backend)
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
    for flag_name, value in [("--lr", cfg.lr), ("--base-lr", cfg.base_lr)]:
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise UsageError(f"{flag_name} must be a positive number, got {value}")
    if cfg.warmup_steps < 0 or cfg.weight_decay < 0 or cfg.min_lr < 0 or cfg.clip_grad < 0:
        raise UsageError("--warmup-steps, --weight-decay, --min-lr and --clip-grad must not be negative")
    if not all(0 <= b < 1 for b in cfg.betas):
        raise UsageError(f"--betas must be two numbers in [0, 1), got {cfg.betas}")


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
