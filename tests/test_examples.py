"""The examples run as a user runs them (python examples/X.py) on a handful of steps; each ends by loading
what it saved with timm and checking it against the model in memory. Here the folder is read again: timm's
load must hold exactly the file's tensors, MPP.from_pretrained the head's."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from mpp import MPP

ROOT = Path(__file__).parents[1]
NO_LIGHTNING = importlib.util.find_spec("lightning") is None


def run_example(name: str, out: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, f"examples/{name}", "--steps", "3", "--batch-size", "16", "--output-dir", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "plain_pytorch.py",
        pytest.param(
            "lightning_module.py", marks=pytest.mark.skipif(NO_LIGHTNING, reason="pip install 'vit-mpp[lightning]'")
        ),
    ],
)
def test_example_trains_saves_and_loads_in_timm(name, tmp_path):
    out = tmp_path / "out"
    stdout = run_example(name, out)
    assert "gives the same encoder" in stdout
    encoder = timm.create_model(f"local-dir:{out}", pretrained=True)
    saved = load_file(out / "model.safetensors")
    assert encoder.state_dict().keys() == saved.keys() and all(
        torch.equal(v, saved[k]) for k, v in encoder.state_dict().items()
    )
    objective = MPP.from_pretrained(out)
    head = load_file(out / "mpp_head.safetensors")
    assert all(torch.equal(v, objective.state_dict()[k]) for k, v in head.items())
    assert torch.isfinite(objective(torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8)).loss)
