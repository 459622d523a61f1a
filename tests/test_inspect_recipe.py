"""recipes/inspect_run.py run as a user runs it, on run folders made with export_weights."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mpp.models.model import MPP, create_encoder
from mpp.training.pretrain import export_weights
from mpp.training.pretrain_config import PretrainConfig

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "recipes" / "inspect_run.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
ALL_FIGURES = {
    "mpp_predictions.png",
    "patch_embed_pca.png",
    "pos_embed_similarity.png",
    "attention_distance.png",
    "attention_rollout.png",
}
FAST = ["--num-images", "3", "--distance-images", "6"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    torch.manual_seed(2)
    model = MPP(create_encoder("test_vit", 28, 7))
    export_weights(model, PretrainConfig(model="test_vit", img_size=28, patch_size=7), d, step=3)
    return d


def run_script(*args, cwd):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=180
    )


def load_recipe():
    spec = importlib.util.spec_from_file_location("inspect_recipe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_figures(out_dir: Path, expected: set[str]) -> str:
    pngs = {p.name for p in out_dir.glob("*.png")}
    assert pngs == expected
    report = (out_dir / "report.md").read_text()
    for name in expected:
        assert (out_dir / name).stat().st_size > 1000
        with Image.open(out_dir / name) as im:
            im.load()
            assert im.size[0] > 50 and im.size[1] > 50
        assert re.search(rf"!\[[^\]]*\]\({re.escape(name)}\)", report), name
    return report


def test_script_writes_every_figure(run_dir, tmp_path):
    proc = run_script(run_dir, *FAST, "--seed", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = check_figures(run_dir / "inspect", ALL_FIGURES)
    assert "Skipped" not in report and "test_vit" in report and "mnist5k" in report


def test_without_head_the_other_figures_are_written(run_dir, tmp_path, capsys):
    weights_only = tmp_path / "weights"
    weights_only.mkdir()
    shutil.copy(run_dir / "model.safetensors", weights_only)
    out = tmp_path / "figures"
    load_recipe().main([str(weights_only / "model.safetensors"), *FAST, "--output-dir", str(out)])
    report = check_figures(out, ALL_FIGURES - {"mpp_predictions.png"})
    assert re.search(r"MPP predictions: no mpp_head\.safetensors", report)
    assert "skipped MPP predictions: no mpp_head.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--num-images", "0"], "--num-images"),
        (["--dataset", "./no/such/folder"], "--dataset"),
        (["--bogus"], "--bogus"),
    ],
)
def test_bad_input_is_one_line_with_exit_2(run_dir, tmp_path, capsys, args, flag):
    recipe = load_recipe()
    from mpp.cli import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(recipe.main, [str(run_dir), "--output-dir", str(tmp_path / "o"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err


def test_missing_weights_from_the_command_line(tmp_path):
    proc = run_script(tmp_path / "nothing", cwd=tmp_path)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "RUN_DIR_OR_WEIGHTS" in proc.stderr


def test_no_recipe_shadows_a_standard_module():
    # a recipe's folder is sys.path[0]: a recipes/inspect.py would replace the inspect that torch imports
    clashes = [p.name for p in SCRIPT.parent.glob("*.py") if p.stem in sys.stdlib_module_names]
    assert clashes == []


def test_report_for_a_model_without_class_token(tmp_path):
    from mpp.evaluation.report import inspect_model

    enc = create_encoder("test_vit", 28, 7, reg_tokens=2, class_token=False, global_pool="avg")
    images = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    report_path, skipped = inspect_model(MPP(enc, target="pixels_l2"), True, images, images, tmp_path, ["a note"])
    assert not skipped
    report = check_figures(tmp_path, ALL_FIGURES)
    assert "mean over patch tokens" in report and "- a note" in report
