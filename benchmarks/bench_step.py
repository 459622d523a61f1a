"""Step-level throughput: the MPP training step against the bare timm encoder step and against peers,
and the model FLOP utilisation (MFU) against two denominators.

    python benchmarks/bench_step.py                       # CPU defaults: ViT-S/16 at 224, batch 32
    python benchmarks/bench_step.py --device cuda --dtype bf16 --compile --model vit_base_patch16_224 --batch-size 128
    python benchmarks/bench_step.py --model eva02_tiny_patch14_224 --img-size 28 --patch-size 7   # any supported family

After a warm-up, each repeat times --steps steps of every arm, in an order that changes per repeat
(rotations of a shuffle seeded by --seed: each arm takes each place once per cycle; orders recorded).
The table gives each arm's median images/s with min-max,
and its ratio to the bare timm step as the mean of the per-repeat ratios (both arms timed in the same
repeat) with a 95% Student-t interval over repeats. The machine's load average before and after is
recorded. FLOPs come from a stated formula (matmuls of the blocks plus attention), checked against
torch.utils.flop_counter.FlopCounterMode; training FLOPs = 3 x forward.

MFU = images/s x training FLOPs per image / a peak, against two peaks:
  - "vs spec peak": the card's dense datasheet peak for the precision (benchmarks/peaks.py); n/a for a
    card not in that table, a CPU included;
  - "vs best measured GEMM": the highest rate of any GEMM measured in this run: square --peak-n sizes
    and the model's own forward linears (batch x tokens rows), one reading each per repeat, timed
    between the arms in the rotated order, the max kept.
"""

import argparse
import random
import statistics
import time
from pathlib import Path

import torch
from peaks import gemm_round, model_gemm_shapes, spec_peak, sync
from results_io import load_average, package_versions, provenance, provenance_lines, write_results

from mpp.evaluation.stats import paired_difference
from mpp.models.attention_kernel import SDPA_BACKENDS
from mpp.models.model import MPP, create_encoder
from mpp.training.fast_paths import FP8_LAYERS, convert_to_fp8
from mpp.training.run_config import COMPILE_MODES
from mpp.training.schedule import fused_optimizer_kwargs

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


# Each lever is one more MPP arm, alone on top of the "mpp" arm's settings (compiled when --compile is given):
# fp8-RECIPE[-LAYERS] (torchao float8 training, mpp.training.fast_paths), sdpa-BACKEND (one attention kernel),
# compile-MODE (torch.compile with that mode, e.g. max-autotune, which adds CUDA graphs), grad-checkpointing
# (timm's activation checkpointing: less activation memory for recomputing each block's forward), batch-x2
# (twice the batch: its rate counts its own images, so it shows what a bigger batch buys per image).
LEVERS = (
    [
        f"fp8-{r}" + ("" if layers == "auto" else f"-{layers}")
        for r in ("tensorwise", "rowwise")
        for layers in FP8_LAYERS
    ]
    + [f"sdpa-{b}" for b in SDPA_BACKENDS if b != "auto"]
    + [f"compile-{m}" for m in COMPILE_MODES]
    + ["grad-checkpointing", "batch-x2"]
)


def lever_arm(lever: str, build_mpp, device: str, images, compile: bool):
    """(step, what changed): a fresh MPP model with one lever applied, its optimiser and its step. What changed
    holds "batch_size", the images one step takes (B, or 2B for batch-x2)."""
    model, mode, changed = build_mpp(), None, {}
    if lever.startswith("fp8-"):
        recipe, _, layers = lever.removeprefix("fp8-").partition("-")
        changed["fp8_layers"] = convert_to_fp8(model.encoder, recipe, layers or "auto")
        if not changed["fp8_layers"]:
            changed["note"] = "no layer passed the filter: the arm is the plain MPP step"
    elif lever.startswith("sdpa-"):
        model.sdpa_backend = lever.removeprefix("sdpa-")  # applied inside MPP.forward, where torch.compile sees it
    elif lever == "grad-checkpointing":
        model.encoder.set_grad_checkpointing(True)
    elif lever == "batch-x2":
        images = torch.cat([images, images.flip(0)])  # (2B, 3, H, W)
    else:
        mode = lever.removeprefix("compile-")
    optimizer = adamw([q for q in model.parameters() if q.requires_grad], device)
    if compile or mode:
        model = torch.compile(model, mode=None if mode == "default" else mode)
    changed["batch_size"] = len(images)  # what the step takes, whichever lever changed it
    return mpp_step(model, optimizer, images), changed


def attention_ops(step) -> list[str]:
    """The attention operators one step runs (torch's profiler, CPU side, which sees the operators a compiled
    graph calls too): which kernel an arm really used; an empty list means the math path (matmuls and softmax)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sorted({e.name for e in prof.events() if e.name.startswith("aten::") and "attention" in e.name})


PEER_PACKAGES = ["transformers", "vit-pytorch"]


def hf_vit_config(args) -> dict:
    """HF ViTConfig arguments for the same encoder: width, depth, heads (head width = dim / heads), MLP size."""
    return dict(
        image_size=args.img_size,
        patch_size=args.patch_size,
        hidden_size=args.dim,
        num_hidden_layers=args.depth,
        num_attention_heads=args.heads,
        intermediate_size=int(args.dim * args.mlp_ratio),
        encoder_stride=args.patch_size,
    )


def vit_pytorch_config(args) -> tuple[dict, dict]:
    """vit-pytorch ViT and MPP arguments for the same encoder. dim_head is given: its default is 64
    whatever dim and heads are, which builds a different attention unless dim / heads is 64."""
    vit = dict(
        image_size=args.img_size,
        patch_size=args.patch_size,
        num_classes=1,
        dim=args.dim,
        depth=args.depth,
        heads=args.heads,
        dim_head=args.dim // args.heads,
        mlp_dim=int(args.dim * args.mlp_ratio),
    )
    # the paper's 50% corruption with 80/10/10 (its defaults give 49/50/1)
    mpp = dict(patch_size=args.patch_size, dim=args.dim, mask_prob=0.5, replace_prob=0.8, random_patch_prob=0.1)
    return vit, mpp


def peer_steps(args, device, dtype, batch) -> dict:
    """Peers at the same size, batch and precision, when installed (pip install transformers 'vit-pytorch==1.14.5')."""
    steps = {}
    try:
        from transformers import ViTConfig, ViTForMaskedImageModeling

        hf = ViTForMaskedImageModeling(ViTConfig(**hf_vit_config(args))).to(device)
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

        vit_kwargs, mpp_kwargs = vit_pytorch_config(args)
        mpp = MPP(transformer=ViT(**vit_kwargs).to(device), **mpp_kwargs).to(device)
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


GEMM = "gemm"  # the GEMM round's place in a repeat's order
REFERENCE = "bare_timm"  # the arm every ratio divides by


def arm_orders(names: list[str], repeats: int, seed: int) -> list[list[str]]:
    """Rotations of a seeded shuffle: within each cycle of len(names) repeats every arm takes every
    position once (none always runs first, warmest caches or coolest chip); each cycle starts from a
    fresh shuffle, so neighbours change too."""
    rng, orders = random.Random(seed), []
    for r in range(repeats):
        shift = r % len(names)
        if shift == 0:
            base = rng.sample(names, len(names))
        orders.append(base[shift:] + base[:shift])
    return orders


def warm_up(arms: dict, warmup: int, device: str, budget: float | None = None, clock=time.perf_counter) -> dict:
    """Run each arm's warm-up steps (where torch.compile compiles), in place: an arm that raises there, a lever a
    card or a torch version cannot run, is left out of the timing with its one-line error instead of ending the
    whole run (on a lent GPU the other arms' numbers are what the session's minutes bought); the reference arm
    must warm up. Returns, per arm, its warm-up seconds, its peak CUDA memory over the warm-up above what was
    resident before it (what its activations, gradients and optimiser state need; all arms' weights stay
    resident), the attention operators one more step runs, and the error of an arm that failed. Progress goes
    to stdout as it happens, so a run killed by a timeout still tells how far it got.
    Once `budget` seconds have gone on warm-ups (mostly compiling), the arms not yet warmed are left out, so that
    a run under a hard time limit still reaches its timed repeats."""
    warmed = {"seconds": {}, "peak_bytes": {}, "attention_ops": {}, "failed": {}}
    began = clock()
    for name in list(arms):
        start = clock()
        if budget is not None and start - began > budget and name != REFERENCE:
            warmed["failed"][name] = f"not warmed up: the warm-up budget (--warmup-budget {budget:g} s) was spent"
            del arms[name]
            print(f"warm-up {name}: skipped, {warmed['failed'][name]}", flush=True)
            continue
        if device == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated()  # every arm's weights, and the optimiser states made so far
        try:
            for _ in range(warmup):
                arms[name]()
            sync(device)
        except Exception as error:  # noqa: BLE001 - any failure of one lever is reported, not fatal
            if name == REFERENCE:
                raise
            first_line = (str(error).strip().splitlines() or [""])[0][:300]
            warmed["failed"][name] = f"{type(error).__name__}: {first_line}"
            del arms[name]
            print(f"warm-up {name}: failed, left out of the timing ({warmed['failed'][name]})", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        warmed["seconds"][name] = clock() - start
        if device == "cuda":
            warmed["peak_bytes"][name] = torch.cuda.max_memory_allocated() - resident
        warmed["attention_ops"][name] = attention_ops(arms[name])
        print(f"warm-up {name}: {warmed['seconds'][name]:.1f} s, {warmed['attention_ops'][name]}", flush=True)
    return warmed


def time_arms(arms: dict, gemm, steps: int, repeats: int, device: str, batch_sizes: dict, seed: int, after_repeat=None):
    """Per repeat, the (warmed-up) arms and one GEMM round (gemm()) in that repeat's rotated order. Returns the
    per-repeat images/s of every arm (batch_sizes: the images one step of each arm takes), the GEMM readings of
    every round and the orders used; after_repeat(timed) sees the same after each repeat (to write what is
    measured so far)."""
    sync(device)
    rates = {name: [] for name in arms}
    gemm_rounds, orders = [], arm_orders([*arms, GEMM], repeats, seed)
    timed = {"rates": rates, "gemm_rounds": gemm_rounds, "orders": []}
    for order in orders:
        for name in order:
            if name == GEMM:
                gemm_rounds.append(gemm())
                continue
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                arms[name]()
            sync(device)
            rates[name].append(batch_sizes[name] * steps / (time.perf_counter() - start))
        timed["orders"].append(order)
        if after_repeat:
            after_repeat(timed)
    return timed


def paired_ratio(rates: list[float], reference: list[float], confidence: float = 0.95) -> dict:
    """Per-repeat ratios rates[i] / reference[i] (both timed in repeat i, under the same load): their
    mean and a Student-t interval over repeats (None with one repeat)."""
    ratios = [a / b for a, b in zip(rates, reference, strict=True)]
    d = paired_difference(ratios, [0.0] * len(ratios), confidence)  # the t-interval of the ratios themselves
    return {"mean": d.mean, "low": d.low, "high": d.high, "n": d.n, "confidence": confidence, "per_repeat": ratios}


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--model", default="vit_small_patch16_224", help="any supported timm ViT (VisionTransformer, DeiT, hybrid, Eva)"
    )
    p.add_argument("--depth", type=int, default=None, help="blocks (default: the model's own)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps per arm per repeat")
    p.add_argument(
        "--repeats", type=int, default=5, help="each repeat times every arm and one GEMM round, in a rotated order"
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--warmup-budget",
        type=float,
        default=None,
        help="seconds of warm-up (compiling) after which the arms not yet warmed are left out, in the order given "
        "(bare, mpp, then --levers): under a hard time limit the run still gets to its timed repeats",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the arm orders (and the weights)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the bare and MPP arms (not allowed with --peers)"
    )
    p.add_argument(
        "--peers",
        action="store_true",
        help="also time HF ViTForMaskedImageModeling and vit-pytorch MPP when installed (eager)",
    )
    p.add_argument(
        "--levers",
        nargs="+",
        default=[],
        choices=LEVERS,
        metavar="LEVER",
        help="one more MPP arm per lever, each alone on top of the mpp arm: " + ", ".join(LEVERS),
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--peak-n",
        type=int,
        nargs="+",
        default=None,
        help="sizes n of the n x n x n GEMMs measured for the 'best measured GEMM' peak, beside the model's own "
        "shapes (default: 4096 8192 16384 on CUDA, 1024 2048 on CPU; bf16 on a CPU without bf16 units "
        "takes about a minute per 2048^3 product, give small sizes there)",
    )
    p.add_argument("--gemm-seconds", type=float, default=0.3, help="time of one GEMM reading")
    p.add_argument("--out", default=str(RESULTS / "bench_step"), help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device on this machine; use --device cpu")
    if min(args.steps, args.repeats) < 1 or args.gemm_seconds <= 0:
        p.error(
            f"--steps {args.steps} --repeats {args.repeats} --gemm-seconds {args.gemm_seconds}: each must be positive"
        )
    if args.compile and args.peers:
        p.error(
            "--compile --peers: the peers would run eager against our compiled arms; time the peers without --compile"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = args.device, torch.bfloat16 if args.dtype == "bf16" else torch.float32
    args.peak_n = args.peak_n or ([4096, 8192, 16384] if device == "cuda" else [1024, 2048])
    load_before = load_average()
    torch.manual_seed(args.seed)

    arch = {"depth": args.depth} if args.depth else {}
    encoder = create_encoder(args.model, args.img_size, args.patch_size, **arch).to(device)
    args.dim, args.depth = encoder.embed_dim, len(encoder.blocks)
    hidden = next(
        m for m in encoder.blocks[0].mlp.modules() if isinstance(m, torch.nn.Linear)
    ).out_features  # fc1, or SwiGLU's fc1_g
    args.heads, args.mlp_ratio = encoder.blocks[0].attn.num_heads, hidden / encoder.embed_dim
    mpp = MPP(create_encoder(args.model, args.img_size, args.patch_size, **arch)).to(device)
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

    arms = {REFERENCE: autocast(bare_step(enc_fwd, opt_a, x)), "mpp": autocast(mpp_step(model_b, opt_b, images))}
    lever_changes, failed = {}, {}
    for lever in args.levers:
        torch.manual_seed(args.seed)  # the same initial weights as every other MPP arm
        build = lambda: MPP(create_encoder(args.model, args.img_size, args.patch_size, **arch)).to(device)
        try:
            step, lever_changes[lever] = lever_arm(lever, build, device, images, args.compile)
        except Exception as error:  # noqa: BLE001 - a lever that cannot be built is reported, not fatal
            failed[lever] = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"
            print(f"build {lever}: failed, left out of the timing ({failed[lever]})", flush=True)
            continue
        arms[lever] = autocast(step)
    if args.peers:
        arms.update(peer_steps(args, device, dtype, args.batch_size))
    n = mpp.num_patches
    tokens = n + encoder.num_prefix_tokens
    shapes = list(
        dict.fromkeys([(k, k, k) for k in args.peak_n] + model_gemm_shapes(args.batch_size * tokens, args.dim, hidden))
    )
    warmed = warm_up(arms, args.warmup, device, args.warmup_budget)
    warmed["failed"] = {**failed, **warmed["failed"]}
    # a hybrid's CNN stem is not in the formula (its patch projection is counted as one over the region)
    formula = vit_forward_flops(args.depth, args.dim, tokens, args.mlp_ratio, 3 * mpp.region[0] * mpp.region[1], n)
    fixed = {
        **provenance("bench_step.py", argv, device),
        "load_average_before": load_before,
        "peer_versions": package_versions(PEER_PACKAGES) if args.peers else None,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "forward_flops_formula": formula,
        "forward_flops_counted": counted_forward_flops(encoder, x[:1]),
        "attention_share_of_block_flops": formula["attention"] / formula["total"],
        "spec_peak": spec_peak(torch.cuda.get_device_name() if device == "cuda" else None, dtype),
        "failed_arms": warmed["failed"],
    }

    def report_of(timed: dict) -> dict:
        train_flops_per_image = 3 * formula["total"]  # forward + backward (2x forward)
        best = max((r for rnd in timed["gemm_rounds"] for r in rnd), key=lambda r: r["flops_per_sec"])
        spec, rows = fixed["spec_peak"], []
        for name, r in timed["rates"].items():
            median = statistics.median(r)
            rows.append(
                {
                    "arm": name,
                    "images_per_sec": median,
                    "min": min(r),
                    "max": max(r),
                    "per_repeat": r,
                    "vs_bare": paired_ratio(r, timed["rates"][REFERENCE]),
                    # does a lever pay: against the MPP step without it, timed in the same repeats
                    **(
                        {"vs_mpp": paired_ratio(r, timed["rates"]["mpp"])}
                        if name in lever_changes and "mpp" in timed["rates"]
                        else {}
                    ),
                    "mfu_vs_spec_peak": median * train_flops_per_image / spec["flops_per_sec"] if spec else None,
                    "mfu_vs_best_measured_gemm": median * train_flops_per_image / best["flops_per_sec"],
                    "peak_memory_bytes": warmed["peak_bytes"].get(name),
                    "warmup_seconds": warmed["seconds"][name],
                    "attention_ops": warmed["attention_ops"][name],
                    **({"lever": lever_changes[name]} if name in lever_changes else {}),
                }
            )
        return {
            **fixed,
            "load_average_after": load_average(),
            "repeats_done": len(timed["orders"]),
            "best_measured_gemm": {
                "flops_per_sec": best["flops_per_sec"],
                "shape": best["shape"],
                "rounds": timed["gemm_rounds"],
            },
            "arm_orders": timed["orders"],
            "rows": rows,
        }

    def write_so_far(timed: dict) -> None:  # a timeout on a lent GPU keeps the repeats already measured
        if len(timed["orders"]) < args.repeats:
            report = report_of(timed)
            write_results(args.out, report, markdown(report), echo=False)
            print(f"repeat {len(timed['orders'])} of {args.repeats} written to {args.out}.md", flush=True)

    timed = time_arms(
        arms,
        lambda: gemm_round(shapes, device, dtype, args.gemm_seconds),
        args.steps,
        args.repeats,
        device,
        {name: lever_changes.get(name, {}).get("batch_size", args.batch_size) for name in arms},
        args.seed,
        after_repeat=write_so_far,
    )
    report = report_of(timed)
    write_results(args.out, report, markdown(report))
    return report


def flops_text(rate: float) -> str:
    return f"{rate / 1e12:.1f} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:.1f} GFLOP/s"


def markdown(r: dict) -> str:
    c, f, spec, best = r["config"], r["forward_flops_formula"], r["spec_peak"], r["best_measured_gemm"]
    spec_text = (
        f"{spec['card']} {spec['precision']} dense {spec['flops_per_sec'] / 1e12:.1f} TFLOP/s ({spec['source']})"
        if spec
        else "none known for this device (n/a)"
    )
    m, k, n = best["shape"]
    lines = [
        f"# bench_step: {c['model']} at {c['img_size']} px / patch {c['patch_size']}, batch {c['batch_size']}, "
        f"{c['device']} {c['dtype']}{' compiled' if c['compile'] else ''}",
        "",
        *provenance_lines(r),
        *([f"Peer versions: {r['peer_versions']}", ""] if r.get("peer_versions") else []),
        f"Forward FLOPs per image: formula {f['total'] / 1e9:.4f} G (linear {f['linear'] / 1e9:.4f} G + attention "
        f"{f['attention'] / 1e9:.4f} G); FlopCounterMode {r['forward_flops_counted'] / 1e9:.4f} G (on CPU it does not "
        "count the fused attention kernel). Attention's share of the FLOPs: "
        f"{r['attention_share_of_block_flops']:.1%}.",
        "",
        f"MFU = images/s x 3 x forward FLOPs / peak. Spec peak: {spec_text}. Best measured GEMM: "
        f"{flops_text(best['flops_per_sec'])} ({m}x{k} @ {k}x{n}; max over {len(best['rounds'])} rounds of "
        f"{len(best['rounds'][0])} shapes, squares {c['peak_n']} and the model's linears, timed between the arms).",
        "",
        f"Arm order per repeat (rotations of a shuffle, seed {c['seed']}): "
        + "; ".join(" ".join(o) for o in r["arm_orders"]),
        "",
        *(
            [f"**Partial: {r['repeats_done']} of {c['repeats']} repeats measured** (the run was still going).", ""]
            if r["repeats_done"] < c["repeats"]
            else []
        ),
        "| arm | images/s (median) | min–max | vs bare timm step: mean of per-repeat ratios [95% t-interval] "
        "| MFU vs spec peak | MFU vs best measured GEMM | peak memory above resident | warm-up (compile) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        v = row["vs_bare"]
        interval = f" [{v['low']:.3f}, {v['high']:.3f}]" if v["low"] is not None else " (one repeat: no interval)"
        spec_mfu = f"{row['mfu_vs_spec_peak']:.1%}" if row["mfu_vs_spec_peak"] is not None else "n/a"
        memory = f"{row['peak_memory_bytes'] / 2**30:.2f} GiB" if row.get("peak_memory_bytes") else "n/a"
        lines.append(
            f"| {row['arm']} | {row['images_per_sec']:.1f} | {row['min']:.1f}–{row['max']:.1f} | "
            f"{v['mean']:.3f}{interval} "
            f"| {spec_mfu} | {row['mfu_vs_best_measured_gemm']:.1%} | {memory} | {row['warmup_seconds']:.0f} s |"
        )
    lines.append(
        "\nAttention operators each arm ran (one profiled step after its warm-up; none: the math path): "
        + "; ".join(f"{row['arm']} {', '.join(row['attention_ops']) or 'none'}" for row in r["rows"])
        + "."
    )
    for row in r["rows"]:
        if "vs_mpp" in row:
            v = row["vs_mpp"]
            interval = f" [{v['low']:.3f}, {v['high']:.3f}]" if v["low"] is not None else " (one repeat: no interval)"
            lines.append(f"\n{row['arm']} against the MPP step without it: {v['mean']:.3f}×{interval}.")
    for arm, error in r["failed_arms"].items():
        lines.append(f"\n{arm}: **failed**, not timed: {error}")
    for row in r["rows"]:
        lever = row.get("lever") or {}
        if "fp8_layers" in lever:
            names = sorted({n.split(".")[-1] for n in lever["fp8_layers"]})
            lines.append(
                f"\n{row['arm']}: {len(lever['fp8_layers'])} Linear layers in FP8 ({', '.join(names) or 'none'} of "
                f"each block){'; ' + lever['note'] if lever.get('note') else ''}."
            )
        if lever.get("batch_size", c["batch_size"]) != c["batch_size"]:
            lines.append(
                f"\n{row['arm']}: batch {lever['batch_size']} (the other arms {c['batch_size']}); its images/s counts "
                "its own images, so its ratios say what the bigger batch buys per image."
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
