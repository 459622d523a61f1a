"""What the experiments (recipes/gap.py, recipes/ablate.py) share: running the real recipes (their
main(), in this process) with a log each, choosing a fine-tuning lr on the validation split, the provenance
every results file records, and writing JSON and markdown tables."""

import json
import math
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from mpp import __version__
from mpp.errors import UsageError
from mpp.evaluation.stats import detectable_difference, mean_std
from mpp.flags import argv_for, option
from mpp.training.finetune_config import FinetuneConfig

REPO = Path(__file__).resolve().parents[2]  # mpp/experiments/harness.py -> the checkout, when run from one


def command(name: str, *args) -> list[str]:
    """The command line of `python -m mpp <name>` in this interpreter (single process: no accelerate launch needed)."""
    return [sys.executable, "-m", "mpp", name, *map(str, args)]


def command_name(cmd: list[str]) -> str:
    return cmd[3]


def command_args(cmd: list[str]) -> list[str]:
    return cmd[4:]


def run_in_process(cmd: list[str], log: Path) -> float:
    """The command of a command line `command(name, ...)` run by calling its module's main() in this process,
    its output in `log`; returns the wall time. Many short runs save the seconds of imports each
    process costs. A refused invocation, a failed run or a signal-stopped run stops the experiment."""
    import contextlib
    import importlib

    from mpp.commands import COMMANDS

    log.parent.mkdir(parents=True, exist_ok=True)
    main = importlib.import_module(COMMANDS[command_name(cmd)].module).main
    start = time.time()
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        print("in-process: " + " ".join(cmd), flush=True)
        try:
            code = main(command_args(cmd))
        except (Exception, SystemExit) as e:  # UsageError, RunError, argparse's exit
            print(f"error: {type(e).__name__}: {e}", flush=True)
            code = e
    if code:
        raise RuntimeError(f"python -m mpp {command_name(cmd)} failed ({code}); see {log}")
    return time.time() - start


def finished(out: Path) -> bool:
    """A stage's run folder holds its final output: results.json (fine-tuning) or model.safetensors (pretraining)."""
    return (out / "results.json").is_file() or (
        (out / "model.safetensors").is_file() and not (out / "best.safetensors").exists()
    )


def reusing(run=None, reused: list | None = None):
    """A stage runner for a resumed experiment: a stage whose run folder is finished is kept (and listed
    in `reused`), an unfinished one is removed and run again (a kill loses only the stage it stopped)."""
    import shutil

    run = run or run_in_process

    def run_or_reuse(cmd: list[str], log: Path) -> float:
        out = Path(option_value(cmd, option("output_dir")))
        if finished(out):
            if reused is not None:
                reused.append(str(out))
            return 0.0
        if out.exists():
            shutil.rmtree(out)
        return run(cmd, log)

    return run_or_reuse


PROVENANCE_KEYS = ("command", "date", "machine", "versions", "git")


def same_plan(earlier: dict, plan: dict) -> bool:
    """Whether a resumed experiment's plan is the one already on record (only where and when it ran differ)."""
    skip = {*PROVENANCE_KEYS, "earlier_protocols", "protocol_note", "relaunches"}
    return {k: v for k, v in earlier.items() if k not in skip} == {k: v for k, v in plan.items() if k not in skip}


def record_protocol(path: Path, plan: dict, origin: dict, resume: bool, note: str | None) -> dict:
    """Writes the protocol before the first run and returns it. A resume under the same plan records a relaunch;
    under another plan the earlier ones stay on record, with the note saying why it changed."""
    if resume and path.is_file():
        earlier = json.loads(path.read_text())
        if same_plan(earlier, plan):  # restarted after a stop: the plan stands
            relaunch = {k: origin[k] for k in ("command", "date", "git")}
            plan = {**earlier, "relaunches": [*earlier.get("relaunches", []), relaunch]}
        else:
            plan = {
                **plan,
                "earlier_protocols": [*earlier.pop("earlier_protocols", []), earlier],
                "protocol_note": note,
                **origin,
            }
    else:
        plan = {**plan, **origin}
    write_json(path, plan)
    return plan


def check_fresh_output_dir(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--output-dir {out} is not empty; choose another folder")


def check_seeds(seeds) -> None:
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds must be distinct and at least one, got {list(seeds)}")


def option_value(cmd: list[str], flag: str) -> str | None:
    """The value following `flag` in a command line (None when absent)."""
    return cmd[cmd.index(flag) + 1] if flag in cmd else None


# --- choosing the fine-tuning lr on validation ------------------------------------------------


def finetune_over_grid(base_cmd: list[str], lrs, root: Path, log_dir: Path, name: str, run=None) -> dict:
    """Fine-tunes once per lr (base_cmd must carry --eval-split validation --test-split test), and
    keeps the lr with the best validation top-1 (ties: the first in the grid). Returns
    {"chosen_lr", "best_val_top1", "best_epoch", "test_top1", "epochs", "train_acc_last", "by_lr"}:
    the test score is the chosen run's, scored once with its best-by-validation weights.
    `run` runs one command (default: run_in_process)."""
    run = run or run_in_process
    by_lr = {}
    for lr in lrs:
        out = root / f"{name}_lr{lr:g}"
        run(
            base_cmd + argv_for(FinetuneConfig, lr=lr, output_dir=out),
            log_dir / f"{name}_lr{lr:g}.log",
        )
        by_lr[lr] = summarise_finetune(out)
    return choose(by_lr)


def finetune_at(base_cmd: list[str], lr: float, root: Path, log_dir: Path, name: str, run=None) -> dict:
    """One fine-tuning at an lr chosen elsewhere (another seed's validation), in choose()'s form."""
    return finetune_over_grid(base_cmd, [lr], root, log_dir, name, run)


def choose(by_lr: dict) -> dict:
    chosen = max(by_lr, key=lambda lr: by_lr[lr]["best_val_top1"])  # max keeps the first of equals
    picked = by_lr[chosen]
    return {
        "chosen_lr": chosen,
        **{k: picked[k] for k in ("best_val_top1", "best_epoch", "test_top1", "epochs", "train_acc_last")},
        "by_lr": {f"{lr:g}": r for lr, r in by_lr.items()},
    }


def summarise_finetune(run_dir: Path) -> dict:
    """The numbers of one fine-tuning run that the experiments report: validation top-1 of the best
    epoch, that epoch, the test top-1 of its weights, the epoch budget, and the last logged training
    accuracy (near 1: the run fit its training set; well below: it may be under-trained)."""
    results = json.loads((run_dir / "results.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_acc = [r["train_acc"] for r in records if "train_acc" in r]
    return {
        "best_val_top1": results["best_val_top1"],
        "best_epoch": results["best_epoch"],
        "test_top1": results["test_top1"],
        "epochs": results["config"]["epochs"],
        "train_acc_last": train_acc[-1] if train_acc else None,
        "val_curve": [[h["epoch"], h["top1"]] for h in results.get("history", [])],
    }


def power_table(seeds: int, test_images: int) -> dict:
    """What a design can detect, before any result: the smallest true difference a paired t-test over the
    seeds finds 80% of the time, for per-seed differences of a given spread; and the spread that the test
    images alone put into a per-seed difference of accuracies (sqrt(share of disagreeing images / N))."""
    spreads = (0.005, 0.01, 0.02, 0.03)
    return {
        "seeds": seeds,
        "test_images": test_images,
        "power": 0.8,
        "alpha": 0.05,
        "detectable_by_spread": {f"{s:g}": detectable_difference(s, seeds) for s in spreads},
        "test_image_spread_by_disagreement": {f"{d:g}": math.sqrt(d / test_images) for d in (0.1, 0.2, 0.3)},
    }


# --- provenance ---------------------------------------------------------------------------------


def git_state(repo: Path = REPO) -> dict:
    """{'commit', 'dirty'} of the checkout the code runs from; dirty = tracked files differ from the commit."""

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)

    if not (repo / ".git").exists():  # an installed package: its folder may sit inside some other repository
        return {"commit": None, "dirty": None}
    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def versions() -> dict:
    import accelerate
    import datasets
    import numpy
    import scipy
    import timm

    return {
        "mpp": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
    }


def machine() -> str:
    gpu = f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU"
    threads = torch.get_num_threads()
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, {threads} torch threads, {gpu}"


def provenance(script: str, argv: list[str]) -> dict:
    """Where and how a run started. script: its recipe (recipes/NAME.py); under `python -m mpp NAME` the command says
    so."""
    from mpp.cli import started_as_module

    launch = ["python", "-m", "mpp", Path(script).stem] if started_as_module() else ["python", script]
    return {
        "command": " ".join([*launch, *argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "git": git_state(),
    }


def provenance_lines(p: dict) -> list[str]:
    git = p["git"]
    tree = (
        "unknown"
        if git["commit"] is None
        else git["commit"][:12] + (" (with uncommitted changes)" if git["dirty"] else "")
    )
    return [
        f"Command: `{p['command']}`",
        "",
        f"Commit {tree}; run {p['date']} on {p['machine']}.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in p["versions"].items()) + ".",
    ]


# --- writing ------------------------------------------------------------------------------------


def _finite(tree):
    """NaN and inf become None: strict JSON has no NaN."""
    if isinstance(tree, dict):
        return {str(k): _finite(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_finite(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(_finite(obj), indent=2, allow_nan=False))


def summary_over_seeds(per_seed: list[dict]) -> dict:
    """{metric: mean_std over seeds} for every number the per-seed dicts share."""
    keys = [k for k, v in per_seed[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: mean_std(s[k] for s in per_seed) for k in keys}


def pm(summary: dict, digits: int = 3) -> str:
    """'0.712 ± 0.010' (sample std), or '0.712' with one seed."""
    std = summary["std"]
    return f"{summary['mean']:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(map(str, r)) + " |" for r in rows
    ]
