"""--report-to: where metrics go besides metrics.jsonl, through accelerate's own trackers.

The trackers are built here rather than by name so that each keeps a sensible place and name:
TensorBoard in RUN/tensorboard/ (as before), a W&B run and an MLflow run named after the run
folder in the project / experiment "mpp". MLflow writes to MLFLOW_TRACKING_URI, else to a file
store beside the run folders (runs/mlruns, MLFLOW_ALLOW_FILE_STORE set for MLflow 3), so it works offline.
"""

import os
from pathlib import Path

from mpp.errors import UsageError

TRACKERS = ("tensorboard", "wandb", "mlflow")
CHOICES = (*TRACKERS, "all", "none")
PROJECT = "mpp"


def _installed(name: str) -> bool:
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    return {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available}[name]()


def check_trackers(report_to: str) -> None:
    """One line, before any work, for an unknown name or a tracker that is not installed."""
    if report_to not in CHOICES:
        raise UsageError(f"--report-to {report_to!r}: use one of {', '.join(CHOICES)}")
    if report_to in TRACKERS and not _installed(report_to):
        raise UsageError(f"--report-to {report_to}: {report_to} is not installed; pip install 'vit-mpp[{report_to}]'")


def tracker_names(report_to: str) -> list[str]:
    """'all': every tracker that is installed; 'none': no tracker (metrics.jsonl is still written)."""
    if report_to == "none":
        return []
    if report_to == "all":
        return [name for name in TRACKERS if _installed(name)]
    return [report_to]


def build_trackers(report_to: str, run_dir: Path, resumed_at: int | None = None) -> list | None:
    """accelerate GeneralTracker instances for Accelerator(log_with=...), started by init_trackers; None for none.
    resumed_at: the step a resumed run continues from; TensorBoard hides what an earlier launch logged after it
    (SummaryWriter's purge_step), since this launch logs those steps again."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    trackers = []
    for name in tracker_names(report_to):
        if name == "tensorboard":
            purge = {"purge_step": resumed_at + 1} if resumed_at is not None else {}
            trackers.append(TensorBoardTracker("tensorboard", run_dir, **purge))  # RUN/tensorboard/
        elif name == "wandb":
            trackers.append(
                WandBTracker(PROJECT, name=run_dir.name, dir=str(run_dir))
            )  # offline too: WANDB_MODE=offline
        elif name == "mlflow":
            if "MLFLOW_TRACKING_URI" not in os.environ:  # a local file store beside the run folders, offline
                os.environ["MLFLOW_TRACKING_URI"] = (run_dir.resolve().parent / "mlruns").as_uri()
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file stores unless asked
            trackers.append(MLflowTracker(PROJECT, run_name=run_dir.name))
    return trackers or None
