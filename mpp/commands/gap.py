"""The gap experiment as a transfer: scratch vs MPP vs supervised pretraining, over seeds.  python recipes/gap.py --help"""
import argparse
import sys

from mpp.cli import OneLineParser, run_cli
from mpp.experiments.gap import LR_SELECTIONS, SETTINGS, GapConfig, make_config, quick, run_gap

HELP = {
    "upstream": "pretraining set (its labels used only by the supervised arm)",
    "downstream": "fine-tuning set with train / validation / test splits",
    "train_per_class": "labelled downstream training images per class (default colour: all)",
    "model": "timm ViT for every arm",
    "pretrain_steps": "optimiser steps of both pretrainings",
    "pretrain_batch": "batch of both pretrainings",
    "pretrain_lr": "peak AdamW lr of both pretrainings",
    "finetune_epochs": "most epochs of fine-tuning; the best validation epoch is kept",
    "finetune_batch": "fine-tuning batch",
    "eval_every": "epochs between validation evaluations while fine-tuning",
    "preset": "fine-tuning preset (paper or modern), identical for the three arms",
    "lr_grid": "fine-tuning learning rates tried for every arm; validation chooses one per arm",
    "lr_selection": f"whose validation chooses the lr: {' or '.join(LR_SELECTIONS)} (first-seed: the first seed's, kept for the others)",
    "shots": "few-shot linear probes: examples per class",
    "seeds": "one full repetition per seed",
    "output_dir": "folder for every run, results.md, results.json and gap.png",
}
FLOATS = ("pretrain_lr", "finetune_epochs")


def build_parser() -> argparse.ArgumentParser:
    d = GapConfig()
    p = OneLineParser(prog="gap.py", description="Pretrain with MPP (no labels) and supervised (upstream labels) on the same upstream "
                      "images; fine-tune from scratch / MPP / supervised on a disjoint downstream task with the lr chosen on "
                      "validation per arm; probe the frozen encoders; repeat per seed. Defaults depend on --setting: "
                      + "; ".join(f"{name}: " + ", ".join(f"{k} {v}" for k, v in s.items()) for name, s in SETTINGS.items()))
    p.add_argument("--setting", default="colour", help=f"data setting: {' or '.join(SETTINGS)} (colour is the headline)")
    p.add_argument("--quick", action="store_true", help="a few steps of everything, one seed (for tests)")
    for name, value in vars(d).items():
        if name in ("setting", "eval_limit"):
            continue
        flag, help_text = "--" + name.replace("_", "-"), HELP.get(name, name.replace("_", " "))
        if isinstance(value, tuple):
            p.add_argument(flag, type=float if name == "lr_grid" else int, nargs="+", default=None, help=f"{help_text} (default {list(value)})")
        else:
            kind = float if name in FLOATS else int if name == "train_per_class" else type(value)
            shown = "" if name in SETTINGS["colour"] else f" (default {value})"
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
