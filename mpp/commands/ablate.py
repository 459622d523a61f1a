"""MPP's design choices (ViT paper App. B.1.2) in miniature, with verdicts.  python recipes/ablate.py --help"""

import sys

from mpp.cli import OneLineParser, run_cli
from mpp.experiments.ablate import AblateConfig, all_settings, choose_settings, quick, run_ablation
from mpp.flags import add_flags, flag_fields, values_of


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog="ablate.py",
        description="Pretrain with MPP once per setting and seed (the default, then one axis changed at a "
        "time: target, corruption rate, mix, where the corruption happens, length), probe the frozen encoders beside a "
        "random-init "
        "encoder and raw pixels, fine-tune the default, the best setting and scratch, and judge the paper's findings "
        "by "
        "paired "
        "per-seed differences once the default beats the random-init encoder.",
    )
    first = ["finetune", "resume", "settings", "protocol_note"]  # in --help after --quick (no field)
    p.add_argument("--quick", action="store_true", help="every setting for a few steps, one seed (for tests)")
    add_flags(p, AblateConfig, names=first)
    add_flags(p, AblateConfig, names=[f.name for f in flag_fields(AblateConfig) if f.name not in first])
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = vars(build_parser().parse_args(argv))
    is_quick = args.pop("quick")
    args["settings"] = all_settings() if args["settings"] is None else choose_settings(args["settings"])
    cfg = AblateConfig(**values_of(AblateConfig, args))
    if is_quick:
        cfg = quick(cfg)
    report = run_ablation(cfg, argv)
    print(f"wrote {cfg.output_dir}/ablation.md, ablation.json and ablation.png ({report['wall_time_s']:.0f} s)")


def cli(argv=None):
    """The command line: `python -m mpp ablate`, recipes/ablate.py."""
    run_cli(main, argv)
