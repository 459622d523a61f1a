"""The run folder: named, made and held by exactly one launch.

Taking a folder is an exclusive create, never a look followed by a use:
- without --output-dir, runs/<date-time> is made with os.mkdir (no exist_ok); when another launch
  made it first, runs/<date-time>-2, -3, ... are tried in turn;
- --output-dir DIR is made with os.mkdir when it does not exist; an existing one must be empty
  unless the launch resumes;
- either way the launch holds an exclusive lock (flock) on the folder until it ends, so a second
  launch into a folder in use (two resumes of one run, a sweep given one --output-dir) is refused,
  and the emptiness check above cannot race with another launch. The kernel drops the lock when the
  process ends, however it ends.
"""

import fcntl
import os
from datetime import datetime
from pathlib import Path

from mpp.errors import UsageError
from mpp.training.checkpoint import complete_checkpoints

_held: dict[str, int] = {}  # folder -> descriptor holding its lock; a process may open several runs in it


def newest_resumable_run(runs_root: str | Path) -> Path | None:
    """The newest run under runs_root that has a complete checkpoint (for --resume auto without --output-dir)."""
    runs = sorted((p for p in Path(runs_root).glob("*") if complete_checkpoints(p)), key=lambda p: p.stat().st_mtime)
    return runs[-1] if runs else None


def claim_run_dir(output_dir: str | None, resume: str | None, runs_root: str | Path = "runs") -> Path:
    """The run folder of this launch, made or found, locked, and checked; a UsageError says why not."""
    if output_dir:
        path, made = Path(output_dir), _make(Path(output_dir), f"--output-dir {output_dir}")
    elif resume == "auto" and newest_resumable_run(runs_root):
        path, made = newest_resumable_run(runs_root), False
    else:
        path, made = _make_dated(Path(runs_root)), True
    if not path.is_dir():
        raise UsageError(f"--output-dir {path} exists and is not a folder")
    _lock(path)
    if not made:
        if resume is None and any(path.iterdir()):
            raise UsageError(
                f"--output-dir {path} is not empty; pass --resume auto to continue that run, or choose another folder"
            )
        try:
            probe = path / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise UsageError(f"--output-dir {path} is not writable ({e.strerror})") from None
    return path


def _make(path: Path, what: str) -> bool:
    """True when this call made the folder, False when it existed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir()
        return True
    except FileExistsError:
        return False
    except OSError as e:
        raise UsageError(f"{what} is not writable ({e.strerror})") from None


def _make_dated(runs_root: Path) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10_000):
        path = runs_root / (stamp if n == 1 else f"{stamp}-{n}")
        if _make(path, f"the run folder {path}"):
            return path
    raise UsageError(f"no free run folder name under {runs_root} for {stamp}; pass --output-dir")


def _lock(path: Path) -> None:
    key = os.path.realpath(path)
    if key in _held:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(
            f"the run folder {path} is in use by another launch; wait for it to end, or choose another --output-dir"
        ) from None
    _held[key] = fd
