"""Figures of what a pretrained ViT learned (ViT paper §4.5) and its MPP predictions, with a report.md.

python recipes/inspect_run.py runs/RUN [--dataset photos] [--output-dir runs/RUN/inspect]
"""

# The recipe lives in the package (mpp/commands/inspect.py), so that an installed package runs it too: python -m mpp
# inspect
from mpp.commands.inspect import *  # noqa: F401,F403 (main, build_parser, ... for code that imports this script)
from mpp.commands.inspect import cli

if __name__ == "__main__":
    cli()
