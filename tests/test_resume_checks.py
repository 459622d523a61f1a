"""A resume keeps what the run was launched with: changes that alter what is trained are refused, every
launch is recorded, and the first launch's configuration is kept."""

import json
from pathlib import Path

import pytest
import torch

from mpp.errors import UsageError
from mpp.training.loop import LoopSettings, fit
from mpp.training.manifest import write_manifest
from mpp.training.pretrain_config import PretrainConfig
from mpp.training.run_setup import init_processes, open_run, start_logging

SETTINGS = PretrainConfig(model="test_vit", batch_size=16, max_steps=4, output_dir="x").to_dict()


class Images:
    def set_epoch(self, epoch):
        pass


def launch(folder: Path, settings: dict, resume: str | None = None, steps: int = 4, train: bool = True):
    """open_run + start_logging (+ fit of a linear model, a checkpoint every 2 steps), as the recipes do."""
    run = open_run(init_processes(threads=None), str(folder), resume, grad_accum=1, settings=settings)
    start_logging(run, {**settings, "derived": {"launched": len(list((folder / "launches").glob("*")))}})
    if not train:
        return run
    model = run.accelerator.prepare(torch.nn.Linear(3, 1))
    optimizer = run.accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    loop = LoopSettings(
        total_steps=steps,
        lr_at=lambda step: 0.1,
        clip_grad=0,
        log_every=2,
        checkpoint_every=2,
        keep_checkpoints=3,
        batch_size=4,
        progress=False,
    )
    batches = [{"pixels": torch.randn(4, 3), "bad": []} for _ in range(steps)]
    fit(run, model, optimizer, batches, Images(), lambda m, b: (m(b["pixels"]).pow(2).mean(), torch.zeros(())), loop)
    return run


CHANGES = [
    ({"batch_size": 32}, "was made with --batch-size 16, this launch has --batch-size 32"),
    ({"grad_accum": 2}, "was made with --grad-accum 1, this launch has --grad-accum 2"),
    ({"dataset": "fashion-mnist"}, "was made with --dataset mnist5k, this launch has --dataset fashion-mnist"),
    ({"model": "vit_tiny_patch16_224"}, "was made with --model test_vit, this launch has --model vit_tiny_patch16_224"),
    ({"target": "pixels_l2"}, "was made with --target mean3bit, this launch has --target pixels_l2"),
    (
        {"mask_probs": (1.0, 0.0, 0.0)},
        "was made with --mask-probs 0.8 0.1 0.1, this launch has --mask-probs 1.0 0.0 0.0",
    ),
    ({"seed": 1}, "was made with --seed 0, this launch has --seed 1"),
    ({"max_steps": 8}, "was made with --max-steps 4, this launch has --max-steps 8"),
    (
        {"batch_size": 32, "seed": 1},
        "--batch-size 16, this launch has --batch-size 32",
    ),  # the first of several is named
]


@pytest.mark.parametrize("change,message", CHANGES, ids=[" ".join(c) for c, _ in CHANGES])
def test_a_resume_that_changes_what_is_trained_is_refused_in_one_line(tmp_path, change, message):
    launch(tmp_path / "run", SETTINGS)
    with pytest.raises(UsageError) as refused:
        open_run(
            init_processes(threads=None), str(tmp_path / "run"), "auto", grad_accum=1, settings={**SETTINGS, **change}
        )
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert "step_000004" in str(refused.value)


def test_a_resume_with_another_process_count_is_refused(tmp_path):
    """A checkpoint of 2 processes resumed by 1 (recorded as a 2-process launch records it)."""
    launch(tmp_path / "run", SETTINGS)
    state_file = tmp_path / "run" / "checkpoints" / "step_000004" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["launch"]["processes"] == 1 and state["launch"]["batch_size"] == 16
    state["launch"]["processes"] = 2
    state_file.write_text(json.dumps(state))
    write_manifest(state_file.parent)  # else the edited file fails its checksum and the checkpoint is set aside
    with pytest.raises(UsageError, match="was made with 2 processes, this launch has 1 process;"):
        open_run(init_processes(threads=None), str(tmp_path / "run"), "auto", grad_accum=1, settings=SETTINGS)


def test_settings_that_do_not_change_what_is_trained_may_change(tmp_path):
    launch(tmp_path / "run", SETTINGS)
    harmless = {
        "log_every": 1,
        "checkpoint_every": 7,
        "keep_checkpoints": 1,
        "workers": 2,
        "threads": 1,
        "progress": False,
        "report_to": "none",
        "strict_data": True,
    }
    run = open_run(
        init_processes(threads=None), str(tmp_path / "run"), "auto", grad_accum=1, settings={**SETTINGS, **harmless}
    )
    assert run.state["step"] == 4
    with pytest.raises(
        UsageError, match="--workers 0, this launch has --workers 2"
    ):  # a stream's shards follow its workers
        streaming = {**SETTINGS, "streaming": True, "workers": 0}
        launch(tmp_path / "stream", streaming)
        open_run(
            init_processes(threads=None),
            str(tmp_path / "stream"),
            "auto",
            grad_accum=1,
            settings={**streaming, "workers": 2},
        )


def test_each_launch_is_recorded_and_the_first_configuration_kept(tmp_path):
    folder = tmp_path / "run"
    launch(folder, SETTINGS, steps=2)
    first = json.loads((folder / "run_config.json").read_text())
    launch(folder, {**SETTINGS, "log_every": 1}, resume="auto", train=False)
    assert json.loads((folder / "run_config.json").read_text()) == first  # not rewritten by the resume
    launches = sorted((folder / "launches").iterdir())
    assert [p.name for p in launches] == ["launch-001.json", "launch-002.json"]
    records = [json.loads(p.read_text()) for p in launches]
    assert records[0]["resumed_from"] is None and records[0]["config"] == first
    assert records[1]["resumed_from"].endswith("step_000002") and records[1]["config"]["log_every"] == 1


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.x = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


class Crash(Exception):
    pass


def epochs_with_evaluation(folder: Path, resume: str | None = None, crash_at: int | None = None):
    """8 steps of a linear model over 2 epochs of 4 batches, evaluated at epoch 0's end (the run ends at
    epoch 1's), a checkpoint every 4 steps, every step logged; crash_at: the process dies after that step."""
    run = open_run(init_processes(threads=None), str(folder), resume, grad_accum=1, settings=SETTINGS)
    start_logging(run, SETTINGS)
    torch.manual_seed(0)
    collate = lambda rows: {"pixels": torch.stack(rows), "bad": []}  # noqa: E731
    loader = torch.utils.data.DataLoader(Rows(8), batch_size=2, collate_fn=collate)
    model, loader = run.accelerator.prepare(torch.nn.Linear(3, 1), loader)
    optimizer = run.accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    if run.resume_from:
        run.accelerator.load_state(str(run.resume_from))

    def evaluate(epoch, step):
        return {"eval_score": float(model.weight.detach().sum())}

    def on_step(step):
        if step == crash_at:
            raise Crash

    loop = LoopSettings(
        total_steps=8,
        lr_at=lambda step: 0.1,
        clip_grad=0,
        log_every=1,
        checkpoint_every=4,
        keep_checkpoints=3,
        batch_size=2,
        progress=False,
    )
    return fit(
        run,
        model,
        optimizer,
        loader,
        Rows(8),
        lambda m, b: (m(b["pixels"]).pow(2).mean(), torch.zeros(())),
        loop,
        on_epoch_end=evaluate,
        on_step=on_step,
    )


def test_a_resume_at_an_evaluated_epoch_end_logs_each_record_once(tmp_path):
    """Killed after epoch 0's evaluation was logged (it follows the step-4 checkpoint) and resumed from that
    checkpoint: the evaluation runs again but is not logged twice, in metrics.jsonl or in TensorBoard,
    and the steps the killed launch logged after the checkpoint are not shown twice either."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    epochs_with_evaluation(tmp_path / "full")
    with pytest.raises(Crash):
        epochs_with_evaluation(tmp_path / "run", crash_at=6)
    epochs_with_evaluation(tmp_path / "run", resume="auto")

    def shape(folder):  # what was logged, without the timings
        return [
            (r["step"], r["epoch"], sorted(r))
            for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
        ]

    assert shape(tmp_path / "run") == shape(tmp_path / "full")
    assert [s for s, _, keys in shape(tmp_path / "run") if "eval_score" in keys] == [4]
    events = EventAccumulator(str(next((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents*")).parent))
    events.Reload()
    assert [e.step for e in events.Scalars("eval_score")] == [4]
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 9))


def test_a_record_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    with pytest.raises(Crash):
        epochs_with_evaluation(tmp_path / "run", crash_at=5)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "epoch": 1, "lo')  # the kill came in mid-write
    epochs_with_evaluation(tmp_path / "run", resume="auto")
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 4, 5, 6, 7, 8]  # each training step once, epoch 0's evaluation once


class Pairs(torch.utils.data.Dataset):
    """Rows addressed as the training loader addresses them, by (epoch, index) pairs (loader.EpochBatches)."""

    def __init__(self, n: int):
        self.x = torch.randn(n, 3, generator=torch.Generator().manual_seed(1))

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return len(self.x)

    def __getitem__(self, pair):
        return self.x[pair[1]], pair


def collate_pairs(items):
    return {"pixels": torch.stack([x for x, _ in items]), "ids": [tuple(p) for _, p in items], "bad": []}


def training_with_the_real_loader(folder: Path, resume: str | None = None):
    """9 steps of a linear model through the package's training loader (12 rows, batches of 2: 6 steps an
    epoch), a checkpoint every 4 steps (in epoch 0 and in epoch 1). (the (epoch, index) pairs of each step, weights)"""
    from mpp.data.loader import training_loader

    run = open_run(init_processes(threads=None), str(folder), resume, grad_accum=1, settings=SETTINGS)
    start_logging(run, SETTINGS)
    torch.manual_seed(0)
    loader = training_loader(Pairs(12), 2, 0, 0, torch.device("cpu"), collate_pairs)
    model, loader = run.accelerator.prepare(torch.nn.Linear(3, 1), loader)
    optimizer = run.accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    if run.resume_from:
        run.accelerator.load_state(str(run.resume_from))
    seen = []

    def step_fn(model, batch):
        seen.append(batch["ids"])
        return model(batch["pixels"]).pow(2).mean(), torch.zeros(())

    loop = LoopSettings(
        total_steps=9,
        lr_at=lambda step: 0.1,
        clip_grad=0,
        log_every=3,
        checkpoint_every=4,
        keep_checkpoints=3,
        batch_size=2,
        progress=False,
    )
    fit(run, model, optimizer, loader, Pairs(12), step_fn, loop)
    return seen, torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("checkpoint", ["step_000004", "step_000008"], ids=["in epoch 0", "in epoch 1"])
def test_a_resume_mid_epoch_reads_exactly_the_batches_the_uninterrupted_run_reads_next(tmp_path, checkpoint):
    """Through the package's own loader: resumed from a checkpoint mid-epoch, the run reads the rest of
    that epoch and then the next, batch for batch what the uninterrupted run read after that step (no
    batch skipped or read twice), and ends with the same weights."""
    full_seen, full_weights = training_with_the_real_loader(tmp_path / "full")
    assert len(full_seen) == 9 and len({p for batch in full_seen[:6] for p in batch}) == 12  # epoch 0: every row once
    step = int(checkpoint.split("_")[1])
    seen, weights = training_with_the_real_loader(
        tmp_path / "resumed", str(tmp_path / "full" / "checkpoints" / checkpoint)
    )
    assert seen == full_seen[step:]
    assert torch.equal(weights, full_weights)
