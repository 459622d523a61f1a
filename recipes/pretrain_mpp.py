"""Masked patch prediction pretraining.  accelerate launch recipes/pretrain_mpp.py --help"""

# The recipe lives in the package (mpp/commands/pretrain.py), so that an installed package runs it too: python -m mpp
# pretrain
from mpp.commands.pretrain import *  # noqa: F401,F403 (main, build_parser, ... for code that imports this script)
from mpp.commands.pretrain import cli

if __name__ == "__main__":
    cli()
