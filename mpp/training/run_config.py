"""The settings every training command shares (pretrain, finetune), each declared once as a flag, and their checks.

PretrainConfig and FinetuneConfig inherit these fields, so a run's configuration stays one flat mapping
(run_config.json, the launch records a resume is checked against).
"""

from dataclasses import dataclass

from mpp.errors import UsageError
from mpp.flags import flag
from mpp.training.trackers import CHOICES as TRACKER_CHOICES
from mpp.training.trackers import check_trackers

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


@dataclass
class RunConfig:
    workers: int | None = flag(
        None,
        group="data pipeline",
        help="DataLoader worker processes per training process, kept across epochs (default: 0 on CPU machines with "
        "<= 4 cores, else the cores per process but one)",
    )
    crop_scale: tuple[float, float] = flag(
        (0.35, 1.0), group="data pipeline", metavar=("MIN", "MAX"), help="RandomResizedCrop area range"
    )
    hflip: float = flag(0.5, group="data pipeline", help="horizontal flip probability")
    strict_data: bool = flag(
        False,
        group="data pipeline",
        help="stop at the first unreadable image or missing label instead of skipping and counting it",
    )
    batch_size: int = flag(128, group="length", help="images per device per micro-batch")
    grad_accum: int = flag(1, group="length", help="micro-batches per optimiser step")
    epochs: float = flag(8.0, group="length", help="passes over the training images when --max-steps is not given")
    max_steps: int | None = flag(None, group="length", help="optimiser steps (overrides --epochs)")
    output_dir: str | None = flag(None, group="run", help="run folder (default runs/<date-time>)")
    checkpoint_every: int = flag(200, group="run", help="optimiser steps between checkpoints")
    keep_checkpoints: int = flag(3, group="run", help="how many recent checkpoints to keep")
    resume: str | None = flag(
        None, group="run", help="'auto' (newest complete checkpoint of --output-dir) or a checkpoint folder"
    )
    seed: int = flag(0, group="run", help="random seed")
    log_every: int = flag(10, group="run", help="optimiser steps between metric records")
    max_nonfinite_steps: int = flag(
        5,
        group="run",
        help="stop after this many optimiser steps in a row with a non-finite gradient (each is skipped; checked at "
        "logging steps); 0: no check",
    )  # 0 also saves the host-device sync per step
    compile: bool = flag(False, group="run", help="torch.compile the model (accelerate's dynamo plugin, inductor)")
    compile_mode: str = flag(
        "default",
        group="run",
        choices=list(COMPILE_MODES),
        help="torch.compile's mode with --compile: reduce-overhead and max-autotune add CUDA graphs, max-autotune "
        "also searches kernels (minutes of compilation)",
    )
    threads: int | None = flag(
        None,
        group="run",
        help="CPU threads per process (default: the cores / processes on this machine; "
        "accelerate launch without a config sets OMP_NUM_THREADS=1, which would halve a 2-core CPU run)",
    )
    progress: bool = flag(True, group="run", help="a progress bar")
    report_to: str = flag(
        "tensorboard",
        group="run",
        choices=TRACKER_CHOICES,
        help="where metrics go besides metrics.jsonl, through accelerate's trackers (wandb: pip install "
        "'vit-mpp[wandb]', mlflow: 'vit-mpp[mlflow]'; 'all': every one installed)",
    )
    push_to_hub: str | None = flag(
        None,
        group="run",
        metavar="REPO_ID",
        help="upload the finished run folder (a timm hub folder, checkpoints left out) to this Hugging Face model "
        "repo; needs a token (hf auth login) and the network, checked before training",
    )
    hub_private: bool = flag(
        False,
        group="run",
        help="with --push-to-hub: the repo must be private (created private; an existing public repo is refused before "
        "training)",
    )


def validate_run(cfg: RunConfig) -> None:
    """Checks of the flags every training command has."""
    for flag_name, value in [
        ("--batch-size", cfg.batch_size),
        ("--grad-accum", cfg.grad_accum),
        ("--log-every", cfg.log_every),
        ("--checkpoint-every", cfg.checkpoint_every),
        ("--keep-checkpoints", cfg.keep_checkpoints),
    ]:
        if value < 1:
            raise UsageError(f"{flag_name} must be at least 1, got {value}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise UsageError(f"--max-steps must be at least 1, got {cfg.max_steps}")
    if not cfg.epochs > 0:
        raise UsageError(f"--epochs must be positive, got {cfg.epochs}")
    if (cfg.workers or 0) < 0 or (cfg.threads or 0) < 0 or cfg.max_nonfinite_steps < 0:
        raise UsageError("--workers, --threads and --max-nonfinite-steps must not be negative")
    if cfg.compile_mode != "default" and not cfg.compile:
        raise UsageError(f"--compile-mode {cfg.compile_mode} needs --compile")
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
