"""Checkpoints: accelerate's save_state into step-numbered folders, written atomically.

RUN/checkpoints/step_000100/   complete (accelerate's files + trainer_state.json)
RUN/checkpoints/.tmp-step_000150/   being written; never resumed from, removed on the next save
RUN/checkpoints/.damaged-step_000200/   failed its manifest at a resume; set aside, never resumed from
A folder gets its final name only after every process has written its part and the manifest (each
file's size and checksum) is written, so a kill at any moment leaves the previous checkpoint as the
newest complete one; a resume checks the manifest before it loads anything (usable_checkpoint).
"""

import json
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator

from mpp.errors import UsageError
from mpp.training.manifest import damage, write_manifest

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def save_checkpoint(accelerator: Accelerator, run_dir: Path, trainer_state: dict, keep: int) -> Path | None:
    """Every process calls this. Returns the final folder, or None when the write failed (disk
    full, I/O error): then the partial folder is removed, the previous checkpoint stays the newest
    complete one, the run says so and goes on."""
    step = trainer_state["step"]
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-step_{step:06d}"
    error = None
    try:
        if accelerator.is_main_process:
            for stale in root.glob(".tmp-step_*"):  # left by a kill or a failed write
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))  # model, optimizer, RNG states of every process
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
    except OSError as e:
        error = e
    # every process learns whether any write failed, so all take the same path
    failed = accelerator.reduce(torch.tensor(float(error is not None), device=accelerator.device), "sum").item()
    if failed:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        reason = f"{error.strerror or error}" if error else "failed on another process"
        accelerator.print(
            f"checkpoint at step {step} could not be written ({reason}); "
            f"the newest valid checkpoint is still {previous}"
        )
        accelerator.wait_for_everyone()
        return None
    if accelerator.is_main_process:
        try:
            write_manifest(
                tmp
            )  # last, once every process's files are there (the reduce above): a folder with one is complete
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            accelerator.print(
                f"checkpoint at step {step} could not be written ({e.strerror or e}); "
                f"the newest valid checkpoint is still {latest_checkpoint(run_dir)}"
            )
            final = None
        else:
            if final.exists():  # the same step saved again (e.g. the final step after a resume)
                shutil.rmtree(final)
            tmp.rename(final)
            for old in complete_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def usable_checkpoint(run_dir: Path, say) -> Path | None:
    """The newest complete checkpoint whose files match its manifest. A damaged one is reported in one
    line and set aside (.damaged-step_N: never resumed from, and not counted among the kept ones), and
    the one before it is tried. Main process only (it reads every file)."""
    for checkpoint in reversed(complete_checkpoints(run_dir)):
        problem = damage(checkpoint)
        if problem is None:
            return checkpoint
        aside = checkpoint.with_name(f".damaged-{checkpoint.name}")
        shutil.rmtree(aside, ignore_errors=True)
        checkpoint.rename(aside)
        earlier = complete_checkpoints(run_dir)
        say(
            f"checkpoint {checkpoint} is damaged ({problem}); set aside as {aside.name}, "
            + (
                f"resuming from {earlier[-1].name}"
                if earlier
                else "and no earlier checkpoint is left: starting from step 0"
            )
        )
    return None


def check_checkpoint(path: Path, flag: str) -> None:
    """A checkpoint named on the command line is used as it is or refused, never replaced by another."""
    problem = damage(path)
    if problem:
        raise UsageError(
            f"{flag} {path}: the checkpoint is damaged ({problem}); pass --resume auto for the newest "
            "undamaged checkpoint of the run, or another checkpoint"
        )


def read_trainer_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())
