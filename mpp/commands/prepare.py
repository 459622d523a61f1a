"""Re-encode a dataset once into small-JPEG parquet shards that --dataset reads.

python recipes/prepare_data.py --help
"""

import argparse

from mpp.cli import OneLineParser, run_cli
from mpp.data.prepare import default_num_proc, prepare_dataset


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="prepare_data.py",
        description="Decode every image of SRC once, shrink it so its shorter side is at most --short-side (never "
        "enlarged), "
        "re-encode it as JPEG and write DST/<split>-NNNNN-of-NNNNN.parquet shards with the labels and class names. "
        "Training on DST then decodes small files instead of full-size photos. Unreadable images are counted and "
        "skipped.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "source",
        metavar="SRC",
        help="anything --dataset accepts: a built-in set, an imagefolder or save_to_disk folder, "
        "parquet files, .tar webdataset shards, a Hub id",
    )
    p.add_argument("dest", metavar="DST", help="a new or empty folder")
    p.add_argument(
        "--splits",
        nargs="+",
        default=None,
        help="splits to prepare (default: train, and validation and test where they exist)",
    )
    p.add_argument("--short-side", type=int, default=256, help="largest shorter side in pixels (FFCV's max resolution)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality, 1..95")
    p.add_argument("--shard-size", type=int, default=1000, help="most images per parquet shard")
    p.add_argument(
        "--num-proc",
        type=int,
        default=default_num_proc(),
        help="processes re-encoding in parallel (default: the cores)",
    )
    p.add_argument("--config", default=None, help="the Hub dataset's configuration name")
    p.add_argument("--image-column", default=None, help="image column (detected when there is only one)")
    return p


def summary(report: dict, dest: str) -> str:
    lines = []
    for split, r in report["splits"].items():
        skipped = (
            f", {r['bad_images']} unreadable skipped (e.g. {r['bad_examples'][0]['name']}: "
            f"{r['bad_examples'][0]['reason']})"
            if r["bad_images"]
            else ""
        )
        lines.append(f"{split}: {r['images']} images in {r['shards']} shards, {r['bytes'] / 2**20:.1f} MiB{skipped}")
    total = sum(r["bytes"] for r in report["splits"].values())
    lines.append(
        f"{total / 2**20:.1f} MiB written to {dest} in {report['seconds']:.0f} s (report: {dest}/prepare_report.json)"
    )
    lines.append(f"next: accelerate launch recipes/pretrain_mpp.py --dataset {dest}")
    return "\n".join(lines)


def main(argv=None):
    args = build_parser().parse_args(argv)
    report = prepare_dataset(
        args.source,
        args.dest,
        splits=args.splits,
        short_side=args.short_side,
        quality=args.quality,
        shard_size=args.shard_size,
        num_proc=args.num_proc,
        config=args.config,
        image_column=args.image_column,
    )
    print(summary(report, args.dest))
    return 0


def cli(argv=None):
    """The command line: `python -m mpp prepare`, recipes/prepare_data.py."""
    raise SystemExit(run_cli(main, argv))
