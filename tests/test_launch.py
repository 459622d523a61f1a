"""End to end through real processes: accelerate launch with 2 CPU ranks, and exact resume."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import LAUNCH_2_CPU, TINY_MODEL
from safetensors.torch import load_file

ROOT = Path(__file__).parents[1]
TINY = [
    *TINY_MODEL,
    "--batch-size",
    "32",
    "--warmup-steps",
    "3",
    "--log-every",
    "3",
    "--no-progress",
]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

pytestmark = pytest.mark.slow


def run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300, **kw)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def two_ranks(small_dataset, tmp_path_factory):
    """accelerate launch with 2 CPU ranks over the 96 digits, 16 per rank and step (3 steps an epoch);
    rank 1 gets SIGTERM during its step 2. (run folder, what each rank wrote)"""
    out = tmp_path_factory.mktemp("two_ranks") / "run"
    launch = LAUNCH_2_CPU
    proc = subprocess.run(
        launch
        + [
            "tests/launch_check.py",
            *TINY,
            "--dataset",
            str(small_dataset),
            "--batch-size",
            "16",
            "--max-steps",
            "6",
            "--output-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        env={**ENV, "ACCELERATE_USE_CPU": "1", "MPP_TEST_SIGTERM_RANK": "1"},
        cwd=ROOT,
        timeout=300,
    )
    # gloo may abort at interpreter exit after a correct run: judge by what both ranks wrote
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1) if (out / f"rank{i}.json").exists()]
    assert len(ranks) == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out, ranks


def test_two_cpu_processes_train_identical_replicas(two_ranks):
    """Both ranks start from the same weights, move away from them, and end identical; between them
    they read the epoch's 96 examples, each a different half."""
    out, ranks = two_ranks
    p0, p1 = torch.load(out / "params_rank0.pt"), torch.load(out / "params_rank1.pt")
    start0, start1 = torch.load(out / "initial_rank0.pt"), torch.load(out / "initial_rank1.pt")
    assert torch.equal(start0, start1) and torch.equal(p0, p1)
    assert not torch.equal(p0, start0)  # it trained
    # the loader runs on into epoch 1 (its first batches are read ahead while epoch 0 ends): count epoch 0's
    first = [[i for epoch, i in rank["seen"] if epoch == 0] for rank in ranks]
    assert len(first[0]) == len(first[1]) == 48  # 3 steps of 16, each example once
    assert not set(first[0]) & set(first[1]) and set(first[0]) | set(first[1]) == set(range(96))
    config = json.loads((out / "run_config.json").read_text())
    assert config["derived"]["num_processes"] == 2 and config["derived"]["global_batch"] == 32


def test_two_processes_agree_on_a_stop(two_ranks):
    """SIGTERM to rank 1 in step 2: both ranks stop together at the next logging step (3) after one
    checkpoint, rank 0 naming the other process's signal."""
    out, ranks = two_ranks
    assert [(r["world"], r["steps"]) for r in ranks] == [(2, 3), (2, 3)]
    assert ranks[1]["stopped_by"] == "SIGTERM" and ranks[0]["stopped_by"] == "a signal to another process"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000003"]
    assert not (out / "model.safetensors").exists()


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """96 MNIST digits saved with save_to_disk: 3 steps of 32 per epoch."""
    from mpp.data.builtin import mnist5k

    path = tmp_path_factory.mktemp("data") / "digits96"
    mnist5k().shuffle(seed=0).select(range(96)).save_to_disk(str(path))
    return path


def test_resumed_run_ends_with_the_same_weights(tmp_path, small_dataset):
    """Resumed mid-epoch (step 4 = 2nd batch of epoch 1), a run ends bit-identical to the uninterrupted one (tolerance
    0)."""
    recipe = [
        sys.executable,
        "recipes/pretrain_mpp.py",
        *TINY,
        "--dataset",
        str(small_dataset),
        "--max-steps",
        "10",
        "--checkpoint-every",
        "4",
        "--log-every",
        "2",
    ]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run(recipe + ["--output-dir", str(full)])
    run(recipe + ["--output-dir", str(resumed), "--resume", str(full / "checkpoints" / "step_000004")])
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    full_log = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    resumed_log = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed_log] == [6, 8, 10]  # it continued, it did not start over
    assert [r["epoch"] for r in resumed_log] == [1, 2, 3]
    assert [r["loss"] for r in resumed_log] == [r["loss"] for r in full_log[2:]]


def test_kill_then_resume_auto_continues_from_the_newest_checkpoint(tmp_path, small_dataset):
    """A run killed after its step-4 checkpoint: metrics after it are dropped and logged again."""
    out = tmp_path / "run"
    recipe = [
        sys.executable,
        "recipes/pretrain_mpp.py",
        *TINY,
        "--dataset",
        str(small_dataset),
        "--checkpoint-every",
        "4",
        "--log-every",
        "2",
        "--output-dir",
        str(out),
    ]
    run(recipe + ["--max-steps", "6"])  # stands in for a run killed at step 6: its last checkpoint is step 4
    shutil.rmtree(out / "checkpoints" / "step_000006")
    (out / "model.safetensors").unlink()
    (out / "checkpoints" / ".tmp-step_000008").mkdir()  # a half-written checkpoint is never resumed from
    proc = run(recipe + ["--max-steps", "6", "--resume", "auto"])
    assert "resumed from" in proc.stdout + proc.stderr and "step_000004" in proc.stdout + proc.stderr
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6]
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000004", "step_000006"]


def test_broken_files_are_counted_and_named(tmp_path):
    from PIL import Image

    folder = tmp_path / "images" / "all"
    folder.mkdir(parents=True)
    for i in range(22):
        Image.new("RGB", (20, 20), (i * 10, 0, 0)).save(folder / f"{i:02d}.png")
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    out = tmp_path / "run"
    args = [
        "--dataset",
        str(tmp_path / "images"),
        "--model",
        "test_vit",
        "--img-size",
        "16",
        "--patch-size",
        "4",
        "--batch-size",
        "8",
        "--max-steps",
        "3",
        "--no-progress",
        "--output-dir",
        str(out),
    ]
    proc = run([sys.executable, "recipes/pretrain_mpp.py", *args])  # one epoch: each file is read once
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bad_images"] == 2
    assert sorted(Path(name).name for name, _ in summary["bad_examples"]) == ["text.jpg", "zero.png"]
    assert "skipped 2 unreadable images" in proc.stdout + proc.stderr
    strict = subprocess.run(
        [sys.executable, "recipes/pretrain_mpp.py", *args[:-1], str(tmp_path / "strict"), "--strict-data"],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=300,
    )
    assert strict.returncode == 1
    error = [line for line in strict.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "--strict-data:" in error[0] and ("zero.png" in error[0] or "text.jpg" in error[0])
    assert not (tmp_path / "strict" / "model.safetensors").exists()


def test_main_job_files(tmp_path):
    """The default job's outputs on a short run: weights, head, metrics, config, TensorBoard events."""
    out = tmp_path / "run"
    proc = run(
        [
            sys.executable,
            "recipes/pretrain_mpp.py",
            *TINY,
            "--max-steps",
            "4",
            "--log-images-every",
            "2",
            "--output-dir",
            str(out),
        ]
    )
    assert "model.safetensors" in proc.stdout
    for name in [
        "model.safetensors",
        "mpp_head.safetensors",
        "metrics.jsonl",
        "run_config.json",
        "config.json",
        "README.md",
        "summary.json",
    ]:
        assert (out / name).is_file(), name
    events = list((out / "tensorboard").rglob("events.out.tfevents*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pictures = EventAccumulator(str(events[0]), size_guidance={"images": 0})
    pictures.Reload()
    assert [e.step for e in pictures.Images("mpp/predictions")] == [2, 4]  # --log-images-every 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 4]
    assert all(
        r["loss"] > 0 and 0 <= r["masked_acc"] <= 1 and r["images_per_sec"] > 0 and 0 <= r["data_wait_share"] < 1
        for r in records
    )
    config = json.loads((out / "run_config.json").read_text())
    assert config["model"] == "test_vit" and config["mask_probs"] == [0.8, 0.1, 0.1]
    # the end of the run speaks: steps, the mean loss and accuracy of the last (here both) logged windows, where the
    # files are, what next
    loss, acc = (sum(r[k] for r in records) / len(records) for k in ("loss", "masked_acc"))
    assert "finished: 4 steps" in proc.stdout and f"final loss {loss:.4f}" in proc.stdout
    assert f"masked-patch accuracy {acc:.4f} (mean of the last 2 logged windows, records at steps 3-4)" in proc.stdout
    assert (
        f"recipes/finetune.py --init {out / 'model.safetensors'}" in proc.stdout
        and f"inspect_run.py {out}" in proc.stdout
    )
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["steps_this_run"] == 4
        and summary["wall_s"] > 0
        and summary["images_per_sec"] == pytest.approx(4 * 32 / summary["wall_s"])
    )  # TINY: batch 32
    # --resume auto on a finished run has nothing left to do and keeps the weights
    before = load_file(out / "model.safetensors")
    run(
        [
            sys.executable,
            "recipes/pretrain_mpp.py",
            *TINY,
            "--max-steps",
            "4",
            "--output-dir",
            str(out),
            "--resume",
            "auto",
        ]
    )
    after = load_file(out / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_gradient_accumulation_counts_optimiser_steps(tmp_path, small_dataset):
    out = tmp_path / "run"
    run(
        [
            sys.executable,
            "recipes/pretrain_mpp.py",
            *TINY,
            "--dataset",
            str(small_dataset),
            "--batch-size",
            "16",
            "--grad-accum",
            "2",
            "--max-steps",
            "4",
            "--log-every",
            "2",
            "--output-dir",
            str(out),
        ]
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    config = json.loads((out / "run_config.json").read_text())
    assert config["derived"]["global_batch"] == 32
    # 96 images / 16 per micro-batch = 6 micro-batches = 3 optimiser steps per epoch: step 4 is in epoch 1
    assert records[-1]["epoch"] == 1


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").exists(), reason="apt-get install dataset-fashion-mnist"
)
def test_frozen_feature_monitor_during_pretraining(tmp_path):
    out = tmp_path / "run"
    run(
        [
            sys.executable,
            "recipes/pretrain_mpp.py",
            *TINY,
            "--max-steps",
            "4",
            "--eval-dataset",
            "fashion-mnist",
            "--eval-every-steps",
            "2",
            "--output-dir",
            str(out),
        ]
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_knn20_cls" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(
        0.1 < r[f"eval_{m}_{readout}"] <= 1
        for r in evals
        for m in ("knn20", "linear_10shot")
        for readout in ("cls", "mean")
    )  # above chance (0.1)


def test_streaming_parquet_pretraining_and_resume(tmp_path, small_dataset):
    """--streaming over local parquet (iterable, split by node): runs across an epoch end and resumes
    in epoch 1 to weights bit-identical to the uninterrupted run's (which examples a resumed stream
    reads, with and without workers: test_loop_correctness.py)."""
    from datasets import load_from_disk

    data = tmp_path / "digits.parquet"
    load_from_disk(str(small_dataset)).to_parquet(str(data))
    out = tmp_path / "run"
    args = [
        sys.executable,
        "recipes/pretrain_mpp.py",
        *TINY,
        "--dataset",
        str(data),
        "--streaming",
        "--max-steps",
        "5",
        "--checkpoint-every",
        "2",
        "--log-every",
        "1",
        "--output-dir",
        str(out),
    ]
    run(args)  # 96 images = 3 batches of 32 per epoch: steps 4-5 are in epoch 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and records[-1]["epoch"] == 1
    shutil.rmtree(out / "checkpoints" / "step_000005")
    uninterrupted = load_file(out / "model.safetensors")
    (out / "model.safetensors").unlink()
    run(args + ["--resume", "auto"])  # from step 4, the 2nd batch of epoch 1
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    assert resumed[-1]["loss"] == records[-1]["loss"]
    weights = load_file(out / "model.safetensors")
    assert all(torch.equal(uninterrupted[k], weights[k]) for k in uninterrupted)


def test_a_failing_rank_fails_the_whole_launch_fast(tmp_path):
    launch = LAUNCH_2_CPU
    start = time.time()
    proc = subprocess.run(
        launch + ["tests/launch_fail.py", *TINY, "--max-steps", "50", "--output-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env={**ENV, "ACCELERATE_USE_CPU": "1"},
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stdout + proc.stderr
    # a hang lasts until a collective times out (30 minutes by default); the failure takes about 11 s alone,
    # so 150 s leaves room for a machine busy with other work and still tells the two apart
    assert time.time() - start < 150
    assert not (tmp_path / "run" / "model.safetensors").exists()
