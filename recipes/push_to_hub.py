"""Upload a finished run folder (a timm hub folder) to the Hugging Face Hub.  python recipes/push_to_hub.py --help"""

# The recipe lives in the package (mpp/commands/push.py), so that an installed package runs it too: python -m mpp push
from mpp.commands.push import *  # noqa: F401,F403 (main, build_parser, ... for code that imports this script)
from mpp.commands.push import cli

if __name__ == "__main__":
    cli()
