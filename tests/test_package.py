"""The package as a user installs it: a vit_mpp wheel built with `pip wheel .` runs the recipes as
`python -m mpp ...` outside the checkout."""

import pytest


@pytest.mark.slow
def test_the_wheel_runs_the_recipes_outside_the_checkout(installed_wheel):
    python, site, away = installed_wheel, installed_wheel.site, installed_wheel.away
    assert installed_wheel.wheel.name.startswith("vit_mpp-")
    where = python("-c", "import mpp; print(mpp.__file__)")
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
    for command in ("pretrain", "finetune", "gap", "ablate", "inspect", "prepare"):
        shown = python("-m", "mpp", command, "--help")
        assert shown.returncode == 0 and f"usage: python -m mpp {command} " in shown.stdout, (
            command + shown.stderr[-2000:]
        )
    refused = python("-m", "mpp", "pretrain", "--mask-ratio", "2")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert python("-m", "mpp", "train").returncode == 2
    run = python(
        "-m",
        "mpp",
        "pretrain",
        "--model",
        "test_vit",
        "--img-size",
        "28",
        "--patch-size",
        "7",
        "--batch-size",
        "16",
        "--max-steps",
        "2",
        "--no-progress",
        "--output-dir",
        str(away / "run"),
    )
    assert run.returncode == 0 and (away / "run" / "model.safetensors").is_file(), run.stderr[-2000:]
    bundled = python(
        "-m", "mpp", "pretrain", "--config", "vit_s16_one_gpu", "--max-steps", "0"
    )  # the wheel ships the configs
    assert "no such file" not in bundled.stderr and (site / "mpp" / "configs" / "paper_vit_b16.yaml").is_file(), (
        bundled.stderr[-2000:]
    )
