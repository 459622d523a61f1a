"""Step-level throughput: the MPP training step against the bare timm encoder step, against peers,
and as a share of this machine's own matmul rate (MFU).

    python benchmarks/bench_step.py                       # CPU defaults: ViT-S/16 at 224, batch 32
    python benchmarks/bench_step.py --device cuda --dtype bf16 --compile --model vit_base_patch16_224 --batch-size 128
    python benchmarks/bench_step.py --model eva02_tiny_patch14_224 --img-size 28 --patch-size 7   # any supported family

Arms are timed interleaved (A B A B ...) after a warm-up; each repeat times --steps steps; the
table gives the median images/s with min-max. FLOPs come from a stated formula (matmuls of the
blocks plus attention), checked against torch.utils.flop_counter.FlopCounterMode.
"""
import argparse
import statistics
import time
from pathlib import Path

import torch

from results_io import provenance, provenance_lines, write_results

from mpp.loop import fused_optimizer_kwargs
from mpp.model import MPPModel, create_encoder

RESULTS = Path(__file__).resolve().parent / "results"


def vit_forward_flops(depth: int, dim: int, tokens: int, mlp_ratio: float, patch_pixels: int, patches: int) -> dict:
    """Forward FLOPs (2 per multiply-add) of a ViT. linear: per block qkv 3TD^2, proj TD^2, MLP
    2rTD^2, plus the patch projection N(3p^2)D; attention: scores and weighted sum, 2T^2D per block."""
    linear = 2 * (depth * tokens * dim * dim * (4 + 2 * mlp_ratio) + patches * patch_pixels * dim)
    attention = 2 * depth * 2 * tokens * tokens * dim
    return {"linear": linear, "attention": attention, "total": linear + attention}


def counted_forward_flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return float(counter.get_total_flops())


def matmul_rate(device: str, dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """Measured FLOP/s of an n x n x n matmul: the machine's own peak for MFU."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    sync(device)
    return 2 * n**3 * count / (time.perf_counter() - start)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def adamw(params, device: str):
    """Every arm gets the recipes' optimiser: torch's AdamW, fused where torch has the kernel."""
    return torch.optim.AdamW(params, lr=1e-4, **fused_optimizer_kwargs("adamw", torch.device(device)))


def bare_step(encoder, optimizer, x):
    """The reference: timm's forward_features, a scalar loss, backward, AdamW."""
    def step():
        encoder(x).float().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def mpp_step(model, optimizer, images):
    """The whole MPP objective: corruption, targets, head, loss, backward, AdamW."""
    def step():
        model(images).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def peer_steps(args, device, dtype, batch) -> dict:
    """Peers at the same size, batch and precision, when installed (pip install transformers 'vit-pytorch==1.14.5')."""
    steps = {}
    try:
        from transformers import ViTConfig, ViTForMaskedImageModeling

        cfg = ViTConfig(image_size=args.img_size, patch_size=args.patch_size, hidden_size=args.dim, num_hidden_layers=args.depth,
                        num_attention_heads=args.heads, intermediate_size=int(args.dim * args.mlp_ratio), encoder_stride=args.patch_size)
        hf = ViTForMaskedImageModeling(cfg).to(device)
        opt = adamw(hf.parameters(), device)
        n = (args.img_size // args.patch_size) ** 2
        pixels = torch.randn(batch, 3, args.img_size, args.img_size, device=device)

        def hf_step():
            mask = torch.rand(batch, n, device=device) < 0.5  # SimMIM-style: mask tokens in the encoder
            with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                hf(pixel_values=pixels, bool_masked_pos=mask).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps["hf_vit_mim"] = hf_step
    except ImportError:
        pass
    try:
        from vit_pytorch import ViT
        from vit_pytorch.mpp import MPP

        vit = ViT(image_size=args.img_size, patch_size=args.patch_size, num_classes=1, dim=args.dim, depth=args.depth,
                  heads=args.heads, mlp_dim=int(args.dim * args.mlp_ratio)).to(device)
        # the paper's 50% corruption with 80/10/10 (its defaults give 49/50/1)
        mpp = MPP(transformer=vit, patch_size=args.patch_size, dim=args.dim, mask_prob=0.5, replace_prob=0.8, random_patch_prob=0.1).to(device)
        opt = adamw(mpp.parameters(), device)
        pixels = torch.rand(batch, 3, args.img_size, args.img_size, device=device)

        def vp_step():
            with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                mpp(pixels).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps["vit_pytorch_mpp"] = vp_step
    except ImportError:
        pass
    return steps


def time_arms(arms: dict, steps: int, repeats: int, warmup: int, device: str, batch: int) -> dict:
    for fn in arms.values():
        for _ in range(warmup):
            fn()
    sync(device)
    rates = {name: [] for name in arms}
    for _ in range(repeats):  # interleaved: A B A B ...
        for name, fn in arms.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            sync(device)
            rates[name].append(batch * steps / (time.perf_counter() - start))
    return {name: {"median": statistics.median(r), "min": min(r), "max": max(r)} for name, r in rates.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="vit_small_patch16_224", help="any supported timm ViT (VisionTransformer, DeiT, hybrid, Eva)")
    p.add_argument("--depth", type=int, default=None, help="blocks (default: the model's own)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="torch.compile both arms")
    p.add_argument("--peers", action="store_true", help="also time HF ViTForMaskedImageModeling and vit-pytorch MPP when installed")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--peak-n", type=int, default=2048, help="size of the n x n x n matmul whose rate is the MFU peak "
                   "(bf16 on a CPU without bf16 units takes about a minute per 2048^3 product)")
    p.add_argument("--out", default=str(RESULTS / "bench_step"), help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device on this machine; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = args.device, torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)

    arch = {"depth": args.depth} if args.depth else {}
    encoder = create_encoder(args.model, args.img_size, args.patch_size, **arch).to(device)
    args.dim, args.depth = encoder.embed_dim, len(encoder.blocks)
    hidden = next(m for m in encoder.blocks[0].mlp.modules() if isinstance(m, torch.nn.Linear)).out_features  # fc1, or SwiGLU's fc1_g
    args.heads, args.mlp_ratio = encoder.blocks[0].attn.num_heads, hidden / encoder.embed_dim
    mpp = MPPModel(create_encoder(args.model, args.img_size, args.patch_size, **arch)).to(device)
    opt_a = adamw(encoder.parameters(), device)
    opt_b = adamw([q for q in mpp.parameters() if q.requires_grad], device)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    images = torch.randint(0, 256, x.shape, dtype=torch.uint8, device=device)
    enc_fwd = encoder.forward_features
    model_b = mpp
    if args.compile:
        enc_fwd, model_b = torch.compile(enc_fwd), torch.compile(mpp)

    def autocast(fn):
        def run():
            with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                fn()
        return run

    arms = {"bare_timm": autocast(bare_step(enc_fwd, opt_a, x)), "mpp": autocast(mpp_step(model_b, opt_b, images))}
    if args.peers:
        arms.update(peer_steps(args, device, dtype, args.batch_size))
    rates = time_arms(arms, args.steps, args.repeats, args.warmup, device, args.batch_size)

    n = mpp.num_patches
    tokens = n + encoder.num_prefix_tokens
    # a hybrid's CNN stem is not in the formula (its patch projection is counted as one over the region)
    formula = vit_forward_flops(args.depth, args.dim, tokens, args.mlp_ratio, 3 * mpp.region[0] * mpp.region[1], n)
    counted = counted_forward_flops(encoder, x[:1])
    train_flops_per_image = 3 * formula["total"]  # forward + backward (2x forward)
    peak = matmul_rate(device, dtype, args.peak_n)
    rows = []
    for name, r in rates.items():
        rows.append({"arm": name, "images_per_sec": r["median"], "min": r["min"], "max": r["max"],
                     "vs_bare": r["median"] / rates["bare_timm"]["median"],
                     "mfu": r["median"] * train_flops_per_image / peak})
    attention_share = formula["attention"] / formula["total"]
    report = {
        **provenance("bench_step.py", argv, device),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "forward_flops_formula": formula, "forward_flops_counted": counted, "matmul_flops_per_sec": peak,
        "attention_share_of_block_flops": attention_share, "rows": rows,
    }
    write_results(args.out, report, markdown(report))
    return report


def markdown(r: dict) -> str:
    c = r["config"]
    lines = [f"# bench_step: {c['model']} at {c['img_size']} px / patch {c['patch_size']}, batch {c['batch_size']}, "
             f"{c['device']} {c['dtype']}{' compiled' if c['compile'] else ''}", "",
             *provenance_lines(r),
             f"Forward FLOPs per image: formula {r['forward_flops_formula']['total'] / 1e9:.4f} G "
             f"(linear {r['forward_flops_formula']['linear'] / 1e9:.4f} G + attention {r['forward_flops_formula']['attention'] / 1e9:.4f} G); "
             f"FlopCounterMode {r['forward_flops_counted'] / 1e9:.4f} G (on CPU it does not count the fused attention kernel). Measured matmul rate {r['matmul_flops_per_sec'] / 1e9:.1f} GFLOP/s "
             f"(MFU = images/s x 3 x forward FLOPs / that rate). Attention's share of the FLOPs: {r['attention_share_of_block_flops']:.1%}.", "",
             "| arm | images/s (median) | min–max | vs bare timm step | MFU |", "|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['arm']} | {row['images_per_sec']:.1f} | {row['min']:.1f}–{row['max']:.1f} | {row['vs_bare']:.3f} | {row['mfu']:.1%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
