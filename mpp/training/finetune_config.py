"""Configuration of a fine-tuning run: the `paper` and `modern` presets, every knob overridable."""

import math
from dataclasses import asdict, dataclass, field

from mpp.errors import UsageError
from mpp.flags import flag, with_default
from mpp.training.run_config import RunConfig, validate_run

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


def preset_flag(key: str):
    """An optimisation knob left unset (None) takes the --preset's value; its help shows each preset's."""
    shown = ", ".join(f"{name} {PRESETS[name][key]}" for name in PRESETS)
    return flag(None, group="optimisation", help=f"(preset: {shown})")


@dataclass
class FinetuneConfig(RunConfig):
    dataset: str = flag(
        "fashion-mnist",
        group="data",
        help="labelled dataset: built-in (mnist5k, fashion-mnist[-upstream|-downstream], "
        "clipart[-upstream|-downstream]), local folder, parquet, Hub id",
    )
    dataset_config: str | None = flag(None, group="data", help="the Hub dataset's configuration name")
    train_split: str = flag("train", group="data", help="split to train on")
    eval_split: str | None = flag(
        None,
        group="data",
        help="held-out split for top-1 (default: test; with --test-split it is the validation split, default: "
        "validation)",
    )
    test_split: str | None = flag(
        None,
        group="data",
        help="test split, scored once at the end with the weights of the best --eval-split top-1, which become "
        "model.safetensors (the last weights: last.safetensors); never used to choose anything",
    )
    image_column: str | None = flag(None, group="data", help="image column (detected when there is only one)")
    label_column: str | None = flag(None, group="data", help="label column (detected: the only ClassLabel column)")
    train_per_class: int | None = flag(None, group="data", help="low-label regime: N training images per class")
    train_fraction: float | None = flag(
        None, group="data", help="low-label regime: this fraction of the training split"
    )
    subset_seed: int = flag(0, group="data", help="seed of the low-label draw")
    init: str = flag(
        "scratch",
        group="model",
        help="scratch, a run folder or a .safetensors file (from pretrain_mpp.py or finetune.py) or timm:NAME.TAG",
    )
    model: str = flag(
        "vit_tiny_patch16_224",
        group="model",
        help="timm ViT for --init scratch (otherwise the weights' metadata decides)",
    )
    img_size: int | None = flag(
        None, group="model", help="resolution (default: the weights'; larger interpolates position embeddings)"
    )  # scratch: 28
    patch_size: int | None = flag(None, group="model", help="patch size for --init scratch (default 7)")
    grad_checkpointing: bool = flag(False, group="model", help="timm's activation checkpointing")
    preset: str = flag(
        "paper",
        group="optimisation",
        choices=list(PRESETS),
        help="paper: SGD momentum, no wd, clip 1, zero head; modern: AdamW, layer decay, drop path, label smoothing, "
        "mixup/cutmix, RandAugment",
    )
    opt: str | None = preset_flag("opt")
    lr: float | None = preset_flag("lr")
    weight_decay: float | None = preset_flag("weight_decay")
    layer_decay: float | None = preset_flag("layer_decay")
    drop_path: float | None = preset_flag("drop_path")
    label_smoothing: float | None = preset_flag("label_smoothing")
    mixup: float | None = preset_flag("mixup")
    cutmix: float | None = preset_flag("cutmix")
    auto_augment: str | None = preset_flag("auto_augment")
    clip_grad: float | None = preset_flag("clip_grad")
    warmup_steps: int | None = preset_flag("warmup_steps")
    zero_head: bool | None = flag(
        None, group="optimisation", help="zero-initialise the head (preset: paper yes, modern no)"
    )
    min_lr: float = flag(0.0, group="optimisation", help="learning rate at the end of the cosine")
    eval_every: int = flag(1, group="run", help="epochs between held-out evaluations")
    # the shared flags whose default differs from pretraining's
    epochs: float = with_default(RunConfig, "epochs", 30.0)
    checkpoint_every: int = with_default(RunConfig, "checkpoint_every", 500)
    keep_checkpoints: int = with_default(RunConfig, "keep_checkpoints", 2)
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

    for flag_name, split in [
        ("--train-split", cfg.train_split),
        ("--eval-split", cfg.eval_split),
        ("--test-split", cfg.test_split),
    ]:
        if split is not None:
            check_split(cfg.dataset, split, flag_name)
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
