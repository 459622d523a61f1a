"""Re-encode a dataset once into small-JPEG parquet shards that --dataset reads.

python recipes/prepare_data.py --help
"""

# The recipe lives in the package (mpp/commands/prepare.py), so that an installed package runs it too: python -m mpp
# prepare
from mpp.commands.prepare import *  # noqa: F401,F403 (main, build_parser, ... for code that imports this script)
from mpp.commands.prepare import cli

if __name__ == "__main__":
    cli()
