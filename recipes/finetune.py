"""Fine-tune a timm ViT: from scratch, MPP weights or supervised weights.  accelerate launch recipes/finetune.py --help"""
from mpp.cli import exit_cleanly, parse_finetune_config, run_cli
from mpp.finetune import finetune


def main(argv=None):
    finetune(parse_finetune_config(argv))  # every flag checked before anything heavy


if __name__ == "__main__":
    run_cli(main)
    exit_cleanly(0)
