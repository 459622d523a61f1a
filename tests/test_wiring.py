"""The wiring between the command line and what trains: each flag the README names, followed through the
function the recipe calls (pretrain, finetune, open_run) to the model, the optimiser and the run folder."""

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mpp.cli import run_cli
from mpp.commands.finetune import parse_config as parse_finetune_config
from mpp.commands.pretrain import parse_config
from mpp.models.masking import RANDOM_PATCH
from mpp.training import finetune as finetune_module
from mpp.training import pretrain as train
from mpp.training.pretrain_config import lr_at

TINY = [
    "--model",
    "test_vit",
    "--img-size",
    "28",
    "--patch-size",
    "7",
    "--batch-size",
    "8",
    "--workers",
    "0",
    "--no-progress",
]


def save_images(path: Path, splits: dict[str, int]) -> Path:
    """A save_to_disk DatasetDict of small RGB noise images, `index` and a two-class `label` per image."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b"]), "index": Value("int64")})
    parts = {}
    for split, n in splits.items():
        # class b is brighter than class a: different enough that the classifier's predictions differ
        images = [
            PILImage.fromarray(rng.integers(0, 128, (28, 28, 3), dtype=np.uint8) + np.uint8(128 * (i % 2)))
            for i in range(n)
        ]
        parts[split] = Dataset.from_dict(
            {"image": images, "label": [i % 2 for i in range(n)], "index": list(range(n))}, features=features
        )
    DatasetDict(parts).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return save_images(tmp_path_factory.mktemp("data") / "images", {"train": 24, "test": 32})


class StepSpy:
    """Wraps an optimiser's step: at every optimiser step records each group's lr, the global gradient
    norm the step is given, and what `also()` returns."""

    def __init__(self, optimizer, also=lambda: None):
        self.lrs, self.grad_norms, self.also = [], [], []
        real = optimizer.step

        def step(*args, **kwargs):
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            self.grad_norms.append(
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
            )
            self.lrs.append([g["lr"] for g in optimizer.param_groups])
            self.also.append(also())
            return real(*args, **kwargs)

        optimizer.step = step


# --- pretraining: one short run with every flag away from its default ---

PRETRAIN_FLAGS = [
    "--max-steps",
    "6",
    "--warmup-steps",
    "10",
    "--lr",
    "1e-3",
    "--min-lr",
    "1e-5",
    "--clip-grad",
    "0.01",
    "--checkpoint-every",
    "1",
    "--keep-checkpoints",
    "2",
    "--log-every",
    "3",
    "--mask-ratio",
    "0.25",
    "--mask-probs",
    "0",
    "1",
    "0",
    "--target",
    "pixels_l2",
    "--random-from",
    "image",
]


@pytest.fixture(scope="module")
def pretrained(images, tmp_path_factory):
    """(PretrainResult, StepSpy, stdout) of pretrain(parse_config(argv)) run in this process."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    spies = []

    def spying(*args, **kwargs):
        optimizer = real(*args, **kwargs)
        spies.append(StepSpy(optimizer, also=lambda: sorted(p.name for p in (out / "checkpoints").glob("*"))))
        return optimizer

    real = train.build_optimizer
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(train, "build_optimizer", spying)
        result = train.pretrain(
            parse_config([*TINY, *PRETRAIN_FLAGS, "--dataset", str(images), "--output-dir", str(out)])
        )
    assert len(spies) == 1 and len(spies[0].lrs) == 6
    return result, spies[0], printed.getvalue()


def test_objective_flags_reach_the_model_that_trains(pretrained):
    """--mask-ratio 0.25, --mask-probs 0 1 0, --random-from image, --target pixels_l2, seen in what the
    trained model does: 4 of 16 patches corrupted, each replaced by another patch of its own image, and
    a prediction of 7x7x3 pixels."""
    result, _, _ = pretrained
    model = result.model
    out = model(torch.randint(0, 256, (8, 3, 28, 28), dtype=torch.uint8))
    assert out.corruption.ids.shape == (8, 4)
    assert (out.corruption.kind == RANDOM_PATCH).all()
    assert (out.corruption.source // 16 == torch.arange(8).unsqueeze(1)).all()  # source row = own image
    assert out.pred.shape == (8, 4, 7 * 7 * 3)


def test_clip_grad_bounds_the_gradient_the_optimiser_sees(pretrained):
    _, spy, _ = pretrained
    assert all(norm <= 0.01 * (1 + 1e-4) for norm in spy.grad_norms), spy.grad_norms


def test_warmup_and_cosine_reach_the_optimiser_and_a_cut_warmup_is_said(pretrained):
    """--warmup-steps 10 in a 6-step run is cut to 3, aloud; every group's lr at every optimiser step is
    lr_at(step) of that warmup: 1/3, 2/3 and all of the peak, then the cosine towards --min-lr."""
    result, spy, printed = pretrained
    assert "--warmup-steps 10 is more than half of the 6 steps: warming up over 3 steps" in printed
    config = json.loads((result.run_dir / "run_config.json").read_text())
    assert config["derived"]["warmup_steps"] == 3
    expected = [lr_at(step, 1e-3, 3, 6, 1e-5) for step in range(6)]
    assert expected[:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])
    for step, lrs in enumerate(spy.lrs):
        assert lrs == pytest.approx([expected[step]] * len(lrs)), step


def test_without_a_progress_bar_each_logging_window_is_a_line(pretrained):
    """--no-progress --log-every 3: a line at steps 3 and 6 with the loss metrics.jsonl records, not silence until the
    end."""
    result, _, printed = pretrained
    lines = [line for line in printed.splitlines() if line.startswith("step ")]
    records = [json.loads(r) for r in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert [line.split()[1] for line in lines] == ["3/6", "6/6"]
    assert [float(line.split()[3]) for line in lines] == pytest.approx([losses[3], losses[6]], abs=1e-4)


def test_keep_checkpoints_reaches_the_run(pretrained):
    """--checkpoint-every 1 --keep-checkpoints 2: before optimiser step i, exactly the newest two of the
    checkpoints 1..i-1 exist; after the run, steps 5 and 6."""
    result, spy, _ = pretrained
    for i, names in enumerate(spy.also):
        assert names == [f"step_{s:06d}" for s in range(max(1, i - 1), i + 1) if s >= 1], (i, names)
    assert sorted(p.name for p in (result.run_dir / "checkpoints").iterdir()) == ["step_000005", "step_000006"]


def test_nonfinite_gradients_exit_1_through_the_recipe(images, tmp_path, monkeypatch, capsys):
    """A loss that is always NaN: the recipe's run_cli stops the run with one line and exit code 1,
    leaving no weights and no checkpoint."""
    from mpp.models.model import MPP

    forward = MPP.forward

    def nan_forward(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    def leave(code):  # exit_cleanly's os._exit would end pytest itself
        raise SystemExit(code)

    monkeypatch.setattr(MPP, "forward", nan_forward)
    monkeypatch.setattr(os, "_exit", leave)
    out = tmp_path / "run"
    argv = [
        *TINY,
        "--dataset",
        str(images),
        "--max-steps",
        "6",
        "--log-every",
        "2",
        "--max-nonfinite-steps",
        "2",
        "--output-dir",
        str(out),
    ]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda a: train.pretrain(parse_config(a)), argv)
    assert exit_info.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "2 optimiser steps in a row with a non-finite gradient (found at step 2)" in errors[0]
    assert not (out / "model.safetensors").exists() and not (out / "checkpoints").exists()


# --- --resume auto ---


def test_resume_auto_picks_the_newest_run_with_a_complete_checkpoint(tmp_path, monkeypatch):
    """Without --output-dir, --resume auto continues the newest run under runs/ that has a complete
    checkpoint, from its newest complete checkpoint; a newer run with only a half-written one is passed over."""
    from mpp.training.run_setup import init_processes, open_run

    monkeypatch.chdir(tmp_path)
    runs = {
        "20250101-000000": ["step_000002"],
        "20250102-000000": ["step_000002", "step_000004", ".tmp-step_000006"],
        "20250103-000000": [".tmp-step_000002"],
    }
    for age, (name, folders) in enumerate(runs.items()):
        for folder in folders:
            (tmp_path / "runs" / name / "checkpoints" / folder).mkdir(parents=True)
            (tmp_path / "runs" / name / "checkpoints" / folder / "trainer_state.json").write_text(
                json.dumps({"step": int(folder.rsplit("_", 1)[1]), "epoch": 0, "batches_in_epoch": 0, "bad_images": 0})
            )
        os.utime(tmp_path / "runs" / name, (1e9 + age, 1e9 + age))  # oldest first
    run = open_run(init_processes(threads=None), None, "auto", grad_accum=1)
    assert run.run_dir.resolve() == (tmp_path / "runs" / "20250102-000000").resolve()
    assert run.resume_from.name == "step_000004" and run.state["step"] == 4


# --- fine-tuning: presets reaching the optimiser, --train-fraction ---


def run_finetune(images, tmp_path, argv):
    """(results, StepSpy, the optimiser, stdout) of finetune(parse_finetune_config(argv)) in this process."""
    made = []

    def spying(*args, **kwargs):
        made.append(real(*args, **kwargs))
        spies.append(StepSpy(made[-1]))
        return made[-1]

    real, spies = finetune_module.create_optimizer_v2, []
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(finetune_module, "create_optimizer_v2", spying)
        results = finetune_module.finetune(
            parse_finetune_config(
                [
                    *TINY,
                    "--dataset",
                    str(images),
                    "--init",
                    "scratch",
                    "--max-steps",
                    "2",
                    "--output-dir",
                    str(tmp_path / "run"),
                    *argv,
                ]
            )
        )
    assert len(made) == 1
    return results, spies[0], made[0], printed.getvalue()


def test_paper_preset_reaches_the_optimiser(images, tmp_path):
    """paper: SGD with momentum 0.9, no weight decay, lr 0.03 through warmup (50 steps, cut to 1 of 2),
    gradients clipped at global norm 1; --train-fraction 0.5 trains on half the split."""
    results, spy, optimizer, printed = run_finetune(images, tmp_path, ["--preset", "paper", "--train-fraction", "0.5"])
    assert type(optimizer) is torch.optim.SGD
    assert all(g["momentum"] == 0.9 and not g["nesterov"] and g["weight_decay"] == 0.0 for g in optimizer.param_groups)
    assert "--warmup-steps 50 is more than half of the 2 steps: warming up over 1 steps" in printed
    assert [lrs[0] for lrs in spy.lrs] == pytest.approx([lr_at(0, 0.03, 1, 2), lr_at(1, 0.03, 1, 2)])
    assert all(norm <= 1.0 + 1e-4 for norm in spy.grad_norms)
    assert results["train_images"] == 12


def top1_of_saved_weights(weights: Path, images: Path) -> tuple[torch.Tensor, float]:
    """(predictions, top-1) on the test split, from the weight file and the stored images alone."""
    from datasets import load_from_disk

    from mpp import load_backbone, read_metadata

    meta, test = read_metadata(weights), load_from_disk(str(images))["test"]
    x = (
        torch.stack([torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1) for image in test["image"]])
        / 255
    )  # (M, 3, 28, 28)
    x = (x - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) / torch.tensor(meta["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        predicted = load_backbone(weights, num_classes=2).eval()(x).argmax(1)
    return predicted, (predicted == torch.tensor(test["label"])).double().mean().item()


def test_modern_preset_reaches_the_optimiser(images, tmp_path):
    """modern: AdamW, weight decay 0.05 on matrices only, timm's layer-wise decay 0.75: lr scales
    0.75^k for the 6 blocks, the embeddings and the head (k = 0..7), applied to the scheduled lr.
    The top-1 it reports is the top-1 of the weights it saved, recomputed here."""
    results, spy, optimizer, _ = run_finetune(images, tmp_path, ["--preset", "modern"])
    predicted, top1 = top1_of_saved_weights(tmp_path / "run" / "model.safetensors", images)
    assert len(predicted.unique()) == 2 and top1 > 0.5  # not one class for every image; above chance on an easy task
    assert results["final_top1"] == pytest.approx(top1, abs=0.5 / 32)
    assert isinstance(optimizer, torch.optim.AdamW)
    scales = [g["lr_scale"] for g in optimizer.param_groups]
    assert sorted(set(np.round(scales, 12))) == sorted(set(np.round([0.75**k for k in range(8)], 12)))
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.05}
    for step, lrs in enumerate(spy.lrs):
        assert lrs == pytest.approx([lr_at(step, 1e-3, 1, 2) * s for s in scales]), step


def test_train_fraction_draws_a_seeded_subset(images):
    """--train-fraction F through open_labelled_data: round(F x N) distinct rows of the split, the same
    for the same --subset-seed and another for another seed."""
    from accelerate import PartialState

    from mpp.training.finetune_config import FinetuneConfig

    def rows(fraction, seed):
        data = finetune_module.open_labelled_data(
            FinetuneConfig(dataset=str(images), train_fraction=fraction, subset_seed=seed, batch_size=2), PartialState()
        )
        return data.train["index"]

    a = rows(0.25, 1)
    assert len(a) == 6 and len(set(a)) == 6 and set(a) <= set(range(24))
    assert rows(0.25, 1) == a and rows(0.25, 2) != a
    assert len(rows(0.5, 1)) == 12


def test_ci_fails_a_test_skipped_for_a_missing_data_package(tmp_path):
    """tests/conftest.py: with CI set, a skip whose reason says "apt-get install PACKAGE" fails (naming
    the package); other skips stay skips (and outside CI every skip does: the rest of the suite)."""
    import shutil
    import subprocess
    import sys

    shutil.copy(Path(__file__).parent / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_needs.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.skipif(True, reason='apt-get install dataset-fashion-mnist')\ndef test_marked():\n    pass\n\n"
        "def test_at_run_time():\n    pytest.skip('apt-get install openclipart-png')\n\n"
        "@pytest.mark.skipif(True, reason='not on this platform')\ndef test_other():\n    pass\n"
    )

    ci = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "CI": "true"},
        cwd=tmp_path,
        timeout=300,
    )
    assert ci.returncode == 1 and "1 skipped" in ci.stdout, ci.stdout[-2000:]
    assert (
        "missing: apt-get install dataset-fashion-mnist" in ci.stdout
        and "missing: apt-get install openclipart-png" in ci.stdout
    )
