"""The gap experiment as a transfer: scratch vs MPP vs supervised pretraining, over seeds.

python recipes/gap.py --help
"""

import argparse
import sys

from mpp.cli import OneLineParser, run_cli
from mpp.experiments.gap import SETTINGS, GapConfig, make_config, quick, run_gap

HELP = {
    "upstream": "pretraining set (its labels used only by the supervised arm)",
    "downstream": "fine-tuning set with train / validation / test splits",
    "train_per_class": "labelled downstream training images per class (default colour: all)",
    "model": "timm ViT for every arm",
    "pretrain_steps": "optimiser steps of both pretrainings",
    "pretrain_batch": "batch of both pretrainings",
    "pretrain_lr": "peak AdamW lr of both pretrainings",
    "finetune_epochs": "starting fine-tuning budget in epochs (doubled while a chosen run has not converged); the best "
    "validation epoch is kept",
    "finetune_batch": "fine-tuning batch",
    "eval_every": "epochs between validation evaluations while fine-tuning",
    "presets": "fine-tuning presets every arm is tuned over (paper, modern)",
    "paper_lr_grid": "learning rates of the paper preset (SGD momentum)",
    "modern_lr_grid": "learning rates of the modern preset (AdamW)",
    "grid_extensions": "lr grid steps added on a side while an arm's best lr in the grid is on that edge",
    "budget_doublings": "times the fine-tuning budget may double while a chosen run has not converged",
    "shots": "few-shot linear probes: examples per class",
    "seeds": "one full repetition per seed; the first one chooses every arm's fine-tuning recipe on validation",
    "bootstrap": "resamples of the two-level bootstrap (seeds x test images) of the primary comparison",
    "output_dir": "folder for every run, results.md, results.json and gap.png",
}
FLOATS = ("pretrain_lr", "finetune_epochs")


def build_parser() -> argparse.ArgumentParser:
    d = GapConfig()
    p = OneLineParser(
        prog="gap.py",
        description="Pretrain with MPP (no labels) and supervised (upstream labels) on the same upstream "
        "images; fine-tune from scratch / MPP / supervised on a disjoint downstream task with the lr chosen on "
        "validation per arm; probe the frozen encoders; repeat per seed. Defaults depend on --setting: "
        + "; ".join(f"{name}: " + ", ".join(f"{k} {v}" for k, v in s.items()) for name, s in SETTINGS.items()),
    )
    p.add_argument(
        "--setting",
        default="grey",
        help=f"data setting: {' or '.join(SETTINGS)} (grey is the headline, colour an illustration)",
    )
    p.add_argument("--quick", action="store_true", help="a few steps of everything, one seed (for tests)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue in --output-dir: finished runs are kept and only missing ones run "
        "(also to widen a finished experiment's grid or budget; its earlier protocol is kept on record)",
    )
    p.add_argument(
        "--protocol-note",
        default=None,
        help="with --resume, why the protocol changed (recorded in protocol.json and results.md)",
    )
    for name, value in vars(d).items():
        if name in ("setting", "eval_limit", "resume", "protocol_note"):
            continue
        flag, help_text = "--" + name.replace("_", "-"), HELP.get(name, name.replace("_", " "))
        if isinstance(value, tuple):
            p.add_argument(
                flag, type=type(value[0]), nargs="+", default=None, help=f"{help_text} (default {list(value)})"
            )
        else:
            kind = float if name in FLOATS else int if name == "train_per_class" else type(value)
            shown = "" if name in SETTINGS["grey"] else f" (default {value})"
            p.add_argument(flag, type=kind, default=None, help=help_text + shown)
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = vars(build_parser().parse_args(argv))
    is_quick = args.pop("quick")
    cfg = make_config(args.pop("setting"), **{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
    if is_quick:
        cfg = quick(cfg)
    report = run_gap(cfg, argv)
    print(f"wrote {cfg.output_dir}/results.md, results.json and gap.png ({report['wall_time_s']:.0f} s)")


def cli(argv=None):
    """The command line: `python -m mpp gap`, recipes/gap.py."""
    run_cli(main, argv)
