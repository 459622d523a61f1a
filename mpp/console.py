"""Output that outlives its reader: a run must not die because the pipe it prints to has closed.

`... | tee log` and Ctrl-C: the terminal's SIGINT ends `tee` as well, and the run's next print (a log
line, the progress bar) raised BrokenPipeError (Python ignores SIGPIPE), ending the run before it
could checkpoint. The same happens to the stderr a launcher copies when the launcher is gone. Once a
stream's reader is gone, its file descriptor is pointed at /dev/null, so the rest of the output (from
this stream object, other holders of the descriptor, C code, DataLoader workers) is discarded and the
run carries on to its checkpoint and exit code.
"""

import errno
import os
import sys


class SurvivingStream:
    """A text stream whose write and flush outlive a broken pipe; everything else is the stream's own."""

    def __init__(self, stream):
        self._stream = stream
        self.reader_gone = False

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            self._lost(e)
            return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            self._lost(e)

    def _lost(self, error: OSError) -> None:
        if error.errno != errno.EPIPE:
            raise error
        self.reader_gone = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)
        try:
            self._stream.flush()  # what was buffered goes to /dev/null now
        except OSError:
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


def survive_closed_readers() -> None:
    """Make sys.stdout and sys.stderr outlive their readers (once per process)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, SurvivingStream) and hasattr(stream, "fileno"):
            try:
                stream.fileno()
            except (OSError, ValueError):  # not backed by a file descriptor (e.g. captured by a test)
                continue
            setattr(sys, name, SurvivingStream(stream))
