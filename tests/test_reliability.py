"""Kill -9, SIGTERM and non-finite gradients: what survives, what resumes, what stops."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mpp.loop import LoopSettings, NonFiniteError, NonFiniteGuard, fit, init_processes, open_run

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
TINY = ["--model", "test_vit", "--img-size", "28", "--patch-size", "7", "--batch-size", "32", "--warmup-steps", "3",
        "--log-every", "1", "--no-progress"]


@pytest.fixture(scope="module")
def digits96(tmp_path_factory):
    from mpp.builtin_data import mnist5k

    path = tmp_path_factory.mktemp("data") / "digits96"
    mnist5k().shuffle(seed=0).select(range(96)).save_to_disk(str(path))
    return path


def recipe(args):
    return [sys.executable, str(ROOT / "recipes" / "pretrain_mpp.py"), *TINY, *args]


def wait_for(predicate, proc, timeout=240):
    start = time.time()
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - start < timeout, "timed out"
        time.sleep(0.05)


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def uninterrupted(digits96, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    subprocess.run(recipe(["--dataset", str(digits96), "--max-steps", "16", "--checkpoint-every", "2", "--output-dir", str(out)]),
                   check=True, capture_output=True, env=ENV, timeout=300)
    return out


@pytest.mark.slow
def test_kill_9_then_resume_auto_equals_the_uninterrupted_run(digits96, uninterrupted, tmp_path):
    """SIGKILL right after the step-6 checkpoint appears (possibly during a later write): the resumed run
    ends bit-identical to the uninterrupted one (tolerance 0)."""
    out = tmp_path / "run"
    args = ["--dataset", str(digits96), "--max-steps", "16", "--checkpoint-every", "2", "--output-dir", str(out)]
    proc = subprocess.Popen(recipe(args), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (out / "checkpoints" / "step_000006" / "trainer_state.json").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model.safetensors").exists()
    done = subprocess.run(recipe(args + ["--resume", "auto"]), capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    assert same_weights(out / "model.safetensors", uninterrupted / "model.safetensors")
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 17))  # nothing logged twice, nothing lost


@pytest.mark.slow
def test_sigterm_checkpoints_and_says_how_to_resume(digits96, uninterrupted, tmp_path):
    out = tmp_path / "run"
    args = ["--dataset", str(digits96), "--max-steps", "16", "--checkpoint-every", "1000", "--output-dir", str(out)]
    proc = subprocess.Popen(recipe(args), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-3000:]
    assert "stopped by SIGTERM" in stdout and "--resume auto" in stdout
    checkpoints = list((out / "checkpoints").glob("step_*"))
    assert len(checkpoints) == 1 and not (out / "model.safetensors").exists()
    done = subprocess.run(recipe(args + ["--resume", "auto"]), capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert same_weights(out / "model.safetensors", uninterrupted / "model.safetensors")


class Images:
    def set_epoch(self, epoch):
        pass


@pytest.mark.parametrize("fused", [False, True], ids=["host-check", "fused-found-inf"])
def test_nonfinite_gradients_are_skipped_then_stop_the_run(tmp_path, fused):
    dist = init_processes(threads=None)
    run = open_run(dist, str(tmp_path / "run"), None, grad_accum=1)
    model = torch.nn.Linear(3, 1)
    # fused AdamW skips inside its kernel (no host sync); SGD here is skipped by the loop on the host
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True) if fused else torch.optim.SGD(model.parameters(), lr=0.1)
    assert NonFiniteGuard(optimizer, 3, 0, torch.device("cpu")).on_device == fused
    batches = [{"pixels": torch.randn(4, 3), "bad": []} for _ in range(6)]
    poisoned = {2, 3}  # 0-based batches whose loss is NaN
    seen = []

    def step_fn(model, batch):
        i = len(seen)
        seen.append([p.detach().clone() for p in model.parameters()])
        loss = model(batch["pixels"]).pow(2).mean()
        return (loss * float("nan") if i in poisoned else loss), torch.zeros(())

    settings = LoopSettings(total_steps=6, lr_at=lambda step: 0.1, clip_grad=0, log_every=3, checkpoint_every=100,
                            keep_checkpoints=1, batch_size=4, progress=False, max_nonfinite=3)
    result = fit(run, model, optimizer, batches, Images(), step_fn, settings)
    assert result.skipped_steps == 2 and result.step == 6
    # the weights moved on good steps, did not move across the two poisoned steps, and are finite
    assert not all(torch.equal(a, b) for a, b in zip(seen[0], seen[1]))
    assert all(torch.equal(a, b) for a, b in zip(seen[3], seen[4]))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped_steps"] == 2

    poisoned.update(range(100))
    seen.clear()
    run2 = open_run(dist, str(tmp_path / "run2"), None, grad_accum=1)
    with pytest.raises(NonFiniteError, match=r"3 optimiser steps in a row with a non-finite gradient \(found at step 3\)"):
        fit(run2, model, optimizer, batches, Images(), step_fn, settings)
    assert not (run2.run_dir / "checkpoints").exists()  # nothing written over a good checkpoint


def test_data_wait_share_measures_time_spent_waiting_for_batches(tmp_path):
    dist = init_processes(threads=None)
    run = open_run(dist, str(tmp_path / "run"), None, grad_accum=1)
    model = torch.nn.Linear(3, 1)

    def slow_batches():  # the loader needs 50 ms a batch
        for _ in range(8):
            time.sleep(0.05)
            yield {"pixels": torch.randn(4, 3), "bad": []}

    def step_fn(model, batch):  # and so does the step
        time.sleep(0.05)
        return model(batch["pixels"]).pow(2).mean(), torch.zeros(())

    settings = LoopSettings(total_steps=8, lr_at=lambda step: 0.1, clip_grad=0, log_every=4, checkpoint_every=100,
                            keep_checkpoints=1, batch_size=4, progress=False)
    fit(run, model, torch.optim.SGD(model.parameters(), lr=0.1), slow_batches(), Images(), step_fn, settings)
    records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8]
    assert all(0.35 < r["data_wait_share"] < 0.65 for r in records), records  # half the time waiting


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, capsys):
    """Disk full during the step-4 checkpoint: the partial folder goes, step 2 stays valid, the run says so and goes on."""
    dist = init_processes(threads=None)
    run = open_run(dist, str(tmp_path / "run"), None, grad_accum=1)
    real_save = run.accelerator.save_state

    def save_state(path):
        if "000004" in str(path):
            real_save(path)  # a part is written, then the disk is full
            raise OSError(28, "No space left on device")
        return real_save(path)

    run.accelerator.save_state = save_state
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [{"pixels": torch.randn(4, 3), "bad": []} for _ in range(6)]
    settings = LoopSettings(total_steps=5, lr_at=lambda step: 0.1, clip_grad=0, log_every=5, checkpoint_every=2,
                            keep_checkpoints=3, batch_size=4, progress=False)
    result = fit(run, model, optimizer, batches, Images(), lambda m, b: (m(b["pixels"]).pow(2).mean(), torch.zeros(())), settings)
    assert result.step == 5
    names = sorted(p.name for p in (run.run_dir / "checkpoints").iterdir())
    assert names == ["step_000002", "step_000005"]  # no step 4, no leftover .tmp- folder
    out = capsys.readouterr().out
    assert "checkpoint at step 4 could not be written (No space left on device)" in out and "step_000002" in out
