"""How the MPP step scales: throughput and peak memory against batch size and sequence length
(image size / patch size), and what timm's gradient checkpointing trades.

    python benchmarks/bench_scaling.py

Each configuration runs in its own process, so its memory is its own. Two memory columns, one
definition each:
  - "peak RSS growth MB": growth of the process's peak resident set (ru_maxrss) over its value just
    before the timed steps (model, optimiser state and inputs already built): host memory, any device;
  - "CUDA max allocated MB": torch.cuda.max_memory_allocated over the timed steps: the most device
    memory held at once, model and optimiser state included (n/a on CPU).
The machine's load average before and after the sweep is recorded.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from results_io import load_average, provenance, provenance_lines, write_results

RESULTS = Path(__file__).resolve().parent / "results"


def measure(model_name: str, img_size: int, patch: int, batch: int, grad_ckpt: bool, steps: int, device: str) -> dict:
    """In this process: images/s and memory of the MPP training step (see the module docstring for the two columns)."""
    from mpp.models.model import MPP, create_encoder
    from mpp.training.schedule import fused_optimizer_kwargs

    torch.manual_seed(0)
    encoder = create_encoder(model_name, img_size, patch)
    encoder.set_grad_checkpointing(grad_ckpt)
    model = MPP(encoder).to(device)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=1e-4,
        **fused_optimizer_kwargs("adamw", torch.device(device)),
    )
    images = torch.randint(0, 256, (batch, 3, img_size, img_size), dtype=torch.uint8, device=device)
    model(images[:1]).loss.backward()  # optimizer state and allocator warm, then measure from here
    opt.step()
    opt.zero_grad(set_to_none=True)
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        model(images).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    rate = batch * steps / (time.perf_counter() - start)
    return {
        "images_per_sec": rate,
        "rss_peak_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kb)
        / 1024,  # ru_maxrss is in KiB on Linux
        "cuda_max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
    }


def attention_share(tokens: int, dim: int, mlp_ratio: float = 4.0) -> float:
    """Share of a block's FLOPs in attention (2T^2D of T D^2 (4 + 2r) + 2T^2D): grows with T."""
    return 2 * tokens * dim / (dim * dim * (4 + 2 * mlp_ratio) + 2 * tokens * dim)


def child(config: dict) -> dict:
    """One configuration in a fresh process."""
    code = (
        f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_scaling as b; "
        f"print(json.dumps(b.measure(**{config!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--img-size", type=int, default=224, help="for the batch sweep")
    p.add_argument(
        "--img-sizes", type=int, nargs="+", default=[96, 160, 224, 288], help="for the sequence-length sweep"
    )
    p.add_argument("--batch-size", type=int, default=8, help="for the sequence-length and checkpointing sweeps")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default=str(RESULTS / "bench_scaling"))
    args = p.parse_args(argv)
    from timm import create_model

    dim = create_model(args.model, pretrained=False).embed_dim
    load_before = load_average()
    common = dict(model_name=args.model, patch=args.patch_size, steps=args.steps, device=args.device)
    rows = []
    for batch in args.batch_sizes:
        rows.append(
            {
                "sweep": "batch",
                "batch": batch,
                "img_size": args.img_size,
                "grad_ckpt": False,
                **child(dict(common, img_size=args.img_size, batch=batch, grad_ckpt=False)),
            }
        )
    for size in args.img_sizes:
        rows.append(
            {
                "sweep": "sequence",
                "batch": args.batch_size,
                "img_size": size,
                "grad_ckpt": False,
                **child(dict(common, img_size=size, batch=args.batch_size, grad_ckpt=False)),
            }
        )
    for ckpt in (False, True):
        rows.append(
            {
                "sweep": "grad_checkpointing",
                "batch": args.batch_size,
                "img_size": args.img_size,
                "grad_ckpt": ckpt,
                **child(dict(common, img_size=args.img_size, batch=args.batch_size, grad_ckpt=ckpt)),
            }
        )
    for row in rows:
        row["tokens"] = (row["img_size"] // args.patch_size) ** 2 + 1
        row["attention_flop_share"] = attention_share(row["tokens"], dim)
    report = {
        **provenance("bench_scaling.py", argv, args.device),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
    }
    write_results(args.out, report, markdown(report))
    return report


def mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def markdown(r: dict) -> str:
    c = r["config"]
    lines = [
        f"# bench_scaling: the MPP step of {c['model']} (patch {c['patch_size']}), {c['device']} fp32",
        "",
        *provenance_lines(r),
        "peak RSS growth MB: growth of the process's peak resident set over its value just before the timed steps "
        "(host memory; model, optimiser state and inputs not counted). CUDA max allocated MB: "
        "torch.cuda.max_memory_allocated "
        "over the timed steps (device memory held at once, model and optimiser state included; n/a on CPU).",
        "",
        "| sweep | batch | image | tokens | attention share of FLOPs | images/s | peak RSS growth MB | CUDA max "
        "allocated MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        sweep = row["sweep"] + (" on" if row["grad_ckpt"] else " off" if row["sweep"] == "grad_checkpointing" else "")
        lines.append(
            f"| {sweep} | {row['batch']} | {row['img_size']} | {row['tokens']} | {row['attention_flop_share']:.1%} | "
            f"{row['images_per_sec']:.2f} | {row['rss_peak_growth_mb']:.0f} | {mb(row['cuda_max_allocated_mb'])} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
