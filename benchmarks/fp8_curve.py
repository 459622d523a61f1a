"""Does a lever train as well? The loss curve of an MPP run with the lever against the seed-to-seed spread of the
plain run: the same settings, `--seeds` plain runs and one run with the lever per seed given in `--lever-seeds`.

    python benchmarks/fp8_curve.py --lever "fp8=tensorwise" --steps 2000 \
        --settings model=vit_base_patch16_224 img_size=224 patch_size=16 batch_size=64 compile=true

Each run's loss is smoothed (a centred moving mean over --smooth logged windows); the verdict compares, at every
logged step past warm-up, the lever's smoothed loss with the band [min, max] of the plain seeds' smoothed losses
widened by half their mean spread: "within" when it stays inside, else how far and where it leaves. The final
loss is the mean of the last 5 windows, as a run's summary reports it.
"""

import argparse
import atexit
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import torch
from results_io import provenance, provenance_lines, write_results

import mpp
from mpp.training.pretrain_config import PretrainConfig

RESULTS = Path(__file__).resolve().parent / "results"


def value(text: str):
    """A --settings value: JSON when it parses (numbers, booleans), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def pairs(items: list[str], flag: str) -> dict:
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"{flag} {item}: give KEY=VALUE, KEY a pretrain setting (e.g. batch_size=64)")
        out[key.replace("-", "_")] = value(text)
    return out


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss of each logged window (evaluation records have no loss)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def smoothed(curve: dict[int, float], width: int) -> dict[int, float]:
    steps = sorted(curve)
    half = width // 2
    return {s: statistics.fmean(curve[t] for t in steps[max(0, i - half) : i + half + 1]) for i, s in enumerate(steps)}


def verdict(plain: list[dict[int, float]], lever: list[dict[int, float]], after: int) -> dict:
    """The lever's smoothed curves against the plain seeds' band, at the steps all runs logged past `after`."""
    steps = sorted(set.intersection(*(set(c) for c in plain + lever)))
    steps = [s for s in steps if s > after]
    spreads = [max(c[s] for c in plain) - min(c[s] for c in plain) for s in steps]
    margin = statistics.fmean(spreads) / 2 if spreads else 0.0
    outside = []
    for s in steps:
        low, high = min(c[s] for c in plain) - margin, max(c[s] for c in plain) + margin
        for i, c in enumerate(lever):
            if not low <= c[s] <= high:
                outside.append({"step": s, "lever_run": i, "loss": c[s], "band": [low, high]})
    return {
        "steps_compared": len(steps),
        "mean_plain_spread": statistics.fmean(spreads) if spreads else None,
        "margin": margin,
        "outside": outside[:20],
        "outside_count": len(outside),
        "within": not outside and bool(steps),
    }


def final_loss(curve: dict[int, float]) -> float:
    return statistics.fmean(curve[s] for s in sorted(curve)[-5:])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lever", nargs="+", required=True, metavar="KEY=VALUE", help="what the lever runs change")
    p.add_argument("--settings", nargs="*", default=[], metavar="KEY=VALUE", help="pretrain settings of every run")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the plain runs (two or more)")
    p.add_argument("--lever-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--smooth", type=int, default=9, help="logged windows in the centred moving mean")
    p.add_argument(
        "--runs-dir",
        default=None,
        help="where the runs go, kept (default: a temporary folder, removed at the end: the curves are in OUT.json)",
    )
    p.add_argument("--out", default=str(RESULTS / "fp8_curve"), help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    if len(args.seeds) < 2:
        p.error(f"--seeds {args.seeds}: two or more plain seeds are needed for a seed-to-seed spread")
    settings, lever = pairs(args.settings, "--settings"), pairs(args.lever, "--lever")
    runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="fp8_curve_"))
    if args.runs_dir is None:  # a ViT-B/16 run's folder holds its export and, when stopped, a checkpoint: GBs
        atexit.register(shutil.rmtree, runs_dir, ignore_errors=True)
    runs, warmup = {}, int(settings.get("warmup_steps", PretrainConfig.warmup_steps))
    for arm, seed in run_order(args.seeds, args.lever_seeds):
        name = f"{arm}-seed{seed}"
        print(f"run {name}: {args.steps} steps", flush=True)
        extra = lever if arm == "lever" else {}
        result = mpp.pretrain(
            **settings, **extra, seed=seed, max_steps=args.steps, output_dir=str(runs_dir / name), progress=False
        )
        if result.stopped_by:  # a timeout's SIGTERM: the run checkpointed and returned; start no other
            report = report_of(args, argv, settings, lever, runs_dir, runs, warmup)
            report["stopped"] = f"{name} was stopped by {result.stopped_by}; it and the runs after it are left out"
            write_results(args.out, report, markdown(report))
            raise SystemExit(f"fp8_curve.py: {report['stopped']}")
        runs[name] = {"arm": arm, "seed": seed, "curve": losses(result.run_dir), "summary": result.summary}
        report = report_of(args, argv, settings, lever, runs_dir, runs, warmup)
        done = len(runs) == len(args.seeds) + len(args.lever_seeds)
        write_results(args.out, report, markdown(report), echo=done)  # after each run: a timeout keeps the rest
    return report


def run_order(seeds: list[int], lever_seeds: list[int]) -> list[tuple[str, int]]:
    """Plain and lever runs alternated (plain first), so that a session cut short still has a plain run beside
    a lever run, then the second plain seed that makes a band."""
    plain, levered, order = [("plain", s) for s in seeds], [("lever", s) for s in lever_seeds], []
    for i in range(max(len(plain), len(levered))):
        order += plain[i : i + 1] + levered[i : i + 1]
    return order


def report_of(args, argv, settings: dict, lever: dict, runs_dir: Path, runs: dict, warmup: int) -> dict:
    plain = [smoothed(r["curve"], args.smooth) for r in runs.values() if r["arm"] == "plain"]
    levered = [smoothed(r["curve"], args.smooth) for r in runs.values() if r["arm"] == "lever"]
    return {
        **provenance("fp8_curve.py", argv, "cuda" if torch.cuda.is_available() else "cpu"),
        "config": {**vars(args), "settings": settings, "lever": lever, "runs_dir": str(runs_dir), "warmup": warmup},
        "runs": {
            n: {"arm": r["arm"], "seed": r["seed"], "final_loss": final_loss(r["curve"]), "summary": r["summary"]}
            for n, r in runs.items()
        },
        "curves": {n: r["curve"] for n, r in runs.items()},
        # a band needs two plain seeds and something to hold against it
        "verdict": verdict(plain, levered, after=warmup) if len(plain) >= 2 and levered else None,
    }


def markdown(r: dict) -> str:
    v, c = r["verdict"], r["config"]
    lever = " ".join(f"{k}={x}" for k, x in c["lever"].items())
    lines = [
        f"# fp8_curve: {lever} against {len(c['seeds'])} plain seeds, {c['steps']} steps",
        "",
        *provenance_lines(r),
        f"Settings of every run: {c['settings']}. Smoothing: centred mean over {c['smooth']} logged windows.",
        "",
        "| run | final loss (mean of the last 5 windows) | images/s |",
        "|---|---|---|",
    ]
    for name, run in r["runs"].items():
        rate = run["summary"].get("images_per_sec")
        lines.append(
            f"| {name} | {run['final_loss']:.4f} | {rate:.0f} |"
            if rate
            else f"| {name} | {run['final_loss']:.4f} | — |"
        )
    if v is None:
        planned = len(c["seeds"]) + len(c["lever_seeds"])
        stopped = f" {r['stopped']}." if r.get("stopped") else ""
        lines += ["", f"**Partial: {len(r['runs'])} of {planned} runs**, no verdict.{stopped}"]
        return "\n".join(lines) + "\n"
    if not v["steps_compared"]:
        lines += [
            "",
            f"No step past warm-up (step {c['warmup']}) logged by every run: no verdict.",
        ]
        return "\n".join(lines) + "\n"
    spread = v["mean_plain_spread"]
    lines += [
        "",
        f"Verdict over {v['steps_compared']} logged steps past warm-up: "
        + (
            f"**within** the plain seeds' band (their mean spread {spread:.4f}, widened by {v['margin']:.4f})."
            if v["within"]
            else f"**outside** the band at {v['outside_count']} step(s), first at step "
            f"{v['outside'][0]['step'] if v['outside'] else '—'} (mean plain spread "
            f"{spread if spread is not None else float('nan'):.4f})."
        ),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
