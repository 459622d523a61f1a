"""The gap experiment as a transfer: scratch vs MPP vs supervised pretraining, over seeds.

python recipes/gap.py --help
"""

import argparse
import sys

from mpp.cli import OneLineParser, run_cli
from mpp.experiments.gap import SETTINGS, GapConfig, make_config, quick, run_gap
from mpp.flags import add_flags, flag_fields, values_of


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="gap.py",
        description="Pretrain with MPP (no labels) and supervised (upstream labels) on the same upstream "
        "images; fine-tune from scratch / MPP / supervised on a disjoint downstream task with the lr chosen on "
        "validation per arm; probe the frozen encoders; repeat per seed. Defaults depend on --setting: "
        + "; ".join(f"{name}: " + ", ".join(f"{k} {v}" for k, v in s.items()) for name, s in SETTINGS.items()),
    )
    first = ["setting", "resume", "protocol_note"]  # before the overrides in --help, --quick (no field) among them
    add_flags(p, GapConfig, names=first[:1])
    p.add_argument("--quick", action="store_true", help="a few steps of everything, one seed (for tests)")
    add_flags(p, GapConfig, names=first[1:])
    add_flags(p, GapConfig, names=[f.name for f in flag_fields(GapConfig) if f.name not in first])
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = vars(build_parser().parse_args(argv))
    is_quick = args.pop("quick")
    cfg = make_config(args.pop("setting"), **values_of(GapConfig, args))
    if is_quick:
        cfg = quick(cfg)
    report = run_gap(cfg, argv)
    print(f"wrote {cfg.output_dir}/results.md, results.json and gap.png ({report['wall_time_s']:.0f} s)")


def cli(argv=None):
    """The command line: `python -m mpp gap`, recipes/gap.py."""
    run_cli(main, argv)
