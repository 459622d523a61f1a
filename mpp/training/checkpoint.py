"""Checkpoints: accelerate's save_state into step-numbered folders, written atomically.

RUN/checkpoints/step_000100/   complete (accelerate's files + trainer_state.json)
RUN/checkpoints/.tmp-step_000150/   being written; never resumed from, removed on the next save
A folder gets its final name only after every process has written its part, so a kill at any
moment leaves the previous checkpoint as the newest complete one.
"""
import json
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator

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
        accelerator.print(f"checkpoint at step {step} could not be written ({reason}); "
                          f"the newest valid checkpoint is still {previous}")
        accelerator.wait_for_everyone()
        return None
    if accelerator.is_main_process:
        if final.exists():  # the same step saved again (e.g. the final step after a resume)
            shutil.rmtree(final)
        tmp.rename(final)
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())
