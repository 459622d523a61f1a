"""What stops a run: errors with an exit code, stop signals taken as one request, non-finite gradients."""

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch


class RunError(RuntimeError):
    """A run that cannot go on: reported as one line, exit code 1, the last checkpoint left as it was."""


class NonFiniteError(RunError):
    """Too many consecutive non-finite gradients."""


class BadDataError(RunError):
    """An unreadable image or missing label under --strict-data."""


class StopSignals:
    """SIGTERM / SIGINT (pre-emption, Ctrl-C) ask the loop to stop after the current step.

    Signals within `grace` seconds of the first are the same request: accelerate's launcher answers a
    terminal's Ctrl-C with a SIGTERM of its own a moment later, and a scheduler may signal both the
    launcher (which forwards it) and the training process. A signal after that interrupts at once,
    through the handler that was there before the loop. This handler stays installed until the loop
    ends, and the loop does not end within the grace period: a handler swapped while a signal is on
    its way loses that signal ("OSError: Signal 15 ignored due to race condition"), and with it the
    exit code 75.
    """

    grace = 1.0  # seconds

    def __init__(self):
        self.received: str | None = None
        self._first_at = 0.0
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is None:
            self.received, self._first_at = signal.Signals(signum).name, time.monotonic()
            return
        if time.monotonic() - self._first_at < self.grace:
            return  # the same request, delivered twice
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):  # e.g. Python's KeyboardInterrupt for SIGINT
            previous(signum, frame)
        elif previous == signal.SIG_DFL:  # end the way the signal would have ended the process
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def __exit__(self, *exc):
        if self.received is not None:  # a duplicate still on its way is absorbed here, not by the default handler
            time.sleep(max(0.0, self._first_at + self.grace - time.monotonic()))
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class NonFiniteGuard:
    """Skips optimiser steps whose gradient norm is NaN/inf and stops the run after too many in a row.

    With a fused optimiser the skip happens inside its kernel through `found_inf`, the way torch's
    GradScaler does it, so no step waits for the device; the counts stay on the device and are read
    at logging and checkpoint steps only. Other optimisers need the verdict on the host: one
    synchronisation per step.
    """

    def __init__(self, optimizer, max_in_a_row: int, skipped: int, device: torch.device):
        self.inner = getattr(optimizer, "optimizer", optimizer)  # under accelerate's AcceleratedOptimizer
        self.on_device = getattr(self.inner, "_step_supports_amp_scaling", False)  # GradScaler's test for found_inf
        self.max_in_a_row = max_in_a_row
        self.skipped = skipped  # read so far, over the whole run
        self.counts = torch.zeros(3, device=device)  # skipped since the last read, current streak, longest streak since

    def allows_step(self, grad_norm: torch.Tensor) -> bool:
        """Records one optimiser step's gradient norm; False: skip optimizer.step() (host path only)."""
        bad = (~torch.isfinite(grad_norm)).float().reshape(())
        streak = (self.counts[1] + bad) * bad
        self.counts = torch.stack([self.counts[0] + bad, streak, torch.maximum(self.counts[2], streak)])
        if self.on_device:
            self.inner.found_inf = bad  # the fused kernel leaves weights and moments alone when it is 1
            return True
        return not bool(bad)

    def check(self, step: int, run_dir: Path, say: Callable[[str], None]) -> None:
        """Reads the counts (one synchronisation); raises NonFiniteError after max_in_a_row bad steps in a row."""
        new, streak, longest = self.counts.tolist()
        self.counts = torch.tensor([0.0, streak, streak], device=self.counts.device)
        if new:
            self.skipped += int(new)
            say(f"step {step}: {int(new)} optimiser step(s) skipped for a non-finite gradient since the last report")
        if longest >= self.max_in_a_row:
            raise NonFiniteError(
                f"{int(longest)} optimiser steps in a row with a non-finite gradient (found at step {step}); "
                f"the last good checkpoint in {run_dir / 'checkpoints'} is intact (lower --lr or check the data)"
            )
