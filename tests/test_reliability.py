"""Kill -9, SIGTERM and non-finite gradients: what survives, what resumes, what stops."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import LAUNCH_2_CPU, TINY_MODEL, accelerate_launch
from safetensors.torch import load_file

from mpp.training.guards import NonFiniteError, NonFiniteGuard
from mpp.training.loop import LoopSettings, fit
from mpp.training.run_setup import init_processes, open_run

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
TINY = [
    *TINY_MODEL,
    "--batch-size",
    "32",
    "--warmup-steps",
    "3",
    "--log-every",
    "1",
    "--no-progress",
]


@pytest.fixture(scope="module")
def digits96(tmp_path_factory):
    from mpp.data.builtin import mnist5k

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
    subprocess.run(
        recipe(["--dataset", str(digits96), "--max-steps", "16", "--checkpoint-every", "2", "--output-dir", str(out)]),
        check=True,
        capture_output=True,
        env=ENV,
        timeout=300,
    )
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
    wait_for(
        lambda: (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3, proc
    )
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-3000:]
    assert "stopped by SIGTERM" in stdout and "--resume auto" in stdout
    checkpoints = list((out / "checkpoints").glob("step_*"))
    assert len(checkpoints) == 1 and not (out / "model.safetensors").exists()
    done = subprocess.run(recipe(args + ["--resume", "auto"]), capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert same_weights(out / "model.safetensors", uninterrupted / "model.safetensors")


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_workers_checkpoints_and_resumes_exactly(digits96, uninterrupted, tmp_path):
    """SIGTERM to the run's whole process group (a scheduler's pre-emption, a terminal's signal),
    DataLoader workers included: the run stops at a step with a checkpoint and exit code 75, no worker
    error, and its resume ends bit-identical to the uninterrupted run (which had no workers: the
    augmentation does not depend on them)."""
    out = tmp_path / "run"
    args = [
        "--dataset",
        str(digits96),
        "--max-steps",
        "16",
        "--checkpoint-every",
        "1000",
        "--workers",
        "1",
        "--output-dir",
        str(out),
    ]
    proc = subprocess.Popen(
        recipe(args), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    wait_for(lambda: logged_steps(out) >= 3, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-3000:]
    assert "stopped by SIGTERM" in stdout and "DataLoader worker" not in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and [p.name for p in (out / "checkpoints").iterdir()] == [
        f"step_{summary['steps']:06d}"
    ]
    done = subprocess.run(recipe(args + ["--resume", "auto"]), capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert same_weights(out / "model.safetensors", uninterrupted / "model.safetensors")
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 17))


@pytest.mark.slow
def test_sigint_with_output_to_a_closed_pipe_still_checkpoints_and_exits_75(digits96, uninterrupted, tmp_path):
    """`... | tee log` and Ctrl-C: the terminal's SIGINT ends tee too, so every later print of the run (the
    progress bar on each step, the stop message) meets a pipe without a reader. The run still finishes
    its step, checkpoints, exits 75, and its resume ends bit-identical to the uninterrupted run."""
    out = tmp_path / "run"
    args = [
        a
        for a in recipe(
            ["--dataset", str(digits96), "--max-steps", "16", "--checkpoint-every", "1000", "--output-dir", str(out)]
        )
        if a != "--no-progress"
    ]  # the progress bar writes at every step
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(args, env=ENV, stdout=write_end, stderr=write_end, start_new_session=True)
    os.close(write_end)
    wait_for(lambda: logged_steps(out) >= 2, proc)
    os.close(read_end)  # tee is gone
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 75
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGINT" and [p.name for p in (out / "checkpoints").iterdir()] == [
        f"step_{summary['steps']:06d}"
    ]
    done = subprocess.run(
        recipe(["--dataset", str(digits96), "--max-steps", "16", "--output-dir", str(out), "--resume", "auto"]),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert same_weights(out / "model.safetensors", uninterrupted / "model.safetensors")


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_passed_over_and_the_resume_is_exact(uninterrupted, digits96, tmp_path):
    """A run killed before its last checkpoint, whose newest checkpoint then had a byte flipped in its
    weights: --resume auto names it in one line, resumes from the one before and ends bit-identical to
    the uninterrupted run, each step logged once. (Truncated and missing files: test_checkpoint_integrity.py.)"""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    shutil.rmtree(out / "checkpoints" / "step_000016")
    (out / "model.safetensors").unlink()
    weights = out / "checkpoints" / "step_000014" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # in the last tensor's values
    weights.write_bytes(bytes(data))
    args = [
        "--dataset",
        str(digits96),
        "--max-steps",
        "16",
        "--checkpoint-every",
        "2",
        "--output-dir",
        str(out),
        "--resume",
        "auto",
    ]
    done = subprocess.run(recipe(args), capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    damaged = [line for line in done.stdout.splitlines() if "is damaged" in line]
    assert len(damaged) == 1 and "step_000014 is damaged (model.safetensors does not match its checksum)" in damaged[0]
    assert "resuming from step_000012" in damaged[0]
    assert same_weights(out / "model.safetensors", uninterrupted / "model.safetensors")
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 17))


def read_until_closed(fd: int, into: list) -> None:
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the terminal's other side is closed
            return
        if not chunk:
            return
        into.append(chunk)


@pytest.mark.slow
def test_ctrl_c_under_accelerate_launch_piped_to_tee_checkpoints_however_long_it_takes(
    digits96, uninterrupted, tmp_path
):
    """`accelerate launch ... | tee log` in a terminal (a pseudo-terminal here), Ctrl-C during training, and a
    stop checkpoint that takes 8 s, longer than the 5 s accelerate's launcher waits between its SIGTERM and
    its SIGKILL: the Ctrl-C reaches the training process alone, which finishes its step, checkpoints and exits
    75 (the launcher reports 'exit status 75', and exits 1); tee keeps logging to the end; the resume ends
    bit-identical to the uninterrupted run."""
    import fcntl
    import shlex
    import termios
    import threading

    out, log = tmp_path / "run", tmp_path / "log"
    launch = [
        *accelerate_launch(1),
        str(ROOT / "tests" / "launch_slow_checkpoint.py"),
        *TINY,
        "--dataset",
        str(digits96),
        "--max-steps",
        "16",
        "--checkpoint-every",
        "1000",
        "--workers",
        "1",
        "--output-dir",
        str(out),
    ]
    terminal, child_end = os.openpty()
    proc = subprocess.Popen(
        ["bash", "-c", f"set -o pipefail; {shlex.join(launch)} 2>&1 | tee {shlex.quote(str(log))}"],
        stdin=child_end,
        stdout=child_end,
        stderr=child_end,
        env=ENV,
        cwd=ROOT,
        start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
    )  # the terminal is the job's, as in a shell
    os.close(child_end)
    screen = []
    threading.Thread(
        target=read_until_closed, args=(terminal, screen), daemon=True
    ).start()  # a terminal nobody reads blocks its writers
    start = time.time()
    while logged_steps(out) < 3:
        assert proc.poll() is None and time.time() - start < 240, b"".join(screen)[-3000:]
        time.sleep(0.05)
    os.write(terminal, b"\x03")  # Ctrl-C
    assert proc.wait(timeout=240) == 1
    text = log.read_text()
    assert "stopped by SIGINT after step" in text and "exit status 75" in text, text[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGINT" and [p.name for p in (out / "checkpoints").iterdir()] == [
        f"step_{summary['steps']:06d}"
    ]
    os.close(terminal)
    done = subprocess.run(
        recipe(["--dataset", str(digits96), "--max-steps", "16", "--output-dir", str(out), "--resume", "auto"]),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert same_weights(out / "model.safetensors", uninterrupted / "model.safetensors")


@pytest.mark.slow
def test_ctrl_z_suspends_the_whole_job_and_ctrl_c_after_fg_still_checkpoints(digits96, tmp_path):
    """In an interactive shell (job control on): Ctrl-Z while the training process holds the terminal stops the
    whole job (the shell reports it stopped; no step is taken), `fg` continues it, and a Ctrl-C then still
    reaches the training process (not one of its DataLoader workers), which stops with a checkpoint."""
    import fcntl
    import shlex
    import termios
    import threading

    out = tmp_path / "run"
    launch = [
        *accelerate_launch(1),
        str(ROOT / "recipes" / "pretrain_mpp.py"),
        *TINY,
        "--dataset",
        str(digits96),
        "--max-steps",
        "400",
        "--checkpoint-every",
        "1000",
        "--workers",
        "2",
        "--output-dir",
        str(out),
    ]
    terminal, child_end = os.openpty()
    proc = subprocess.Popen(
        ["bash", "--norc", "--noprofile", "-i"],
        stdin=child_end,
        stdout=child_end,
        stderr=child_end,
        env={**ENV, "PS1": "$ "},
        cwd=ROOT,
        start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
    )
    os.close(child_end)
    screen = []
    threading.Thread(target=read_until_closed, args=(terminal, screen), daemon=True).start()
    shown = lambda: b"".join(screen).decode(errors="replace")  # noqa: E731

    def until(condition, what, timeout=240):
        start = time.time()
        while not condition():
            assert time.time() - start < timeout, f"no {what}: {shown()[-3000:]}"
            time.sleep(0.1)

    os.write(terminal, (shlex.join(launch) + "\n").encode())
    until(lambda: logged_steps(out) >= 3, "training")
    os.write(terminal, b"\x1a")  # Ctrl-Z
    until(lambda: "Stopped" in shown(), "job stopped")
    stopped_at = logged_steps(out)
    time.sleep(3)
    assert logged_steps(out) == stopped_at  # the training process stopped with the job
    os.write(terminal, b"fg\n")
    until(lambda: logged_steps(out) > stopped_at, "step after fg")
    os.write(terminal, b"\x03")  # Ctrl-C
    until(lambda: (out / "summary.json").exists(), "stop")
    until(lambda: "exit status 75" in shown(), "launcher's report")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGINT" and [p.name for p in (out / "checkpoints").iterdir()] == [
        f"step_{summary['steps']:06d}"
    ]
    os.write(terminal, b"exit\n")
    proc.wait(timeout=60)
    os.close(terminal)


def launch_2(args):
    return LAUNCH_2_CPU + [str(ROOT / "recipes" / "pretrain_mpp.py"), *TINY, "--batch-size", "16", *args]


@pytest.mark.slow
def test_sigterm_to_a_two_process_launch_with_workers_checkpoints_and_resumes_exactly(digits96, tmp_path):
    """2 gloo processes with a DataLoader worker each; SIGTERM to every process group of the launch at
    once (the launcher's and each rank's, as a scheduler signals every process; the launcher forwards it
    to the ranks once more): both ranks stop at one step with one checkpoint, no worker error, and the
    resume ends bit-identical to the uninterrupted 2-process run. A resume by 1 process is refused."""
    env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    args = [
        "--dataset",
        str(digits96),
        "--max-steps",
        "12",
        "--checkpoint-every",
        "1000",
        "--workers",
        "1",
        "--log-every",
        "2",
    ]
    full = tmp_path / "full"
    done = subprocess.run(
        launch_2(args + ["--output-dir", str(full)]), capture_output=True, text=True, env=env, timeout=400
    )
    assert (full / "model.safetensors").is_file(), done.stderr[-3000:]
    out = tmp_path / "run"
    proc = subprocess.Popen(
        launch_2(args + ["--output-dir", str(out)]),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    wait_for(lambda: logged_steps(out) >= 2, proc)
    groups = {os.getpgid(p.pid) for p in psutil.Process(proc.pid).children(recursive=True)} | {proc.pid}
    for group in groups:
        os.killpg(group, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert "stopped by SIGTERM" in stdout and "DataLoader worker" not in stderr, stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] < 12
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{summary['steps']:06d}"]
    assert not (out / "model.safetensors").exists()
    # resumed by one process, the checkpoint's data position and step total would mean something else: refused
    one = subprocess.run(
        recipe(args + ["--batch-size", "16", "--output-dir", str(out), "--resume", "auto"]),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert one.returncode == 2 and one.stderr.strip().splitlines()[-1].startswith("error: --resume: ")
    assert (
        "was made with 2 processes, this launch has 1 process" in one.stderr
        and len(one.stderr.strip().splitlines()) == 1
    )
    resumed = subprocess.run(
        launch_2(args + ["--output-dir", str(out), "--resume", "auto"]),
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
    )
    assert (out / "model.safetensors").is_file(), resumed.stderr[-3000:]
    assert same_weights(out / "model.safetensors", full / "model.safetensors")
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(
        range(2, 13, 2)
    )


class Images:
    def set_epoch(self, epoch):
        pass


@pytest.mark.parametrize("fused", [False, True], ids=["host-check", "fused-found-inf"])
def test_nonfinite_gradients_are_skipped_then_stop_the_run(tmp_path, fused):
    dist = init_processes(threads=None)
    run = open_run(dist, str(tmp_path / "run"), None, grad_accum=1)
    model = torch.nn.Linear(3, 1)
    # fused AdamW skips inside its kernel (no host sync); SGD here is skipped by the loop on the host
    optimizer = (
        torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
        if fused
        else torch.optim.SGD(model.parameters(), lr=0.1)
    )
    assert NonFiniteGuard(optimizer, 3, 0, torch.device("cpu")).on_device == fused
    batches = [{"pixels": torch.randn(4, 3), "bad": []} for _ in range(6)]
    poisoned = {2, 3}  # 0-based batches whose loss is NaN
    seen = []

    def step_fn(model, batch):
        i = len(seen)
        seen.append([p.detach().clone() for p in model.parameters()])
        loss = model(batch["pixels"]).pow(2).mean()
        return (loss * float("nan") if i in poisoned else loss), torch.zeros(())

    settings = LoopSettings(
        total_steps=6,
        lr_at=lambda step: 0.1,
        clip_grad=0,
        log_every=3,
        checkpoint_every=100,
        keep_checkpoints=1,
        batch_size=4,
        progress=False,
        max_nonfinite=3,
    )
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
    with pytest.raises(
        NonFiniteError, match=r"3 optimiser steps in a row with a non-finite gradient \(found at step 3\)"
    ):
        fit(run2, model, optimizer, batches, Images(), step_fn, settings)
    assert not (run2.run_dir / "checkpoints").exists()  # nothing written over a good checkpoint


class FakeClock:
    """A clock that moves only when told to: timing tests that do not depend on the machine's load."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_data_wait_share_measures_time_spent_waiting_for_batches(tmp_path):
    dist = init_processes(threads=None)
    run = open_run(dist, str(tmp_path / "run"), None, grad_accum=1)
    model = torch.nn.Linear(3, 1)
    clock = FakeClock()

    class SlowBatches(list):  # the loader needs 3 s a batch
        def __iter__(self):
            for batch in super().__iter__():
                clock.now += 3.0
                yield batch

    def step_fn(model, batch):  # the step 1 s
        clock.now += 1.0
        return model(batch["pixels"]).pow(2).mean(), torch.zeros(())

    settings = LoopSettings(
        total_steps=8,
        lr_at=lambda step: 0.1,
        clip_grad=0,
        log_every=4,
        checkpoint_every=100,
        keep_checkpoints=1,
        batch_size=4,
        progress=False,
        clock=clock,
    )
    fit(
        run,
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        SlowBatches(linear_batches(8)),
        Images(),
        step_fn,
        settings,
    )
    records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8]
    assert [r["data_wait_share"] for r in records] == [0.75, 0.75]  # 3 s of every 4 waiting
    assert [r["images_per_sec"] for r in records] == [1.0, 1.0]  # 4 images every 4 s


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, capsys):
    """Disk full during the step-4 checkpoint: the partial folder goes, step 2 stays valid, the run says so and
    goes on."""
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
    settings = LoopSettings(
        total_steps=5,
        lr_at=lambda step: 0.1,
        clip_grad=0,
        log_every=5,
        checkpoint_every=2,
        keep_checkpoints=3,
        batch_size=4,
        progress=False,
    )
    seen_at_step_5 = []  # the folder right after the failed write, before the next save could tidy up

    def on_step(step):
        if step == 5:
            seen_at_step_5.extend(sorted(p.name for p in (run.run_dir / "checkpoints").iterdir()))

    result = fit(
        run,
        model,
        optimizer,
        batches,
        Images(),
        lambda m, b: (m(b["pixels"]).pow(2).mean(), torch.zeros(())),
        settings,
        on_step=on_step,
    )
    assert result.step == 5
    assert seen_at_step_5 == ["step_000002"]  # the partial .tmp-step_000004 is gone at once
    names = sorted(p.name for p in (run.run_dir / "checkpoints").iterdir())
    assert names == ["step_000002", "step_000005"]  # no step 4, no leftover .tmp- folder
    out = capsys.readouterr().out
    assert "checkpoint at step 4 could not be written (No space left on device)" in out and "step_000002" in out


def linear_batches(n):
    return [{"pixels": torch.randn(4, 3), "bad": []} for _ in range(n)]


def square_loss(model, batch):
    return model(batch["pixels"]).pow(2).mean(), torch.zeros(())


def test_keep_checkpoints_keeps_exactly_the_newest(tmp_path):
    """A checkpoint every step, --keep-checkpoints 2: after each save exactly the newest two remain,
    the one just written among them."""
    dist = init_processes(threads=None)
    run = open_run(dist, str(tmp_path / "run"), None, grad_accum=1)
    model = torch.nn.Linear(3, 1)
    seen = {}  # step -> checkpoints present when that step begins (after the previous step's save)

    def on_step(step):
        seen[step] = sorted(p.name for p in (run.run_dir / "checkpoints").glob("*")) if step > 1 else []

    settings = LoopSettings(
        total_steps=5,
        lr_at=lambda step: 0.1,
        clip_grad=0,
        log_every=5,
        checkpoint_every=1,
        keep_checkpoints=2,
        batch_size=4,
        progress=False,
    )
    fit(
        run,
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        linear_batches(6),
        Images(),
        square_loss,
        settings,
        on_step=on_step,
    )
    newest_two = {step: [f"step_{s:06d}" for s in range(max(1, step - 2), step)] for step in range(2, 6)}
    assert {step: seen[step] for step in range(2, 6)} == newest_two
    assert sorted(p.name for p in (run.run_dir / "checkpoints").iterdir()) == ["step_000004", "step_000005"]


class Interrupted(Exception):
    pass


def interrupting(signum, frame):
    raise Interrupted


@pytest.fixture()
def recognisable_handlers():
    """SIGINT and SIGTERM raise Interrupted before the loop (instead of KeyboardInterrupt or death)."""
    originals = {sig: signal.signal(sig, interrupting) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in originals.items():
        signal.signal(sig, handler)


def signalling_fit(run, send):
    """fit() over 6 batches of a linear model; send() runs in the second step. (result or None, steps begun)"""
    calls = []

    def step_fn(model, batch):
        calls.append(1)
        if len(calls) == 2:
            send()
        return square_loss(model, batch)

    settings = LoopSettings(
        total_steps=6,
        lr_at=lambda step: 0.1,
        clip_grad=0,
        log_every=100,
        checkpoint_every=100,
        keep_checkpoints=3,
        batch_size=4,
        progress=False,
    )
    model = torch.nn.Linear(3, 1)
    return fit(
        run, model, torch.optim.SGD(model.parameters(), lr=0.1), linear_batches(6), Images(), step_fn, settings
    ), calls


def test_a_second_signal_interrupts_at_once(tmp_path, recognisable_handlers, monkeypatch):
    """The first SIGINT asks for a stop after the step (checkpoint, stopped_by); one more after the grace
    period reaches the handler that was there before the loop (Python's KeyboardInterrupt; here a
    recognisable exception)."""
    from mpp.training.guards import StopSignals

    monkeypatch.setattr(StopSignals, "grace", 0.2)
    dist = init_processes(threads=None)
    run = open_run(dist, str(tmp_path / "once"), None, grad_accum=1)
    result, calls = signalling_fit(run, lambda: os.kill(os.getpid(), signal.SIGINT))
    assert result.stopped_by == "SIGINT" and result.step == 2 and len(calls) == 2
    assert [p.name for p in (run.run_dir / "checkpoints").iterdir()] == ["step_000002"]
    assert signal.getsignal(signal.SIGINT) is interrupting  # the loop left the handlers as it found them

    def twice():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGINT)

    run = open_run(dist, str(tmp_path / "twice"), None, grad_accum=1)
    with pytest.raises(Interrupted):
        signalling_fit(run, twice)
    assert not (run.run_dir / "checkpoints").exists()  # no step finished, nothing saved
    assert signal.getsignal(signal.SIGINT) is interrupting


def test_a_launchers_forwarded_signal_is_the_same_request(tmp_path, recognisable_handlers, monkeypatch):
    """Ctrl-C under accelerate's launcher: the terminal's SIGINT and the launcher's SIGTERM arrive together.
    They are one request: the step finishes, a checkpoint is written, stopped_by names the first; and no
    signal is lost to a handler swapped under it (Python's "Signal 15 ignored due to race condition")."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)

    def both_at_once():  # both pending before Python runs either handler
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})

    run = open_run(init_processes(threads=None), str(tmp_path / "run"), None, grad_accum=1)
    result, calls = signalling_fit(run, both_at_once)
    assert result.stopped_by == "SIGINT" and result.step == 2 and len(calls) == 2
    assert [p.name for p in (run.run_dir / "checkpoints").iterdir()] == ["step_000002"]
    assert unraisable == []
    assert signal.getsignal(signal.SIGTERM) is interrupting


@pytest.fixture()
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; these tests need another mixed precision than the rest."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def nan_from(first_bad: int):
    calls = []

    def step_fn(model, batch):
        calls.append(1)
        loss, metric = square_loss(model, batch)
        return (loss * float("nan") if len(calls) > first_bad else loss), metric

    return step_fn


def test_fp16_on_cpu_keeps_the_nonfinite_guard(tmp_path, fresh_accelerate_state):
    """accelerate makes no GradScaler on a CPU (fp16 runs in fp32 there): nothing but the guard stands
    between a NaN gradient and the weights, so it must stay on."""
    from accelerate import Accelerator

    from mpp.training.run_setup import FRESH_STATE, Run

    accelerator = Accelerator(mixed_precision="fp16", cpu=True)
    assert accelerator.mixed_precision == "fp16" and accelerator.scaler is None
    run = Run(accelerator, tmp_path, None, dict(FRESH_STATE))
    model = torch.nn.Linear(3, 1)
    settings = LoopSettings(
        total_steps=6,
        lr_at=lambda step: 0.1,
        clip_grad=0,
        log_every=3,
        checkpoint_every=100,
        keep_checkpoints=1,
        batch_size=4,
        progress=False,
        max_nonfinite=2,
    )
    with pytest.raises(NonFiniteError, match="2 optimiser steps in a row"):
        fit(run, model, torch.optim.SGD(model.parameters(), lr=0.1), linear_batches(6), Images(), nan_from(1), settings)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_with_a_grad_scaler_leaves_nonfinite_steps_to_it(tmp_path, fresh_accelerate_state):
    """The GPU fp16 path, with torch's CPU GradScaler standing in for accelerate's CUDA one: the scaler
    skips each overflowing step and lowers its scale, the loop neither skips (the scaler must see every
    step) nor stops. Not tested on CPU: fp16 autocast kernels and accelerate's own choice of scaler."""
    from accelerate import Accelerator

    from mpp.training.run_setup import FRESH_STATE, Run

    accelerator = Accelerator(mixed_precision="fp16", cpu=True)
    accelerator.native_amp, accelerator.scaler = (
        True,
        torch.amp.GradScaler("cpu", init_scale=2.0**8),
    )  # what accelerate does on a GPU
    model = torch.nn.Linear(3, 1)
    optimizer = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    run = Run(accelerator, tmp_path, None, dict(FRESH_STATE))
    weights = []
    step_fn = nan_from(2)  # every batch after the second is NaN: far more in a row than max_nonfinite

    def on_step(step):
        weights.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))

    settings = LoopSettings(
        total_steps=6,
        lr_at=lambda step: 0.1,
        clip_grad=1.0,
        log_every=3,
        checkpoint_every=100,
        keep_checkpoints=1,
        batch_size=4,
        progress=False,
        max_nonfinite=2,
    )
    result = fit(run, model, optimizer, linear_batches(6), Images(), step_fn, settings, on_step=on_step)
    assert result.step == 6 and result.stopped_by is None
    assert not torch.equal(weights[0], weights[1])  # good steps moved the weights
    assert all(torch.equal(weights[1], w) for w in weights[2:])  # the NaN steps did not
    assert accelerator.scaler.get_scale() == 2.0**8 / 2**4  # halved once per skipped step
