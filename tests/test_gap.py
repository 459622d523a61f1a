"""recipes/gap.py --quick end to end: the files it writes, every number finite and in [0, 1]."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpp.builtin_data import FASHION_MNIST_DIR

ROOT = Path(__file__).parents[1]


def numbers(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from numbers(v)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield tree


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="apt-get install dataset-fashion-mnist")
def test_gap_quick(tmp_path):
    out = tmp_path / "gap"
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "gap.py"), "--quick", "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert set(report["summary"]) == {"scratch", "mpp", "supervised"}
    for init, seeds in [(i, [s[i] for s in report["per_seed"].values()]) for i in ("scratch", "mpp", "supervised")]:
        for values in seeds:
            assert set(values) >= {"finetune_top1", "knn20", "linear_1shot", "linear_5shot"}, init
            assert all(math.isfinite(v) and 0 <= v <= 1 for v in numbers(values)), values
    assert all(math.isfinite(v) and 0 <= v <= 1 for v in numbers(report["summary"]))
    markdown = (out / "results.md").read_text()
    assert "| mpp |" in markdown and "gap.png" in markdown
    png = (out / "gap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    for arm in ("mpp", "supervised", "finetune_scratch", "finetune_mpp", "finetune_supervised"):
        assert (out / "seed0" / arm / "model.safetensors").is_file(), arm


def test_gap_refuses_more_shots_than_labels(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "gap.py"), "--shots", "50", "--train-per-class", "20",
                           "--output-dir", str(tmp_path / "gap")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--shots 50 is more than the 20 labelled images per class" in proc.stderr
    assert not (tmp_path / "gap").exists()


def test_gap_refuses_a_used_output_dir(tmp_path):
    (tmp_path / "x").write_text("")
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "gap.py"), "--quick", "--output-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "is not empty" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
