"""The gap experiment: MPP vs scratch vs supervised pretraining, over seeds.  python recipes/gap.py --help"""
import argparse

from mpp.cli import OneLineParser, run_cli
from mpp.gap import GapConfig, quick, run_gap


HELP = {
    "upstream": "pretraining set (labels used only by the supervised arm)",
    "downstream": "fine-tuning set; its 'test' split is held out",
    "train_per_class": "labelled downstream training images per class",
    "model": "timm ViT for every arm",
    "pretrain_steps": "optimiser steps of both pretrainings",
    "pretrain_batch": "batch of both pretrainings",
    "pretrain_lr": "peak AdamW lr of both pretrainings",
    "finetune_epochs": "epochs over the labelled downstream images",
    "finetune_batch": "fine-tuning batch",
    "preset": "fine-tuning preset (paper or modern), identical for the three inits",
    "finetune_lr": "fine-tuning lr (default: the preset's)",
    "shots": "few-shot linear evaluation: examples per class",
    "seeds": "one full repetition per seed",
    "output_dir": "folder for every run, results.md, results.json and gap.png",
}


def main(argv=None):
    d = GapConfig()
    p = OneLineParser(prog="gap.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                      description="MPP-pretrain and supervised-pretrain on an upstream set, fine-tune from scratch / MPP / "
                      "supervised on a low-label downstream set, measure few-shot linear and k-NN accuracy; repeat per seed.")
    p.add_argument("--quick", action="store_true", help="a few steps of everything, one seed (for tests)")
    for name, value in vars(d).items():
        if name == "eval_limit":
            continue
        help_text = HELP.get(name, name.replace("_", " "))
        flag = "--" + name.replace("_", "-")
        if isinstance(value, tuple):
            p.add_argument(flag, type=int, nargs="+", default=list(value), help=help_text)
        else:
            p.add_argument(flag, type=float if name in ("finetune_lr", "finetune_epochs", "pretrain_lr") else type(value) if value is not None else str,
                           default=value, help=help_text)
    args = vars(p.parse_args(argv))
    is_quick = args.pop("quick")
    cfg = GapConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
    if is_quick:
        cfg = quick(cfg)
    report = run_gap(cfg)
    print(f"wrote {cfg.output_dir}/results.md, results.json and gap.png ({report['wall_time_s']:.0f} s)")


if __name__ == "__main__":
    run_cli(main)
