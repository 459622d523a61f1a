"""MPP's design choices (ViT paper App. B.1.2) in miniature, with verdicts.  python recipes/ablate.py --help"""

# The recipe lives in the package (mpp/commands/ablate.py), so that an installed package runs it too: python -m mpp
# ablate
from mpp.commands.ablate import *  # noqa: F401,F403 (main, build_parser, ... for code that imports this script)
from mpp.commands.ablate import cli

if __name__ == "__main__":
    cli()
