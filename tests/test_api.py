"""mpp.pretrain / mpp.finetune from Python: the settings become the config the command line gives
(compared with the command line's own parser), bad ones are refused as the command line refuses
them, before a run folder exists; a run returns its folder and summary."""

import json
from pathlib import Path

import pytest

import mpp
from mpp.api import resolve_config
from mpp.commands.finetune import build_parser as build_finetune_parser
from mpp.commands.finetune import parse_config as parse_finetune_config
from mpp.commands.pretrain import build_parser, parse_config
from mpp.errors import UsageError
from mpp.training.finetune_config import FinetuneConfig, validate_finetune
from mpp.training.pretrain_config import PretrainConfig, validate


def test_a_config_and_keywords_give_the_command_lines_config():
    got = resolve_config(
        build_parser(),
        PretrainConfig,
        validate,
        PretrainConfig(img_size=32, patch_size=8, hflip=0.0),
        dict(
            mask_probs=[0.7, 0.2, 0.1],
            progress=False,
            random_from="image",
            output_dir=Path("runs/x"),
            lr=1e-3,
            max_steps=7,
            hflip=0.25,
            streaming=False,
        ),
        "test",
    )
    typed = parse_config(
        [
            "--img-size",
            "32",
            "--patch-size",
            "8",
            "--mask-probs",
            "0.7",
            "0.2",
            "0.1",
            "--no-progress",
            "--random-from",
            "image",
            "--output-dir",
            "runs/x",
            "--lr",
            "0.001",
            "--max-steps",
            "7",
            "--hflip",
            "0.25",
        ]
    )
    assert got.to_dict() == typed.to_dict()
    assert got.mask_probs == (0.7, 0.2, 0.1) and got.hflip == 0.25  # the keywords win over the config object


def test_fine_tuning_keywords_give_the_command_lines_config():
    got = resolve_config(
        build_finetune_parser(),
        FinetuneConfig,
        validate_finetune,
        None,
        dict(
            dataset="mnist5k",
            eval_split="train",
            init="scratch",
            model="test_vit",
            img_size=28,
            patch_size=7,
            preset="modern",
            lr=0.01,
            zero_head=True,
            crop_scale=(0.5, 1.0),
        ),
        "test",
    )
    typed = parse_finetune_config(
        [
            "--dataset",
            "mnist5k",
            "--eval-split",
            "train",
            "--init",
            "scratch",
            "--model",
            "test_vit",
            "--img-size",
            "28",
            "--patch-size",
            "7",
            "--preset",
            "modern",
            "--lr",
            "0.01",
            "--zero-head",
            "--crop-scale",
            "0.5",
            "1.0",
        ]
    )
    assert got.to_dict() == typed.to_dict()


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(img_size="x"), "argument --img-size: invalid int value: 'x'"),
        (dict(img_size=28.5), "argument --img-size: invalid int value: '28.5'"),
        (dict(img_size=True), "img_size takes int, got True"),
        (dict(img_size=None), "img_size cannot be None"),
        (dict(mask_ratio=1.5), r"--mask-ratio must be in \(0, 1\), got 1.5"),
        (dict(random_from="same"), "argument --random-from: invalid choice: 'same'"),
        (dict(mask_probs=0.5), "mask_probs takes a list of 3 values"),
        (dict(mask_probs=(0.5, 0.5)), "argument --mask-probs: expected 3 arguments"),
        (dict(progress="no"), "progress takes True or False"),
        (dict(dataset=5), "dataset takes one string, got 5"),
        (dict(colour="red"), "unknown setting 'colour'"),
        (dict(img_size=30, patch_size=7), "--img-size 30 is not divisible by --patch-size 7"),
    ],
)
def test_bad_settings_are_refused_before_anything_runs(settings, message, tmp_path, monkeypatch):
    def no_run(cfg):
        raise AssertionError(f"a run started with {settings}")

    monkeypatch.setattr("mpp.training.pretrain.pretrain", no_run)
    with pytest.raises(UsageError, match=message) as refusal:
        mpp.pretrain(output_dir=tmp_path / "run", **settings)
    assert len(str(refusal.value).splitlines()) == 1 and str(refusal.value).startswith("mpp.pretrain: ")
    assert not (tmp_path / "run").exists()


def test_a_config_of_the_other_command_is_refused():
    with pytest.raises(TypeError, match="mpp.finetune takes a FinetuneConfig"):
        mpp.finetune(PretrainConfig())


@pytest.mark.slow
def test_a_pretraining_and_a_fine_tuning_from_python(tmp_path, make_digit_folder):
    """In one process, as in a notebook: both return their folder and summary, and raise no SystemExit."""
    from mpp import MPP

    run = mpp.pretrain(
        dataset="mnist5k",
        model="test_vit",
        img_size=28,
        patch_size=7,
        batch_size=16,
        max_steps=3,
        warmup_steps=0,
        workers=0,
        progress=False,
        report_to="none",
        output_dir=tmp_path / "pre",
    )
    assert run.run_dir == tmp_path / "pre" and run.stopped_by is None and run.results is None
    assert run.summary == json.loads((run.run_dir / "summary.json").read_text()) and run.summary["steps"] == 3
    assert MPP.from_pretrained(run.run_dir).settings["mask_ratio"] == 0.5
    digits = make_digit_folder(["zero", "one", "two"], train=6, test=3)
    tuned = mpp.finetune(
        dataset=str(digits),
        init=run.run_dir / "model.safetensors",
        max_steps=2,
        batch_size=6,
        workers=0,
        progress=False,
        report_to="none",
        output_dir=tmp_path / "tuned",
    )
    assert tuned.run_dir == tmp_path / "tuned" and tuned.summary["steps"] == 2 and "final_top1" in tuned.summary
    assert json.loads(json.dumps(tuned.results)) == json.loads((tuned.run_dir / "results.json").read_text())
