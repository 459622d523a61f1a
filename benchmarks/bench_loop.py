"""The whole training loop of recipes/pretrain_mpp.py against the bare timm step on the same batch.

    python benchmarks/bench_loop.py            # default recipe settings, built-in data and JPEGs

For each dataset, --repeats times interleaved (bare, loop, bare, loop, ..., bare): the loop's
steady images/s (median of its logged windows after the first, from metrics.jsonl of a real recipe
run) against the mean of the bare encoder step's images/s measured just before and just after it;
the median of those ratios with their min-max. Where the time goes: the loop's own data_wait_share
(time spent waiting for the loader, from metrics.jsonl) and the data pipeline alone (decode +
augmentation + collate) as a share of the bare step.
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
from mpp.loop import fused_optimizer_kwargs
from mpp.data import AugmentedImages, collate_images, find_image_column, load_images, train_transform
from mpp.model import create_encoder

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def bare_rate(cfg: PretrainConfig, steps: int) -> tuple[float, float]:
    """(images/s, CPU cores busy) of timm's forward_features + mean + backward + fused AdamW on one fixed
    batch. images/s from the median step time (a scheduler hiccup in a few steps does not move it;
    the loop's rate is a median over its logged windows too); cores busy = CPU time / wall time,
    which says how much CPU is left to hide data loading behind the step."""
    torch.manual_seed(0)
    encoder = create_encoder(cfg.model, cfg.img_size, cfg.patch_size)
    opt = torch.optim.AdamW(encoder.parameters(), lr=1e-4, **fused_optimizer_kwargs("adamw", torch.device("cpu")))  # as the recipe
    x = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size)
    times = []
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            cpu_start, wall_start = time.process_time(), time.perf_counter()
        start = time.perf_counter()
        encoder.forward_features(x).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    cores = (time.process_time() - cpu_start) / (time.perf_counter() - wall_start)
    return cfg.batch_size / statistics.median(times[2:]), cores


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


def loop_rate(dataset: str, steps: int, extra: list[str]) -> tuple[float, float, float]:
    """(images/s, data_wait_share, wall seconds) of a real recipe run; the first two are medians of
    the logged windows after the first (which holds the start-up)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, str(ROOT / "recipes" / "pretrain_mpp.py"), *extra, "--dataset", dataset, "--max-steps", str(steps),
               "--log-every", "10", "--no-progress", "--output-dir", str(out)]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
        wall = time.perf_counter() - start
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = records[1:] or records
    return statistics.median(r["images_per_sec"] for r in steady), statistics.median(r["data_wait_share"] for r in steady), wall


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
    p.add_argument("--bare-steps", type=int, default=20, help="timed steps of each bare measurement")
    p.add_argument("--repeats", type=int, default=3, help="recipe runs per dataset, each between two bare measurements")
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
            bare = [bare_rate(cfg, args.bare_steps)]
            loops = []
            for _ in range(args.repeats):
                loops.append(loop_rate(dataset, args.steps, extra))
                bare.append(bare_rate(cfg, args.bare_steps))
            bare, cores = [rate for rate, _ in bare], [busy for _, busy in bare]
            ratios = [rate / ((before + after) / 2) for (rate, _, _), before, after in zip(loops, bare, bare[1:])]
            data = data_rate(cfg, dataset, batches=10)
            bare_median = statistics.median(bare)
            rows.append({"dataset": "imagefolder of JPEGs" if dataset != cfg.dataset else dataset,
                         "bare_images_per_sec": bare_median, "bare_runs": bare, "bare_cpu_cores": statistics.median(cores),
                         "loop_images_per_sec": statistics.median(rate for rate, _, _ in loops), "loop_runs": [rate for rate, _, _ in loops],
                         "loop_vs_bare": statistics.median(ratios), "loop_vs_bare_min": min(ratios), "loop_vs_bare_max": max(ratios),
                         "data_wait_share": statistics.median(wait for _, wait, _ in loops),
                         "data_only_images_per_sec": data, "data_time_share": bare_median / data,
                         "recipe_wall_s": [wall for _, _, wall in loops]})
    report = {
        **provenance("bench_loop.py", argv),
        "config": {"model": cfg.model, "img_size": cfg.img_size, "patch_size": cfg.patch_size, "batch_size": cfg.batch_size,
                   "steps": args.steps, "repeats": args.repeats, "workers": cfg.workers},
        "rows": rows,
    }
    write_results(args.out, report, markdown(report))
    return report


def markdown(r: dict) -> str:
    c = r["config"]
    lines = [f"# bench_loop: recipes/pretrain_mpp.py vs the bare timm step ({c['model']}, {c['img_size']} px / patch "
             f"{c['patch_size']}, batch {c['batch_size']}, {c['steps']} steps, {c['repeats']} interleaved repeats)", "",
             *provenance_lines(r),
             "loop / bare: median (min-max) over the repeats of the loop's images/s against the mean of the bare step's "
             "just before and after it. loop waits: the share of the loop's time spent waiting for the data loader "
             "(its metrics.jsonl `data_wait_share`). bare step cores: CPU time / wall time of the bare step (what is "
             "left of the machine's cores could hide data loading). data alone: the data pipeline's time per batch as a share of the bare "
             "step's (with no worker processes it adds to the step).", "",
             "| dataset | bare step img/s | bare step cores | loop img/s | loop / bare | loop waits for data | data alone img/s | data alone / bare step |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['dataset']} | {row['bare_images_per_sec']:.1f} | {row['bare_cpu_cores']:.2f} of {os.cpu_count()} | "
                     f"{row['loop_images_per_sec']:.1f} | "
                     f"**{row['loop_vs_bare']:.3f}** ({row['loop_vs_bare_min']:.3f}–{row['loop_vs_bare_max']:.3f}) | "
                     f"{row['data_wait_share']:.1%} | {row['data_only_images_per_sec']:.0f} | {row['data_time_share']:.1%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
