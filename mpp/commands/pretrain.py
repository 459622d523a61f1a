"""Masked patch prediction pretraining.  accelerate launch recipes/pretrain_mpp.py --help"""

import argparse

from accelerate.state import PartialState

from mpp.cli import EXIT_STOPPED, OneLineParser, exit_cleanly, run_cli
from mpp.config_files import add_config_flag, parse_with_config
from mpp.flags import add_flags, values_of
from mpp.training.pretrain import closing_summary, pretrain
from mpp.training.pretrain_config import PretrainConfig, validate


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="pretrain_mpp.py",
        description="Masked patch prediction pretraining of a timm ViT (Dosovitskiy et al. 2021, §4.6). "
        "Run it through 'accelerate launch'; mixed precision and multi-GPU/TPU are accelerate's flags.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_flag(add_flags(p, PretrainConfig)["run"])
    return p


def parse_config(argv: list[str] | None = None) -> PretrainConfig:
    cfg = PretrainConfig(**values_of(PretrainConfig, parse_with_config(build_parser(), argv)))
    validate(cfg)
    return cfg


def main(argv=None):
    cfg = parse_config(argv)  # every flag checked before anything heavy
    result = pretrain(cfg)
    if result.stopped_by:
        return EXIT_STOPPED
    if PartialState().is_main_process:
        print(closing_summary(result.run_dir))
    return 0


def cli(argv=None):
    """The command line: `python -m mpp pretrain`, recipes/pretrain_mpp.py."""
    exit_cleanly(run_cli(main, argv))
