"""Fine-tune a timm ViT: from scratch, MPP weights or supervised weights.

accelerate launch recipes/finetune.py --help
"""

# The recipe lives in the package (mpp/commands/finetune.py), so that an installed package runs it too: python -m mpp
# finetune
from mpp.commands.finetune import *  # noqa: F401,F403 (main, ... for code that imports this script)
from mpp.commands.finetune import cli

if __name__ == "__main__":
    cli()
