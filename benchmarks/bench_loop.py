"""The whole training loop of recipes/pretrain_mpp.py (under `accelerate launch`) against the bare timm step.

    python benchmarks/bench_loop.py                    # CPU: default recipe settings, mnist5k and JPEGs
    python benchmarks/bench_loop.py --device cuda --dtype bf16 --compile --jpegs 2560 --steps 200 \\
        --decodes cpu gpu --datasets jpegs \\
        --recipe-args "--model vit_base_patch16_224 --img-size 224 --patch-size 16 --batch-size 128"

One estimator for both sides: images/s over windows of --window optimiser steps, the median over the
windows after the first (which holds start-up and compilation). The bare step (timm's forward_features
+ mean + backward + fused AdamW on one fixed batch; autocast and torch.compile as the loop's) is timed
in the same windows, --repeats times interleaved with the recipe runs (bare, loop, bare, loop, ...,
bare); each loop run is compared with the mean of the bare measurements just before and after it.
Also reported per recipe run: the slowest window against the median (an epoch-start dip shows here),
the share of time the loop waited for data (metrics.jsonl), and end-to-end images/s = all images /
the wall time of the whole `accelerate launch` (start-up, data loading, compilation, checkpoints).
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

from mpp.models.model import create_encoder
from mpp.training.pretrain_config import PretrainConfig
from mpp.training.schedule import fused_optimizer_kwargs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bare_rate(cfg: PretrainConfig, device: str, dtype: str, compile: bool, windows: int, window: int) -> float:
    """Median images/s over `windows` windows of `window` steps, after warm-up (and compilation)."""
    torch.manual_seed(0)
    encoder = create_encoder(cfg.model, cfg.img_size, cfg.patch_size).to(device)
    opt = torch.optim.AdamW(
        encoder.parameters(), lr=1e-4, **fused_optimizer_kwargs("adamw", torch.device(device))
    )  # as the recipe
    forward = torch.compile(encoder.forward_features) if compile else encoder.forward_features
    x = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, device=device)

    def step():
        with torch.autocast(device, dtype=DTYPES[dtype], enabled=DTYPES[dtype] is not None):
            loss = forward(x).float().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up, compilation
        step()
    rates = []
    for _ in range(windows):
        sync(device)
        start = time.perf_counter()
        for _ in range(window):
            step()
        sync(device)
        rates.append(window * cfg.batch_size / (time.perf_counter() - start))
    encoder = opt = None  # freed before the cache is emptied
    if device == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(rates)


def loop_run(
    dataset: str, steps: int, window: int, extra: list[str], device: str, dtype: str, compile: bool, decode: str
) -> dict:
    """One recipe run under accelerate launch: its windows' images/s (median after the first, slowest),
    data waiting, and end-to-end images/s over the launch's whole wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        launch = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no" if dtype == "fp32" else dtype,
        ]
        if device == "cpu":
            launch += ["--cpu", "--num_cpu_threads_per_process", str(len(os.sched_getaffinity(0)))]
        cmd = [
            *launch,
            str(ROOT / "recipes" / "pretrain_mpp.py"),
            *extra,
            "--dataset",
            dataset,
            "--log-every",
            str(window),
            "--decode",
            decode,
            "--no-progress",
            "--output-dir",
            str(out),
            *(["--max-steps", str(steps)] if steps else []),
            *(["--compile"] if compile else []),
        ]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
        wall = time.perf_counter() - start
        if proc.returncode:
            raise RuntimeError(f"recipe failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        config = json.loads((out / "run_config.json").read_text())
    windows = [r for r in records if "images_per_sec" in r]
    steady = windows[1:] or windows
    rates = [r["images_per_sec"] for r in steady]
    total_steps = windows[-1]["step"]
    return {
        "images_per_sec": statistics.median(rates),
        "slowest_window": min(rates),
        "windows": rates,
        "epoch_of_window": [r["epoch"] for r in steady],
        "data_wait_share": statistics.median(r["data_wait_share"] for r in steady),
        "data_wait_share_max": max(r["data_wait_share"] for r in steady),
        "wall_s": wall,
        "steps": total_steps,
        "end_to_end_images_per_sec": total_steps * config["batch_size"] / wall,
        "workers": config["derived"]["loader_workers"],
    }


def jpeg_folder(root: Path, count: int, photos: str) -> Path:
    """ImageNet-like JPEGs (bench_data.imagenet_like: 500x375 photographs at quality 90) in an imagefolder."""
    from bench_data import imagenet_like

    imagenet_like(root / "jpegs", count, photos_dir=photos)
    return root / "jpegs"


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=tuple(DTYPES),
        help="the loop's mixed precision (accelerate) and the bare step's autocast",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the bare step and the recipe (--compile)")
    p.add_argument(
        "--steps", type=int, default=60, help="optimiser steps of each recipe run (0: the recipe's default length)"
    )
    p.add_argument("--window", type=int, default=10, help="steps per timing window (the recipe's --log-every)")
    p.add_argument("--bare-windows", type=int, default=4, help="timed windows of each bare measurement")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="recipe runs per dataset and decode path, each between two bare measurements",
    )
    p.add_argument("--jpegs", type=int, default=2000, help="ImageNet-like JPEGs of the imagefolder arm (0: skip it)")
    p.add_argument(
        "--photos",
        default="/usr/share/backgrounds/mate/nature",
        help="photographs the JPEGs are cut from (see bench_data.py)",
    )
    p.add_argument(
        "--datasets",
        nargs="+",
        default=["recipe", "jpegs"],
        choices=("recipe", "jpegs"),
        help="recipe: the recipe's --dataset (default mnist5k); jpegs: the ImageNet-like imagefolder",
    )
    p.add_argument(
        "--decodes",
        nargs="+",
        default=["cpu"],
        choices=("cpu", "pil", "gpu"),
        help="--decode paths to run on the JPEGs",
    )
    p.add_argument("--recipe-args", default="", help="extra recipe flags, e.g. '--model test_vit --batch-size 32'")
    p.add_argument("--out", default=str(RESULTS / "bench_loop"))
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU here")
    extra = args.recipe_args.split()
    from mpp.commands.pretrain import parse_config

    cfg = parse_config(extra)
    if args.device == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)))  # as the recipe does on CPU
    bare_args = (args.device, args.dtype, args.compile, args.bare_windows, args.window)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        arms = [(cfg.dataset, cfg.dataset, "cpu")] if "recipe" in args.datasets else []
        if "jpegs" in args.datasets and args.jpegs:
            folder = str(jpeg_folder(Path(tmp), args.jpegs, args.photos))
            arms += [(f"ImageNet-like JPEGs, --decode {d}", folder, d) for d in args.decodes]
        for name, dataset, decode in arms:
            bare = [bare_rate(cfg, *bare_args)]
            loops = []
            for _ in range(args.repeats):
                loops.append(
                    loop_run(dataset, args.steps, args.window, extra, args.device, args.dtype, args.compile, decode)
                )
                bare.append(bare_rate(cfg, *bare_args))
            ratios = [
                run["images_per_sec"] / ((before + after) / 2) for run, before, after in zip(loops, bare, bare[1:])
            ]
            e2e = [
                run["end_to_end_images_per_sec"] / ((before + after) / 2)
                for run, before, after in zip(loops, bare, bare[1:])
            ]
            rows.append(
                {
                    "dataset": name,
                    "bare_images_per_sec": statistics.median(bare),
                    "bare_runs": bare,
                    "loop_images_per_sec": statistics.median(r["images_per_sec"] for r in loops),
                    "loop_vs_bare": statistics.median(ratios),
                    "loop_vs_bare_min": min(ratios),
                    "loop_vs_bare_max": max(ratios),
                    "slowest_window_vs_median": min(r["slowest_window"] / r["images_per_sec"] for r in loops),
                    "data_wait_share": statistics.median(r["data_wait_share"] for r in loops),
                    "data_wait_share_max": max(r["data_wait_share_max"] for r in loops),
                    "end_to_end_vs_bare": statistics.median(e2e),
                    "workers": loops[0]["workers"],
                    "runs": loops,
                }
            )
            print(
                f"{name}: loop/bare {rows[-1]['loop_vs_bare']:.3f}, slowest window "
                f"{rows[-1]['slowest_window_vs_median']:.2f} of the median, "
                f"end-to-end/bare {rows[-1]['end_to_end_vs_bare']:.3f}",
                flush=True,
            )
    report = {
        **provenance("bench_loop.py", argv, args.device),
        "config": {
            "model": cfg.model,
            "img_size": cfg.img_size,
            "patch_size": cfg.patch_size,
            "batch_size": cfg.batch_size,
            "steps": args.steps,
            "window": args.window,
            "repeats": args.repeats,
            "device": args.device,
            "dtype": args.dtype,
            "compile": args.compile,
            "cpus": len(os.sched_getaffinity(0)),
        },
        "load_average_after": os.getloadavg(),
        "rows": rows,
    }
    write_results(args.out, report, markdown(report))
    return report


def markdown(r: dict) -> str:
    c = r["config"]
    steps = f"{c['steps']} steps" if c["steps"] else "the recipe's default length"
    lines = [
        f"# bench_loop: recipes/pretrain_mpp.py under accelerate launch vs the bare timm step ({c['model']}, "
        f"{c['img_size']} px / patch "
        f"{c['patch_size']}, batch {c['batch_size']}, {c['device']} "
        f"{c['dtype']}{', compiled' if c['compile'] else ''}, "
        f"{steps}, "
        f"{c['repeats']} interleaved repeats)",
        "",
        *provenance_lines(r),
        "",
        f"Both sides measured the same way: images/s over windows of {c['window']} optimiser steps, the median over "
        "windows after the "
        "first. loop / bare: median (min-max) over the repeats of the loop's rate against the mean of the bare step's "
        "just before "
        "and after it. slowest window: the slowest window of any run against that run's median (an epoch-start dip "
        "shows here). "
        "waits: the share of the loop's time spent waiting for the data loader (median; max). end-to-end: all images / "
        "the wall "
        f"time of the whole launch, start-up and compilation included, against the bare step. {c['cpus']} CPUs.",
        "",
        "| data | workers | bare step img/s | loop img/s | loop / bare | slowest window | loop waits for data | "
        "end-to-end / bare |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['dataset']} | {row['workers']} | {row['bare_images_per_sec']:.1f} | "
            f"{row['loop_images_per_sec']:.1f} | "
            f"**{row['loop_vs_bare']:.3f}** ({row['loop_vs_bare_min']:.3f}–{row['loop_vs_bare_max']:.3f}) | "
            f"{row['slowest_window_vs_median']:.2f} | {row['data_wait_share']:.1%}; {row['data_wait_share_max']:.1%} | "
            f"{row['end_to_end_vs_bare']:.3f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
