"""The package as a user installs it: a vit_mpp wheel built with `pip wheel .` runs the recipes as
`python -m mpp ...` outside the checkout."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_the_wheel_runs_the_recipes_outside_the_checkout(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)], check=True, timeout=300)
    (wheel,) = wheels.glob("*.whl")
    assert wheel.name.startswith("vit_mpp-")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True, timeout=300)
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # the wheel's mpp comes before the checkout's editable install

    def python(*args):
        return subprocess.run([sys.executable, *args], cwd=away, env=env, capture_output=True, text=True, timeout=300)

    where = python("-c", "import mpp; print(mpp.__file__)")
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
    for command in ("pretrain", "finetune", "gap", "ablate", "inspect", "prepare"):
        shown = python("-m", "mpp", command, "--help")
        assert shown.returncode == 0 and "usage:" in shown.stdout, command + shown.stderr[-2000:]
    refused = python("-m", "mpp", "pretrain", "--mask-ratio", "2")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert python("-m", "mpp", "train").returncode == 2
    run = python("-m", "mpp", "pretrain", "--model", "test_vit", "--img-size", "28", "--patch-size", "7", "--batch-size", "16",
                 "--max-steps", "2", "--no-progress", "--output-dir", str(away / "run"))
    assert run.returncode == 0 and (away / "run" / "model.safetensors").is_file(), run.stderr[-2000:]
