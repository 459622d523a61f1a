"""Push a finished run folder (a timm hub folder) to the Hugging Face Hub.  python -m mpp push --help"""

import argparse
from pathlib import Path

from mpp.cli import OneLineParser, run_cli
from mpp.models.publish import check_can_push, check_hub_folder, publish


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="push_to_hub.py",
        description="Upload a finished pretraining or fine-tuning run folder (model.safetensors, timm's config.json, "
        "the model "
        "card README.md, run_config.json, metrics.jsonl and summary.json, absolute local paths replaced; nothing else) "
        "to a "
        "Hugging Face model repo, created if needed. "
        "It then loads anywhere with timm.create_model('hf-hub:REPO_ID', pretrained=True).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run folder")
    p.add_argument("repo_id", metavar="REPO_ID", help="USER/NAME or ORG/NAME")
    p.add_argument(
        "--private",
        action="store_true",
        help="the repo must be private: created private, an existing public repo refused",
    )
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    run_dir = Path(args.run_dir)
    check_hub_folder(run_dir)
    check_can_push(args.repo_id, flag="REPO_ID", private=args.private)
    publish(run_dir, args.repo_id, args.private)
    return 0


def cli(argv=None):
    """The command line: `python -m mpp push`, recipes/push_to_hub.py."""
    raise SystemExit(run_cli(main, argv))
