"""What every command line shares: its parser's name and one-line errors (exit 2), failed runs as exit 1, and a
clean exit."""

import argparse
import sys
from pathlib import Path

from mpp.commands import COMMANDS
from mpp.errors import UsageError

RECIPE_COMMANDS = {c.recipe: name for name, c in COMMANDS.items()}  # recipes/X: python -m mpp Y


def started_as_module() -> bool:
    """Whether this process is `python -m mpp ...` (or `accelerate launch -m mpp ...`) rather than a recipe script."""
    main = Path(sys.argv[0])
    return main.name == "__main__.py" and main.parent.name == "mpp"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line (no usage block) with exit code 2. Its name is
    the recipe's, or `python -m mpp COMMAND` when the process was started that way."""

    def __init__(self, prog: str | None = None, *args, **kwargs):
        if started_as_module() and prog in RECIPE_COMMANDS:
            prog = f"python -m mpp {RECIPE_COMMANDS[prog]}"
        super().__init__(prog, *args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# Exit codes of the recipes besides 0: 2 bad invocation, 1 a run that failed (e.g. non-finite
# gradients), 75 (EX_TEMPFAIL) stopped by SIGTERM/SIGINT after writing a checkpoint: resume it.
EXIT_STOPPED = 75


def run_cli(main, argv: list[str] | None = None):
    """Call main(argv); a UsageError becomes one line on stderr and exit code 2, a RunError exit code 1."""
    from mpp.console import survive_closed_readers
    from mpp.training.guards import RunError

    survive_closed_readers()  # a closed pipe (| tee ended by Ctrl-C) must not end the run before its checkpoint
    try:
        return main(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        exit_cleanly(1)


def exit_cleanly(code: int = 0):
    """Leave without gloo's occasional abort at interpreter exit: tear the group down, flush, _exit."""
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
