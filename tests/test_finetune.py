"""Fine-tuning: every kind of init, the strict-but-head loading, position-embedding interpolation."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed

from mpp import load_backbone
from mpp.errors import UsageError
from mpp.models.model import create_encoder
from mpp.models.weights import load_encoder_weights
from mpp.training.finetune import build_classifier, low_label_subset
from mpp.training.finetune_config import FinetuneConfig

ROOT = Path(__file__).parents[1]


@pytest.fixture()
def mpp_weights(exported):
    run_dir, model = exported
    return run_dir / "model.safetensors", model


def test_init_from_mpp_weights_loads_everything_but_the_head(mpp_weights):
    path, mpp_model = mpp_weights
    model, arch = build_classifier(FinetuneConfig(init=str(path)), num_classes=10)
    assert arch == dict(timm_model="test_vit", img_size=28, patch_size=7, mean=[0.5] * 3, std=[0.5] * 3)
    for k, v in mpp_model.encoder.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert model.head.weight.shape == (10, 64) and (model.head.weight == 0).all()  # paper preset: zero head


def test_init_from_a_run_folder_reads_its_model_safetensors(mpp_weights, tmp_path):
    """--init runs/RUN (a folder timm itself loads) is the folder's model.safetensors; a folder without one is
    refused."""
    path, mpp_model = mpp_weights
    model, arch = build_classifier(FinetuneConfig(init=str(path.parent)), num_classes=10)
    assert arch["timm_model"] == "test_vit" and torch.equal(model.pos_embed, mpp_model.encoder.pos_embed)
    with pytest.raises(UsageError, match="a folder without model.safetensors"):
        build_classifier(FinetuneConfig(init=str(tmp_path)), num_classes=10)


def test_higher_resolution_interpolates_position_embeddings_like_timm(mpp_weights):
    path, mpp_model = mpp_weights
    model, arch = build_classifier(FinetuneConfig(init=str(path), img_size=42), num_classes=10)  # 4x4 -> 6x6
    expected = resample_abs_pos_embed(
        mpp_model.encoder.pos_embed.detach(), new_size=(6, 6), old_size=(4, 4), num_prefix_tokens=1
    )
    assert arch["img_size"] == 42 and arch["patch_size"] == 7
    assert torch.allclose(model.pos_embed, expected, atol=1e-6)


def test_missing_non_head_key_is_refused(mpp_weights, tmp_path):
    path, _ = mpp_weights
    tensors = load_file(path)
    del tensors["blocks.3.mlp.fc1.weight"]
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), metadata=meta)
    with pytest.raises(UsageError, match=r"only the head may be missing; missing \['blocks.3.mlp.fc1.weight'\]"):
        build_classifier(FinetuneConfig(init=str(broken)), num_classes=10)


def test_other_architecture_and_corrupt_file_are_refused(mpp_weights, tmp_path):
    path, _ = mpp_weights
    other = create_encoder("vit_tiny_patch16_224", 28, 7, depth=2)
    with pytest.raises(
        UsageError, match=r"weights of another architecture: blocks.0.attn.proj.bias \(64,\) vs model \(192,\)"
    ):
        load_encoder_weights(other, load_file(path), "--init x")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UsageError, match="not a readable safetensors file"):
        build_classifier(FinetuneConfig(init=str(corrupt)), num_classes=10)
    with pytest.raises(UsageError, match="could not get timm's pretrained weights"):
        build_classifier(FinetuneConfig(init="timm:test_vit.r160_in1k"), num_classes=10)  # offline in tests


def test_low_label_subset_is_reproducible():
    from datasets import Dataset

    ds = Dataset.from_dict({"label": [i % 4 for i in range(400)], "x": list(range(400))})
    a = low_label_subset(ds, "label", 7, None, seed=1)
    assert len(a) == 28 and sorted(a["label"]) == sorted([0, 1, 2, 3] * 7)
    assert (
        a["x"]
        == low_label_subset(ds, "label", 7, None, seed=1)["x"]
        != low_label_subset(ds, "label", 7, None, seed=2)["x"]
    )
    with pytest.raises(UsageError, match="class 0 has only 100"):
        low_label_subset(ds, "label", 101, None, seed=1)


def run_finetune(args, tmp_path, ok=True):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "finetune.py"), *args, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_finetune_each_init_end_to_end(mpp_weights, tmp_path):
    """scratch -> supervised weights; MPP weights; then the supervised weights as init: each a few steps."""
    path, _ = mpp_weights
    common = [
        "--dataset",
        "mnist5k",
        "--eval-split",
        "train",
        "--train-per-class",
        "8",
        "--max-steps",
        "3",
        "--batch-size",
        "16",
        "--eval-every",
        "1",
    ]
    run_finetune(
        common
        + [
            "--init",
            "scratch",
            "--model",
            "test_vit",
            "--img-size",
            "28",
            "--patch-size",
            "7",
            "--output-dir",
            str(tmp_path / "scratch"),
        ],
        tmp_path,
    )
    run_finetune(common + ["--init", str(path), "--preset", "modern", "--output-dir", str(tmp_path / "mpp")], tmp_path)
    run_finetune(
        common + ["--init", str(tmp_path / "scratch" / "model.safetensors"), "--output-dir", str(tmp_path / "sup")],
        tmp_path,
    )
    for name in ("scratch", "mpp", "sup"):
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert 0 <= results["final_top1"] <= 1 and results["steps"] == 3 and results["train_images"] == 80
    # the fine-tuned file carries its head and class names, and loads strictly in timm / load_backbone
    model = load_backbone(tmp_path / "sup" / "model.safetensors", num_classes=10)
    tensors = load_file(tmp_path / "sup" / "model.safetensors")
    assert torch.equal(model.head.weight, tensors["head.weight"])
    from mpp import read_metadata

    meta = read_metadata(tmp_path / "sup" / "model.safetensors")
    assert (
        meta["num_classes"] == 10
        and meta["class_names"][3] == "3"
        and meta["init"].endswith("scratch/model.safetensors")
    )


BAD = [
    (["--dataset", "photos"], "fine-tuning needs labels"),
    (["--label-column", "digit"], "--label-column 'digit' not in the dataset"),
    (["--init", "nowhere.safetensors"], "--init nowhere.safetensors: no such file"),
    (["--init", "timm:vit_nonexistent_thing"], "is not a timm model"),
    (["--train-per-class", "501"], "--train-per-class 501: class 0 has only 500"),
    (["--train-per-class", "5", "--train-fraction", "0.5"], "not both"),
    (["--train-fraction", "1.5"], "--train-fraction must be in (0, 1]"),
    (["--preset", "fancy"], "invalid choice: 'fancy'"),
    (["--mixup", "0.8", "--batch-size", "15"], "mixup/cutmix need an even --batch-size"),
    (["--layer-decay", "1.5"], "--layer-decay must be in (0, 1]"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--eval-every", "0"], "--eval-every must be at least 1"),
    (["--img-size", "30", "--patch-size", "7"], "--img-size 30 is not divisible by --patch-size 7"),
    (["--dataset", "./no/such/place"], "no such file or folder"),
    (["--opt", "rmsprop_tf_fancy"], "--opt 'rmsprop_tf_fancy'"),
    (["--test-split", "train"], "--test-split train is also the --eval-split"),
    (["--eval-split", "test", "--test-split", "test"], "--test-split test is also the --eval-split"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_finetune_invocations(args, message, refused):
    from mpp.commands.finetune import parse_config as parse_finetune_config
    from mpp.training.finetune import finetune

    assert message in refused(
        lambda a: finetune(parse_finetune_config(a)), ["--dataset", "mnist5k", "--eval-split", "train", *args]
    )


def test_finetune_recipe_process_reports_one_line(tmp_path):
    proc = run_finetune(["--dataset", "photos", "--output-dir", str(tmp_path / "out")], tmp_path, ok=False)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: fine-tuning needs labels")


def test_zero_head_zeroes_every_head_of_a_distilled_model():
    """The paper preset's zero-initialised head: DeiT distilled models have a second head (head_dist)."""
    cfg = FinetuneConfig(
        init="scratch", model="deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, preset="paper"
    )
    model, _ = build_classifier(cfg, num_classes=5)
    for head in (model.head, model.head_dist):
        assert head.weight.abs().sum() == 0 and head.bias.abs().sum() == 0
    assert model.blocks[0].attn.qkv.weight.abs().sum() > 0  # only the heads
