"""Masked patch prediction pretraining.  accelerate launch recipes/pretrain_mpp.py --help"""

from accelerate.state import PartialState

from mpp.cli import EXIT_STOPPED, exit_cleanly, parse_config, run_cli
from mpp.training.pretrain import closing_summary, pretrain


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
