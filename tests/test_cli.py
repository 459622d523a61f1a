import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpp.cli import run_cli
from mpp.commands.pretrain import parse_config
from mpp.training.pretrain import pretrain
from mpp.training.pretrain_config import PretrainConfig, lr_at, resolve_lr

RECIPE = Path(__file__).parents[1] / "recipes" / "pretrain_mpp.py"


def test_lr_schedule_hand_computed():
    assert lr_at(0, 1.0, 10, 110) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 110) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 10, 110) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_at(60, 1.0, 10, 110) == pytest.approx(0.5)  # half way down the cosine
    assert lr_at(85, 1.0, 10, 110) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))
    assert lr_at(110, 1.0, 10, 110, min_lr=0.1) == pytest.approx(0.1)


def test_lr_scaling_rule():
    assert resolve_lr(PretrainConfig(base_lr=2e-4), global_batch=4096) == pytest.approx(2e-4)  # the paper's
    assert resolve_lr(PretrainConfig(base_lr=2e-4), global_batch=256) == pytest.approx(2e-4 * 256 / 4096)
    assert resolve_lr(PretrainConfig(base_lr=1e-3, ref_batch=256), global_batch=512) == pytest.approx(2e-3)
    assert resolve_lr(PretrainConfig(lr=5e-4), global_batch=999) == 5e-4  # --lr is taken as is


def test_flags_reach_the_config():
    cfg = parse_config(
        ["--mask-probs", "0.5", "0.25", "0.25", "--target", "pixels_l2", "--max-steps", "7", "--crop-scale", "0.5", "1"]
    )
    assert (
        cfg.mask_probs == (0.5, 0.25, 0.25)
        and cfg.target == "pixels_l2"
        and cfg.max_steps == 7
        and cfg.crop_scale == (0.5, 1.0)
    )


def _run(argv):
    return run_cli(lambda a: pretrain(parse_config(a)), argv)


BAD = [
    (["--img-size", "30", "--patch-size", "7"], "--img-size 30 is not divisible by --patch-size 7"),
    (["--mask-ratio", "0"], "--mask-ratio must be in (0, 1)"),
    (["--mask-ratio", "1.5"], "--mask-ratio must be in (0, 1)"),
    (["--mask-probs", "0.8", "0.1", "0.2"], "--mask-probs must sum to 1"),
    (["--mask-probs", "1.2", "-0.1", "-0.1"], "--mask-probs needs three non-negative numbers"),
    (["--model", "vit_does_not_exist"], "--model 'vit_does_not_exist' is not a timm model"),
    (["--model", "resnet18"], "not a timm VisionTransformer"),
    (["--dataset", "./no/such/folder"], "no such file or folder"),
    (["--dataset", "mnist5k", "--image-column", "pixels"], "--image-column 'pixels' not in the dataset"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--lr", "1e-3", "--base-lr", "2e-4"], "not both"),
    (["--resume", "/no/such/checkpoint"], "not a complete checkpoint folder"),
    (["--streaming"], "--streaming needs --max-steps"),
    (["--crop-scale", "0.5", "0.2"], "--crop-scale needs 0 < min <= max <= 1"),
    (["--hflip", "2"], "--hflip is a probability in [0, 1]"),
    (["--betas", "1", "0.9"], "--betas must be two numbers in [0, 1)"),
    (["--log-images-every", "-1"], "--log-images-every must be 0 (off)"),
    (["--warmup-steps", "-1"], "must not be negative"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--img-size", "7", "--patch-size", "7"], "gives one patch"),
    (["--dataset", "mnist5k", "--batch-size", "6000"], "more than the 5000 images"),
    (
        ["--eval-dataset", "mnist5k"],
        "--eval-dataset needs a labelled set with train and test splits: mnist5k has the splits train",
    ),
    (["--eval-every-steps", "0"], "--eval-every-steps must be at least 1"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_invocations_exit_2_with_one_line(argv, message, refused):
    assert message in refused(lambda a: pretrain(parse_config(a)), argv)


def test_unknown_flag_and_bad_choice(capsys):
    for argv, message in [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--target", "rgb"], "invalid choice: 'rgb'"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            parse_config(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err


def test_non_empty_output_dir_needs_resume(tmp_path, capsys):
    (tmp_path / "something").write_text("x")
    with pytest.raises(SystemExit):
        _run(["--output-dir", str(tmp_path), "--no-progress"])
    assert "--resume auto" in capsys.readouterr().err


def test_recipe_process_reports_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(RECIPE), "--mask-ratio", "2", "--output-dir", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --mask-ratio must be in (0, 1), got 2.0"


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["pretrain_mpp.py", "finetune.py"])
def test_under_the_readmes_accelerate_launch_a_bad_flag_is_one_line(recipe, tmp_path):
    """The README's set-up (accelerate config default) and launch (accelerate launch -q): a bad value is the
    recipe's one line, exit code 1 (the launcher's), no launcher warning and no traceback. OMP_NUM_THREADS
    stands for the thread count a CPU user passes (else accelerate names the one it picked, in 3 lines)."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "2"}
    subprocess.run(["accelerate", "config", "default"], env=env, check=True, capture_output=True, timeout=120)
    proc = subprocess.run(
        [
            "accelerate",
            "launch",
            "-q",
            str(RECIPE.parent / recipe),
            "--mask-ratio" if recipe == "pretrain_mpp.py" else "--lr",
            "2" if recipe == "pretrain_mpp.py" else "-1",
            "--output-dir",
            str(tmp_path / "r"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: --"), proc.stderr


def test_help_shows_every_flag_with_its_default():
    proc = subprocess.run([sys.executable, str(RECIPE), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for flag in [
        "--dataset",
        "--model",
        "--img-size",
        "--patch-size",
        "--batch-size",
        "--max-steps",
        "--epochs",
        "--lr",
        "--warmup-steps",
        "--weight-decay",
        "--mask-ratio",
        "--mask-probs",
        "--target",
        "--output-dir",
        "--checkpoint-every",
        "--resume",
        "--seed",
        "--grad-accum",
        "--log-every",
    ]:
        assert flag in proc.stdout
    assert "(default: mnist5k)" in proc.stdout and "(default: (0.8, 0.1, 0.1))" in proc.stdout
