"""The soak of stopping and resuming (benchmarks/soak_resume.py), in a small version: 3 kills (one at a step,
one in a checkpoint write, one in an evaluation; SIGKILL, SIGTERM and SIGINT) of a 2-process run with workers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_a_run_killed_three_times_ends_as_the_uninterrupted_run(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "soak_resume.py"),
            "--kills",
            "3",
            "--epochs",
            "4",
            "--seed",
            "1",
            "--out",
            str(tmp_path / "soak"),
            "--workdir",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1500,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    report = json.loads((tmp_path / "soak.json").read_text())
    assert proc.returncode == 0 and report["ok"], proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (
        report["kills"] == 3
        and report["verdict"]["identical_weights"]
        and report["verdict"]["records_equal_to_uninterrupted"]
    )
    killed = [launch for launch in report["launches"] if launch["kind"]]
    assert sorted(launch["kind"] for launch in killed) == ["checkpoint", "evaluation", "step"]
    assert sorted(launch["signal"] for launch in killed) == ["SIGINT", "SIGKILL", "SIGTERM"]
