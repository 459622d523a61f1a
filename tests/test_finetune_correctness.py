"""Fine-tuning results that were silently wrong (evaluation counts) and honest model selection (--test-split)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mpp import load_backbone
from mpp.data.decode import BadImage
from mpp.data.images import collate_images
from mpp.models.model import create_encoder
from mpp.models.weights import load_encoder_weights
from mpp.training.finetune import eval_history, save_classifier, top1

ROOT = Path(__file__).parents[1]


def test_compiled_classifier_saves_timm_keys_that_are_a_valid_init(tmp_path):
    """--compile: the saved file must not carry torch.compile's `_orig_mod.` prefix (no compilation happens here:
    torch.compile wraps lazily, and saving needs only the wrapper)."""
    model = create_encoder("test_vit", 28, 7)
    model.reset_classifier(10)
    compiled = torch.compile(model)
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())  # what the old save wrote
    meta = dict(timm_model="test_vit", img_size=28, patch_size=7, mean=[0.5] * 3, std=[0.5] * 3, num_classes=10)
    save_classifier(tmp_path / "model.safetensors", compiled, meta)
    saved = load_file(tmp_path / "model.safetensors")
    assert saved.keys() == model.state_dict().keys()
    fresh = create_encoder("test_vit", 28, 7)
    fresh.reset_classifier(10)
    load_encoder_weights(fresh, saved, "--init model.safetensors")  # strict for every non-head key: a valid --init
    assert torch.equal(fresh.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    assert torch.equal(load_backbone(tmp_path / "model.safetensors", num_classes=10).head.weight, model.head.weight)


class PixelClassifier(torch.nn.Module):
    """Predicts the class written in an image's first pixel (mean 0, std 1 normalisation)."""

    def forward(self, x):
        return F.one_hot((x[:, 0, 0, 0] * 255).round().long(), 3).float()


def test_unreadable_eval_images_are_left_out_of_top1():
    """3 readable images, 1 right, 1 unreadable: 1/3. The old count scored the filled slot (a copy of the right one):
    0.5."""
    from accelerate import Accelerator

    image = lambda c: torch.full((3, 2, 2), c, dtype=torch.uint8)  # noqa: E731
    items = [(image(0), 0), (image(1), 2), BadImage("x.png", "truncated"), (image(2), 0)]
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(torch.utils.data.DataLoader(items, batch_size=4, collate_fn=collate_images))
    zero, one = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    assert top1(accelerator, PixelClassifier(), loader, zero, one) == (pytest.approx(1 / 3), 1)
    # two ranks: the mask must be gathered (and trimmed) with the predictions
    assert top1(TwoRanks(), PixelClassifier(), loader, zero, one) == (pytest.approx(2 / 6), 1)
    # across batches: 5 readable (2 right), 2 unreadable
    items += [(image(1), 1), BadImage("y.png", "empty"), (image(0), 1)]
    loader = accelerator.prepare(torch.utils.data.DataLoader(items, batch_size=3, collate_fn=collate_images))
    assert top1(accelerator, PixelClassifier(), loader, zero, one) == (pytest.approx(2 / 5), 2)


class TwoRanks:
    """gather_for_metrics as two ranks holding the same batch would give it: concatenated, the sample that
    evened out the last batch (here the final one) trimmed."""

    def gather_for_metrics(self, tensors):
        return tuple(torch.cat([t, t])[:-1] for t in tensors)


def test_eval_history_is_rebuilt_from_metrics_files(tmp_path):
    """A resumed run's history: every evaluation up to the resume step, from this folder and the one resumed from;
    an epoch evaluated again (a resume at its end) counts once, the last record winning."""
    earlier, own = tmp_path / "earlier.jsonl", tmp_path / "own.jsonl"
    records = [
        {"step": 5, "epoch": 0, "loss": 1.0},
        {"step": 5, "epoch": 0, "eval_top1": 0.2},
        {"step": 10, "epoch": 1, "eval_top1": 0.5},
        {"step": 15, "epoch": 2, "eval_top1": 0.9},
    ]
    earlier.write_text("".join(json.dumps(r) + "\n" for r in records))
    own.write_text(json.dumps({"step": 10, "epoch": 1, "eval_top1": 0.5}) + "\n\n")
    assert eval_history([earlier, own, tmp_path / "absent.jsonl"], last_step=10) == [
        {"epoch": 0, "step": 5, "top1": 0.2},
        {"epoch": 1, "step": 10, "top1": 0.5},
    ]
    assert [h["epoch"] for h in eval_history([earlier], last_step=99)] == [0, 1, 2]


@pytest.fixture(scope="module")
def three_splits(tmp_path_factory):
    """train 48 / validation 24 / test 24 MNIST digits of 4 classes, saved with save_to_disk."""
    from datasets import DatasetDict

    from mpp.data.builtin import mnist5k

    ds = mnist5k().shuffle(seed=0)
    ds = ds.filter(lambda y: y < 4, input_columns="label").select(range(96))
    path = tmp_path_factory.mktemp("data") / "splits"
    DatasetDict(
        train=ds.select(range(48)), validation=ds.select(range(48, 72)), test=ds.select(range(72, 96))
    ).save_to_disk(str(path))
    return path


def run_finetune(args):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "finetune.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_accuracy(weights: Path, data: Path, split: str) -> float:
    """Top-1 of a weight file on a split, computed here from timm's own model and the stored pixels."""
    from datasets import load_from_disk

    from mpp.models.weights import read_metadata

    meta = read_metadata(weights)
    model = load_backbone(
        weights, num_classes=meta["num_classes"]
    ).eval()  # its own head (10 digit classes, 4 of them used)
    ds = load_from_disk(str(data))[split].with_format("numpy")
    x = (
        torch.from_numpy(np.asarray(ds["image"])).permute(0, 3, 1, 2).float().expand(-1, 3, -1, -1) / 255
    )  # (M, 3, 28, 28)
    x = (x - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) / torch.tensor(meta["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return (model(x).argmax(1).numpy() == np.asarray(ds["label"])).mean().item()


test_accuracy.__test__ = False  # a helper, not a test


@pytest.mark.slow
def test_selection_on_validation_scores_test_once_and_survives_a_resume(tmp_path, three_splits):
    """--test-split: best.safetensors holds the best validation epoch, the test split is scored with it; a run killed
    after its step-12 checkpoint and resumed (--resume auto) reports the same history, best and test top-1."""
    args = [
        "--dataset",
        str(three_splits),
        "--train-split",
        "train",
        "--eval-split",
        "validation",
        "--test-split",
        "test",
        "--init",
        "scratch",
        "--model",
        "test_vit",
        "--img-size",
        "28",
        "--patch-size",
        "7",
        "--batch-size",
        "8",
        "--epochs",
        "4",
        "--lr",
        "0.1",
        "--warmup-steps",
        "2",
        "--checkpoint-every",
        "6",
        "--keep-checkpoints",
        "10",
        "--log-every",
        "3",
        "--no-progress",
    ]
    full = tmp_path / "full"
    run_finetune(args + ["--output-dir", str(full)])
    done = json.loads((full / "results.json").read_text())
    assert done["steps"] == 24 and [h["epoch"] for h in done["history"]] == [0, 1, 2]  # epoch 3 is the final evaluation
    candidates = [h["top1"] for h in done["history"]] + [done["final_top1"]]
    assert done["best_val_top1"] == max(candidates) and done["best_epoch"] == candidates.index(max(candidates))
    assert json.loads((full / "run_config.json").read_text())["test_split"] == "test"
    best = load_file(full / "best.safetensors")
    from mpp.models.weights import read_metadata

    assert read_metadata(full / "best.safetensors")["epoch"] == str(done["best_epoch"])
    assert done["test_top1"] == pytest.approx(test_accuracy(full / "best.safetensors", three_splits, "test"))
    assert done["best_val_top1"] == pytest.approx(test_accuracy(full / "best.safetensors", three_splits, "validation"))
    assert done["final_top1"] == pytest.approx(test_accuracy(full / "last.safetensors", three_splits, "validation"))
    model, selected = (
        load_file(full / "model.safetensors"),
        load_file(full / "best.safetensors"),
    )  # the folder loads the selection
    assert all(torch.equal(model[k], selected[k]) for k in selected)
    assert done["eval_unreadable"] == 0 and done["test_unreadable"] == 0 and done["test_images"] == 24

    # killed after the step-12 checkpoint (end of epoch 1): later checkpoints and the final files never written
    killed = tmp_path / "killed"
    shutil.copytree(full, killed)
    for later in ("step_000018", "step_000024"):
        shutil.rmtree(killed / "checkpoints" / later)
    (killed / "results.json").unlink()
    (killed / "model.safetensors").unlink()
    (killed / "last.safetensors").unlink()
    run_finetune(args + ["--output-dir", str(killed), "--resume", "auto"])
    resumed = json.loads((killed / "results.json").read_text())
    for key in ("history", "best_top1", "best_val_top1", "best_epoch", "best_step", "test_top1", "final_top1"):
        assert resumed[key] == done[key], key
    again = load_file(killed / "best.safetensors")
    assert all(torch.equal(best[k], again[k]) for k in best)
