"""The gap experiment as a transfer: scratch vs MPP vs supervised pretraining, over seeds.

python recipes/gap.py --help
"""

# The recipe lives in the package (mpp/commands/gap.py), so that an installed package runs it too: python -m mpp gap
from mpp.commands.gap import *  # noqa: F401,F403 (main, build_parser, ... for code that imports this script)
from mpp.commands.gap import cli

if __name__ == "__main__":
    cli()
