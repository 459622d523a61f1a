"""Ctrl-C for the training loop alone, under accelerate's single-process launcher.

`accelerate launch` with one process runs the training process in the launcher's own process group,
so a terminal's Ctrl-C reaches both. The launcher answers with a SIGTERM of its own to the process and
its descendants and a SIGKILL 5 s later (accelerate 1.16, commands/launch.py: _terminate_process_tree),
and exits 130 whatever the process does: a step plus a checkpoint that take longer (a large model with
its optimiser state, a slow disk) are cut off. A `| tee log` in the same pipeline is ended by the same
Ctrl-C.

While the loop runs, the training process therefore takes the terminal's foreground for a process
group of its own (setpgid, tcsetpgrp): Ctrl-C then reaches it and its DataLoader workers (which leave
signals to it) and neither the launcher nor tee. It finishes its step, checkpoints however long that
takes and exits 75; the launcher reports that as its child's exit status. Ctrl-Z still suspends the
whole job: the process hands the terminal back, rejoins the launcher's group and stops with it; after
`fg` it takes the terminal again. When the loop ends, the terminal and the group are given back.

Only under these conditions, else nothing changes: one process (torchrun starts each rank in a
session of its own, without a terminal); its parent is accelerate's launcher and in the same process
group, which is the terminal's foreground group; the terminal does not stop background writers
(`stty tostop`), since the launcher and tee write from the background meanwhile.
"""

import os
import signal
import termios
from contextlib import contextmanager

import psutil


def launched_by_accelerate(cmdline: list[str]) -> bool:
    """`accelerate launch ...`, `accelerate-launch ...` or `python -m accelerate.commands.launch ...`."""
    names = [os.path.basename(part) for part in cmdline]
    return (
        "accelerate.commands.launch" in cmdline
        or "accelerate-launch" in names
        or any(name == "accelerate" and nxt == "launch" for name, nxt in zip(names, names[1:]))
    )


@contextmanager
def _no_sigttou():
    """tcsetpgrp from a background process group stops the caller with SIGTTOU unless it is blocked."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTTOU})


class CtrlCForTheLoop:
    """A context manager around the training loop (see the module's docstring); a no-op where it does not apply."""

    def __init__(self):
        self.tty = None
        self.job = None  # the launcher's process group
        self._owner = None  # the training process (DataLoader workers inherit its handlers)
        self._previous_tstp = None

    def __enter__(self):
        if os.environ.get("WORLD_SIZE", "1") != "1":
            return self
        try:
            tty = os.open("/dev/tty", os.O_RDWR)
        except OSError:  # no controlling terminal
            return self
        try:
            job, parent = os.getpgrp(), psutil.Process().parent()
            if (
                parent is None
                or job == os.getpid()
                or os.getpgid(parent.pid) != job
                or os.tcgetpgrp(tty) != job
                or termios.tcgetattr(tty)[3] & termios.TOSTOP
                or not launched_by_accelerate(parent.cmdline())
            ):
                os.close(tty)
                return self
        except (OSError, psutil.Error):
            os.close(tty)
            return self
        self.tty, self.job, self._owner = tty, job, os.getpid()
        self._take()
        self._previous_tstp = signal.signal(signal.SIGTSTP, self._suspend)
        return self

    def _take(self):
        with _no_sigttou():
            os.setpgid(0, 0)
            os.tcsetpgrp(self.tty, os.getpgrp())

    def _give_back(self):
        with _no_sigttou():
            try:
                if os.tcgetpgrp(self.tty) == os.getpgrp():
                    os.tcsetpgrp(self.tty, self.job)
                os.setpgid(0, self.job)
            except OSError:  # the launcher's group is gone: nothing to give back to
                pass

    def _suspend(self, signum, frame):
        """Ctrl-Z: stop with the launcher's job, so that the shell sees the job stopped; take the terminal
        again when the job is brought back to the foreground. A DataLoader worker forked with this
        handler ignores it: it would stop apart from the job and never be continued (and, continued, race
        the training process for the terminal); it only waits while the training process is stopped."""
        if os.getpid() != self._owner:
            return
        self._give_back()
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.killpg(self.job, signal.SIGTSTP)  # this process stops here too, until fg or bg
        signal.signal(signal.SIGTSTP, self._suspend)
        try:
            if os.tcgetpgrp(self.tty) == self.job:  # fg (after bg, the job stays in the background)
                self._take()
        except OSError:
            pass

    def __exit__(self, *exc):
        if self.tty is None:
            return
        signal.signal(signal.SIGTSTP, self._previous_tstp)
        self._give_back()
        os.close(self.tty)
        self.tty = None
