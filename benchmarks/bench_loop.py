"""The whole training loop of recipes/pretrain_mpp.py against the bare timm step on the same batch.

    python benchmarks/bench_loop.py            # default recipe settings, built-in data and JPEGs

For each dataset: the loop's steady images/s (median of its logged windows after the first, from
metrics.jsonl of a real recipe run), the bare encoder step's images/s measured just before and
just after it (their mean), and the data pipeline alone (decode + augmentation + collate), which
says whether the loop waits for data.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from results_io import provenance, provenance_lines, write_results

from mpp.config import PretrainConfig
from mpp.data import AugmentedImages, collate_images, find_image_column, load_images, train_transform
from mpp.model import create_encoder

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def bare_rate(cfg: PretrainConfig, steps: int) -> float:
    """images/s of timm's forward_features + mean + backward + AdamW on one fixed batch."""
    torch.manual_seed(0)
    encoder = create_encoder(cfg.model, cfg.img_size, cfg.patch_size)
    opt = torch.optim.AdamW(encoder.parameters(), lr=1e-4)
    x = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size)
    for i in range(steps + 2):
        if i == 2:
            start = time.perf_counter()
        encoder.forward_features(x).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return cfg.batch_size * steps / (time.perf_counter() - start)


def data_rate(cfg: PretrainConfig, dataset: str, batches: int) -> float:
    """images/s of the data pipeline alone, as the loop runs it (same transform, same collate)."""
    ds = load_images(dataset)
    images = AugmentedImages(ds, find_image_column(ds), train_transform(cfg.img_size, cfg.crop_scale, cfg.hflip), cfg.seed)
    loader = torch.utils.data.DataLoader(images, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate_images, drop_last=True)
    it = iter(loader)
    next(it)  # warm-up
    start, count = time.perf_counter(), 0
    for _ in range(min(batches, len(loader) - 1)):
        count += next(it)["pixels"].shape[0]
    return count / (time.perf_counter() - start)


def loop_rate(dataset: str, steps: int, extra: list[str]) -> tuple[float, float]:
    """(median images/s of the logged windows after the first, wall seconds) of a real recipe run."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, str(ROOT / "recipes" / "pretrain_mpp.py"), *extra, "--dataset", dataset, "--max-steps", str(steps),
               "--log-every", "10", "--no-progress", "--output-dir", str(out)]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
        wall = time.perf_counter() - start
        rates = [json.loads(line)["images_per_sec"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(rates[1:] or rates), wall


def jpeg_folder(root: Path, count: int) -> Path:
    """count JPEGs (64 px colour crops) in an imagefolder: decoding from disk in the loop."""
    from PIL import Image

    from mpp.builtin_data import photos

    folder = root / "jpegs" / "all"
    folder.mkdir(parents=True)
    for i, row in enumerate(photos(num_crops=count).with_format("numpy")):
        Image.fromarray(row["image"].astype("uint8")).save(folder / f"{i:05d}.jpg", quality=90)
    return root / "jpegs"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="optimiser steps of each recipe run")
    p.add_argument("--bare-steps", type=int, default=10)
    p.add_argument("--jpegs", type=int, default=2000, help="JPEG files of the imagefolder arm (0: skip it)")
    p.add_argument("--recipe-args", default="", help="extra recipe flags, e.g. '--model test_vit --batch-size 32'")
    p.add_argument("--out", default=str(RESULTS / "bench_loop"))
    args = p.parse_args(argv)
    extra = args.recipe_args.split()
    from mpp.cli import parse_config

    cfg = parse_config(extra)
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # as the recipe does on CPU
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        datasets = [cfg.dataset] + ([str(jpeg_folder(Path(tmp), args.jpegs))] if args.jpegs else [])
        for dataset in datasets:
            before = bare_rate(cfg, args.bare_steps)
            loop, wall = loop_rate(dataset, args.steps, extra)
            after = bare_rate(cfg, args.bare_steps)
            bare = (before + after) / 2
            data = data_rate(cfg, dataset, batches=10)
            rows.append({"dataset": "imagefolder of JPEGs" if dataset != cfg.dataset else dataset, "bare_images_per_sec": bare,
                         "bare_before": before, "bare_after": after, "loop_images_per_sec": loop, "loop_vs_bare": loop / bare,
                         "data_only_images_per_sec": data, "data_time_share": bare / data, "recipe_wall_s": wall})
    report = {
        **provenance("bench_loop.py", argv),
        "config": {"model": cfg.model, "img_size": cfg.img_size, "patch_size": cfg.patch_size, "batch_size": cfg.batch_size,
                   "steps": args.steps, "workers": cfg.workers},
        "rows": rows,
    }
    write_results(args.out, report, markdown(report))
    return report


def markdown(r: dict) -> str:
    c = r["config"]
    lines = [f"# bench_loop: recipes/pretrain_mpp.py vs the bare timm step ({c['model']}, {c['img_size']} px / patch "
             f"{c['patch_size']}, batch {c['batch_size']}, {c['steps']} steps)", "",
             *provenance_lines(r),
             "data share: time the data pipeline alone needs per batch, as a share of the bare step's time "
             "(with no worker processes it adds to the step; under 1 it could be hidden by workers).", "",
             "| dataset | bare step img/s (before / after) | loop img/s | loop / bare | data only img/s | data share |",
             "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['dataset']} | {row['bare_images_per_sec']:.1f} ({row['bare_before']:.1f} / {row['bare_after']:.1f}) | "
                     f"{row['loop_images_per_sec']:.1f} | {row['loop_vs_bare']:.3f} | {row['data_only_images_per_sec']:.0f} | {row['data_time_share']:.1%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
