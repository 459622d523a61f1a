"""Fine-tune a timm ViT: from scratch, MPP weights or supervised weights.

accelerate launch recipes/finetune.py --help
"""

from mpp.cli import EXIT_STOPPED, exit_cleanly, parse_finetune_config, run_cli
from mpp.training.finetune import finetune


def main(argv=None):
    results = finetune(parse_finetune_config(argv))  # every flag checked before anything heavy
    return EXIT_STOPPED if results.get("stopped_by") else 0


def cli(argv=None):
    """The command line: `python -m mpp finetune`, recipes/finetune.py."""
    exit_cleanly(run_cli(main, argv))
