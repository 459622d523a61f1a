"""Checkpoint manifests: a damaged newest checkpoint is reported and passed over, a named one refused."""

import json
import os
from pathlib import Path

import pytest
import torch

from mpp.errors import UsageError
from mpp.training.loop import LoopSettings, fit
from mpp.training.manifest import MANIFEST, damage
from mpp.training.run_setup import init_processes, open_run


class Images:
    def set_epoch(self, epoch):
        pass


def square_loss(model, batch):
    return model(batch["pixels"]).pow(2).mean(), torch.zeros(())


def checkpointed_run(folder: Path) -> Path:
    """6 steps of a linear model, a checkpoint every 2: step_000002, _000004, _000006 in folder."""
    run = open_run(init_processes(threads=None), str(folder), None, grad_accum=1)
    model = run.accelerator.prepare(
        torch.nn.Linear(3, 1)
    )  # prepared: save_state writes its weights and optimizer state
    optimizer = run.accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    settings = LoopSettings(
        total_steps=6,
        lr_at=lambda step: 0.1,
        clip_grad=0,
        log_every=2,
        checkpoint_every=2,
        keep_checkpoints=3,
        batch_size=4,
        progress=False,
    )
    batches = [{"pixels": torch.randn(4, 3), "bad": []} for _ in range(6)]
    fit(run, model, optimizer, batches, Images(), square_loss, settings)
    return folder / "checkpoints"


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "a flipped byte in the weights": (
        lambda c: flip_a_byte(c / "model.safetensors"),
        "model.safetensors does not match its checksum",
    ),
    "a truncated optimizer file": (lambda c: truncate(c / "optimizer.bin"), "optimizer.bin has"),
    "a missing RNG file": (lambda c: os.remove(c / "random_states_0.pkl"), "random_states_0.pkl is missing"),
    "a truncated trainer state": (lambda c: truncate(c / "trainer_state.json"), "trainer_state.json has"),
}


def test_a_checkpoint_lists_every_file_with_its_size_and_checksum(tmp_path):
    checkpoints = checkpointed_run(tmp_path / "run")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000002", "step_000004", "step_000006"]
    for checkpoint in checkpoints.iterdir():
        listed = json.loads((checkpoint / MANIFEST).read_text())["files"]
        assert set(listed) == {p.name for p in checkpoint.iterdir()} - {MANIFEST}
        assert all(listed[name]["bytes"] == (checkpoint / name).stat().st_size for name in listed)
        assert damage(checkpoint) is None


@pytest.mark.parametrize("harm", list(DAMAGE), ids=list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, capsys, harm):
    checkpoints = checkpointed_run(tmp_path / "run")
    do, reason = DAMAGE[harm]
    do(checkpoints / "step_000006")
    capsys.readouterr()
    run = open_run(init_processes(threads=None), str(tmp_path / "run"), "auto", grad_accum=1)
    assert run.resume_from.name == "step_000004" and run.state["step"] == 4
    lines = [line for line in capsys.readouterr().out.splitlines() if "damaged" in line]
    assert (
        len(lines) == 1
        and "step_000006 is damaged" in lines[0]
        and reason in lines[0]
        and "resuming from step_000004" in lines[0]
    )
    # set aside: never resumed from, and not counted among the kept checkpoints
    assert sorted(p.name for p in checkpoints.iterdir()) == [".damaged-step_000006", "step_000002", "step_000004"]


def test_damage_to_every_checkpoint_starts_the_run_over(tmp_path, capsys):
    checkpoints = checkpointed_run(tmp_path / "run")
    for step in ("000002", "000004", "000006"):
        flip_a_byte(checkpoints / f"step_{step}" / "model.safetensors")
    run = open_run(init_processes(threads=None), str(tmp_path / "run"), "auto", grad_accum=1)
    assert run.resume_from is None and run.state["step"] == 0
    assert "no earlier checkpoint is left: starting from step 0" in capsys.readouterr().out


def test_a_damaged_checkpoint_named_by_resume_is_refused(tmp_path):
    """--resume PATH says which checkpoint to use: a damaged one is refused in one line, not silently replaced."""
    checkpoints = checkpointed_run(tmp_path / "run")
    truncate(checkpoints / "step_000004" / "model.safetensors")
    with pytest.raises(UsageError) as refused:
        open_run(init_processes(threads=None), str(tmp_path / "other"), str(checkpoints / "step_000004"), grad_accum=1)
    message = str(refused.value)
    assert "\n" not in message and "step_000004: the checkpoint is damaged (model.safetensors has" in message
    assert "--resume auto" in message and (checkpoints / "step_000004").is_dir()
