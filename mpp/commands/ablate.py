"""MPP's design choices (ViT paper App. B.1.2) in miniature, with verdicts.  python recipes/ablate.py --help"""

import sys

from mpp.cli import OneLineParser, run_cli
from mpp.experiments.ablate import AblateConfig, all_settings, choose_settings, quick, run_ablation

HELP = {
    "pretrain_dataset": "unlabelled pretraining set",
    "downstream": "labelled set (train / validation / test) the frozen encoders are probed and fine-tuned on",
    "model": "timm ViT",
    "img_size": "resolution of pretraining, probes and fine-tuning",
    "patch_size": "patch size",
    "steps": "pretraining steps of the default setting before the gate (the length axis takes 25/50/100/200%% of the "
    "budget the gate settles on)",
    "gate_doublings": "times the budget may double while the default does not beat a random-init encoder on --metric "
    "(validation)",
    "batch": "pretraining batch",
    "lr": "peak AdamW lr of every pretraining",
    "metric": "probe metric that decides the gate and the best setting (on validation) and the verdicts (on test)",
    "shots": "few-shot linear probes: examples per class",
    "finetune_epochs": "starting fine-tuning budget in epochs (doubled once if a chosen run has not converged)",
    "finetune_batch": "fine-tuning batch",
    "eval_every": "epochs between validation evaluations while fine-tuning",
    "lr_grid": "fine-tuning learning rates (paper preset), grown once at an edge; the first seed's validation chooses "
    "one per arm",
    "grid_extensions": "fine-tuning lr grid steps added on a side while an arm's best lr is on that edge",
    "budget_doublings": "times the fine-tuning budget may double while a chosen run has not converged",
    "seeds": "one full repetition per seed",
    "output_dir": "folder for ablation.md, ablation.json, ablation.png and ablation_protocol.json",
    "runs_dir": "folder for the runs and their logs (must be empty or new, unless --resume)",
}


def build_parser() -> OneLineParser:
    d = AblateConfig()
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
    p.add_argument("--quick", action="store_true", help="every setting for a few steps, one seed (for tests)")
    p.add_argument(
        "--no-finetune",
        dest="finetune",
        action="store_false",
        help="probes only: skip fine-tuning the default and best settings",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a stopped ablation in --runs-dir: finished runs are kept, an unfinished one is run again",
    )
    p.add_argument(
        "--settings",
        nargs="+",
        metavar="SETTING",
        help="run only these settings besides the default (run-folder names such "
        "as target_pixels_l2 or rate_15pc); findings that need another are 'not run' (default: all)",
    )
    p.add_argument(
        "--protocol-note",
        help="with --resume: why the protocol differs from the one already in --output-dir (kept beside it)",
    )
    for name, value in vars(d).items():
        if name in ("settings", "finetune", "resume", "protocol_note"):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, tuple):
            p.add_argument(
                flag, type=type(value[0]), nargs="+", default=list(value), help=HELP[name] + f" (default {list(value)})"
            )
        else:
            p.add_argument(
                flag, type=type(value), default=value, help=HELP[name] + f" (default {value})".replace("%", "%%")
            )
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = vars(build_parser().parse_args(argv))
    is_quick = args.pop("quick")
    args["settings"] = all_settings() if args["settings"] is None else choose_settings(args["settings"])
    cfg = AblateConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
    if is_quick:
        cfg = quick(cfg)
    report = run_ablation(cfg, argv)
    print(f"wrote {cfg.output_dir}/ablation.md, ablation.json and ablation.png ({report['wall_time_s']:.0f} s)")


def cli(argv=None):
    """The command line: `python -m mpp ablate`, recipes/ablate.py."""
    run_cli(main, argv)
