"""Figures of what a pretrained ViT learned (ViT paper §4.5) and its MPP predictions, with a report.md.

python recipes/inspect_run.py runs/RUN [--dataset photos] [--output-dir runs/RUN/inspect]
"""

import argparse
import sys
from pathlib import Path

import torch

from mpp.cli import OneLineParser, run_cli
from mpp.data.heldout import sample_images
from mpp.errors import UsageError
from mpp.evaluation.diagnostics import load_mpp_model
from mpp.evaluation.report import inspect_model
from mpp.models.hub_folder import read_run_config
from mpp.models.weights import read_metadata


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="inspect_run.py",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "weights",
        metavar="RUN_DIR_OR_WEIGHTS",
        help="a run folder or its model.safetensors (mpp_head.safetensors beside it is used when present)",
    )
    p.add_argument(
        "--dataset", default=None, help="images to show (default: the run's run_config.json dataset, else mnist5k)"
    )
    p.add_argument("--dataset-config", default=None, help="the Hub dataset's configuration name")
    p.add_argument("--split", default=None, help="dataset split (default: the run's, else train)")
    p.add_argument("--image-column", default=None, help="image column (detected when there is only one)")
    p.add_argument("--num-images", type=int, default=8, help="images in the prediction and rollout figures")
    p.add_argument(
        "--distance-images", type=int, default=64, help="images the mean attention distance is averaged over"
    )
    p.add_argument("--output-dir", default=None, help="where the PNGs and report.md go (default RUN_DIR/inspect)")
    p.add_argument("--seed", type=int, default=0, help="which images are drawn, and their corruption")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    for flag in ("num_images", "distance_images"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    path = Path(args.weights)
    weights = path / "model.safetensors" if path.is_dir() else path
    if not weights.is_file():
        raise UsageError(f"RUN_DIR_OR_WEIGHTS {args.weights}: no {weights.name} there")
    run_dir = weights.parent
    cfg = read_run_config(run_dir)
    dataset = args.dataset or cfg.get("dataset") or "mnist5k"
    split = args.split or (cfg.get("split", "train") if not args.dataset else "train")
    config = args.dataset_config or (cfg.get("dataset_config") if not args.dataset else None)

    try:
        model, head_loaded = load_mpp_model(weights)
    except ValueError as e:
        raise UsageError(f"RUN_DIR_OR_WEIGHTS {args.weights}: {e}") from None
    meta = read_metadata(weights)
    img_size = meta["img_size"]
    torch.manual_seed(args.seed)
    pool = sample_images(
        dataset, split, config, args.image_column, max(args.num_images, args.distance_images), args.seed, img_size
    )
    notes = [
        f"weights: `{weights}` ({meta['timm_model']}, {img_size}px, patch {meta['patch_size']}, target "
        f"{meta.get('mpp_target', '?')}, {meta.get('steps', '?')} steps)",
        f"images: {dataset} split {split}, seed {args.seed}",
    ]
    out_dir = Path(args.output_dir) if args.output_dir else run_dir / "inspect"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output-dir {out_dir}: cannot create it ({e.strerror})") from None
    report, skipped = inspect_model(
        model, head_loaded, pool[: args.num_images], pool[: args.distance_images], out_dir, notes, args.seed
    )
    for s in skipped:
        print(f"skipped {s.name}: {s.reason}", file=sys.stderr)
    print(f"wrote {report}")


def cli(argv=None):
    """The command line: `python -m mpp inspect`, recipes/inspect_run.py."""
    run_cli(main, argv)
