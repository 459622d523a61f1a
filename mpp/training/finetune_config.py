"""Configuration of a fine-tuning run: the `paper` and `modern` presets, every knob overridable."""

import math
from dataclasses import asdict, dataclass, field

from mpp.errors import UsageError
from mpp.training.pretrain_config import validate_run

# ViT paper §4 / App. B.1.1: SGD momentum 0.9, no weight decay, clip at global norm 1, cosine with
# warmup, zero-initialised head. `modern`: MAE / DeiT-style fine-tuning from timm's own parts.
# RandAugment's magnitude is capped at 9 (mmax9): at 10, timm's increasing posterize asks PIL for
# 0 bits, which Pillow >= 10 refuses.
PRESETS = {
    "paper": dict(
        opt="momentum",
        lr=0.03,
        weight_decay=0.0,
        layer_decay=None,
        drop_path=0.0,
        label_smoothing=0.0,
        mixup=0.0,
        cutmix=0.0,
        auto_augment=None,
        clip_grad=1.0,
        warmup_steps=50,
        zero_head=True,
    ),
    "modern": dict(
        opt="adamw",
        lr=1e-3,
        weight_decay=0.05,
        layer_decay=0.75,
        drop_path=0.1,
        label_smoothing=0.1,
        mixup=0.8,
        cutmix=1.0,
        auto_augment="rand-m9-mstd0.5-inc1-mmax9",
        clip_grad=0.0,
        warmup_steps=50,
        zero_head=False,
    ),
}
PRESET_KEYS = tuple(PRESETS["paper"])


@dataclass
class FinetuneConfig:
    # data
    dataset: str = "fashion-mnist"
    dataset_config: str | None = None
    train_split: str = "train"
    eval_split: str | None = None  # default: "test", or "validation" when test_split is given
    test_split: str | None = None  # given: --eval-split selects the epoch, this split is scored once
    image_column: str | None = None
    label_column: str | None = None
    train_per_class: int | None = None
    train_fraction: float | None = None
    subset_seed: int = 0
    workers: int | None = None
    crop_scale: tuple[float, float] = (0.35, 1.0)
    hflip: float = 0.5
    strict_data: bool = False
    # model
    init: str = "scratch"
    model: str = "vit_tiny_patch16_224"  # scratch only; otherwise the weights' metadata decides
    img_size: int | None = None  # default: the weights' (scratch: 28)
    patch_size: int | None = None  # scratch only (default 7)
    grad_checkpointing: bool = False
    # optimisation: None takes the preset's value
    preset: str = "paper"
    opt: str | None = None
    lr: float | None = None
    weight_decay: float | None = None
    layer_decay: float | None = None
    drop_path: float | None = None
    label_smoothing: float | None = None
    mixup: float | None = None
    cutmix: float | None = None
    auto_augment: str | None = None
    clip_grad: float | None = None
    warmup_steps: int | None = None
    zero_head: bool | None = None
    min_lr: float = 0.0
    batch_size: int = 128
    grad_accum: int = 1
    epochs: float = 30.0
    max_steps: int | None = None
    # run
    output_dir: str | None = None
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: str | None = None
    seed: int = 0
    log_every: int = 10
    eval_every: int = 1  # epochs
    threads: int | None = None
    progress: bool = True
    compile: bool = False
    report_to: str = "tensorboard"  # accelerate trackers: tensorboard, wandb, mlflow, all, none
    push_to_hub: str | None = None  # Hub repo id the finished run folder is uploaded to
    hub_private: bool = False
    max_nonfinite_steps: int = 5
    derived: dict = field(default_factory=dict)

    def __post_init__(self):
        if (
            self.eval_split is None
        ):  # with a test split, the held-out split that selects the epoch is the validation split
            self.eval_split = "validation" if self.test_split else "test"

    def resolved(self, key: str):
        """The value of an optimisation knob: the flag when given, else the preset's."""
        value = getattr(self, key)
        return PRESETS[self.preset][key] if value is None else value

    def to_dict(self) -> dict:
        """Every value as the run used it, presets resolved; derived.from_preset lists the knobs that took the
        preset's value, which a replay (--config) takes from the preset in effect rather than as given values."""
        d = asdict(self)
        d.update({k: self.resolved(k) for k in PRESET_KEYS})
        d["derived"] = {**d["derived"], "from_preset": [k for k in PRESET_KEYS if getattr(self, k) is None]}
        return d


def validate_finetune(cfg: FinetuneConfig) -> None:
    if cfg.preset not in PRESETS:
        raise UsageError(f"--preset {cfg.preset!r} is not one of: {', '.join(PRESETS)}")
    if cfg.test_split is not None and cfg.test_split in (cfg.eval_split, cfg.train_split):
        which = "--eval-split" if cfg.test_split == cfg.eval_split else "--train-split"
        raise UsageError(
            f"--test-split {cfg.test_split} is also the {which}: the test split must be held out from training and "
            "model selection"
        )
    from mpp.data.builtin import check_split

    for flag, split in [
        ("--train-split", cfg.train_split),
        ("--eval-split", cfg.eval_split),
        ("--test-split", cfg.test_split),
    ]:
        if split is not None:
            check_split(cfg.dataset, split, flag)
    if cfg.train_per_class is not None and cfg.train_fraction is not None:
        raise UsageError("give --train-per-class or --train-fraction, not both")
    if cfg.train_per_class is not None and cfg.train_per_class < 1:
        raise UsageError(f"--train-per-class must be at least 1, got {cfg.train_per_class}")
    if cfg.train_fraction is not None and not 0 < cfg.train_fraction <= 1:
        raise UsageError(f"--train-fraction must be in (0, 1], got {cfg.train_fraction}")
    if cfg.img_size is not None and cfg.img_size < 1:
        raise UsageError(f"--img-size must be positive, got {cfg.img_size}")
    if cfg.img_size is not None and cfg.patch_size is not None and cfg.img_size % cfg.patch_size:
        raise UsageError(f"--img-size {cfg.img_size} is not divisible by --patch-size {cfg.patch_size}")
    validate_run(cfg)
    if cfg.eval_every < 1:
        raise UsageError(f"--eval-every must be at least 1, got {cfg.eval_every}")
    lr = cfg.resolved("lr")
    if not (lr > 0 and math.isfinite(lr)):
        raise UsageError(f"--lr must be a positive number, got {lr}")
    for key in ("weight_decay", "drop_path", "label_smoothing", "mixup", "cutmix", "clip_grad", "warmup_steps"):
        if cfg.resolved(key) < 0:
            raise UsageError(f"--{key.replace('_', '-')} must not be negative, got {cfg.resolved(key)}")
    ld = cfg.resolved("layer_decay")
    if ld is not None and not 0 < ld <= 1:
        raise UsageError(f"--layer-decay must be in (0, 1], got {ld}")
    if (cfg.resolved("mixup") > 0 or cfg.resolved("cutmix") > 0) and cfg.batch_size % 2:
        raise UsageError(f"mixup/cutmix need an even --batch-size, got {cfg.batch_size}")
    if cfg.resolved("opt") not in ("momentum", "sgd", "adamw", "adam", "lamb", "lars"):
        raise UsageError(
            f"--opt {cfg.resolved('opt')!r}: use momentum (SGD), sgd (Nesterov), adamw, adam, lamb or lars"
        )
