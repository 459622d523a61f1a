"""Fine-tune a timm ViT: from scratch, MPP weights or supervised weights.

accelerate launch recipes/finetune.py --help
"""

import argparse

from mpp.cli import EXIT_STOPPED, OneLineParser, exit_cleanly, run_cli
from mpp.config_files import add_config_flag, parse_with_config
from mpp.flags import add_flags, values_of
from mpp.training.finetune import finetune
from mpp.training.finetune_config import FinetuneConfig, validate_finetune


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="finetune.py",
        description="Fine-tune a timm ViT classifier from scratch, from MPP weights or from supervised weights. "
        "Optimisation knobs left unset take the --preset's value.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_flag(add_flags(p, FinetuneConfig)["run"])
    return p


def parse_config(argv: list[str] | None = None) -> FinetuneConfig:
    cfg = FinetuneConfig(**values_of(FinetuneConfig, parse_with_config(build_parser(), argv)))
    validate_finetune(cfg)
    return cfg


def main(argv=None):
    results = finetune(parse_config(argv))  # every flag checked before anything heavy
    return EXIT_STOPPED if results.get("stopped_by") else 0


def cli(argv=None):
    """The command line: `python -m mpp finetune`, recipes/finetune.py."""
    exit_cleanly(run_cli(main, argv))
