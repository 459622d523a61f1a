"""What a run folder says is true, read the way a user reads it: the model card's code, run as written, loads the
folder and scores the card's numbers; timm's config.json builds the run's own evaluation view; the pretraining card
describes the run's corruption, its features and its final windows; weight files are written like every other file."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mpp.commands.finetune import parse_config as parse_finetune_config
from mpp.commands.pretrain import main as pretrain_main
from mpp.data.transforms import timm_transform
from mpp.models.model import MPP, create_encoder
from mpp.training.finetune import finetune

# deit_tiny normalises with ImageNet's mean and std, which differ from each other (timm's test_vit uses 0.5 for
# both, which hides a swap), and its default pretrained config names a tag, a licence, crop 0.9 and bicubic.
ARCH = ["--model", "deit_tiny_patch16_224", "--img-size", "28", "--patch-size", "7"]


@pytest.fixture(scope="module")
def three_splits(tmp_path_factory):
    """MNIST digits 0-3 saved with save_to_disk: train 160, validation 80, test 160."""
    from datasets import DatasetDict

    from mpp.data.builtin import mnist5k

    ds = mnist5k().shuffle(seed=0)
    ds = ds.filter(lambda y: y < 4, input_columns="label").select(range(400))
    path = tmp_path_factory.mktemp("data") / "splits"
    DatasetDict(
        train=ds.select(range(160)), validation=ds.select(range(160, 240)), test=ds.select(range(240, 400))
    ).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def finetuned(three_splits, tmp_path_factory) -> Path:
    """A fine-tuning with --test-split alone (the validation split is then the default --eval-split), 4 epochs whose
    best validation epoch (1) is not the last: its card must describe the selected weights, not the last ones."""
    out = tmp_path_factory.mktemp("ft") / "run"
    results = finetune(
        parse_finetune_config(
            [
                "--dataset",
                str(three_splits),
                "--test-split",
                "test",
                "--init",
                "scratch",
                *ARCH,
                "--batch-size",
                "16",
                "--epochs",
                "4",
                "--lr",
                "0.1",
                "--warmup-steps",
                "3",
                "--seed",
                "1",
                "--no-progress",
                "--workers",
                "0",
                "--report-to",
                "none",
                "--output-dir",
                str(out),
            ]
        )
    )
    assert "stopped_by" not in results, results  # a signal would stop it before the folder is complete
    return out


def card_code(run: Path) -> str:
    """The card's python block, with the placeholder path of its local-dir: line replaced by this folder's."""
    code = re.search(r"```python\n(.*?)```", (run / "README.md").read_text(), re.S).group(1)
    assert code.count("local-dir:") == 1
    return re.sub(r'local-dir:[^"]*', f"local-dir:{run}", code)


def card_session(run: Path, weights: Path | None = None):
    """The card's code run as written: its loading part once (then other weights loaded into the same model, when
    given), then use(image, *names) runs the rest on one image (the card calls it `image`) and returns those names."""
    setup, per_image = card_code(run).split("x = transform", 1)
    scope = {}
    exec(setup, scope)
    if weights is not None:
        scope["model"].load_state_dict(load_file(weights))
    per_image = compile("x = transform" + per_image, "README.md", "exec")

    def use(image: Image.Image, *names: str) -> tuple:
        scope["image"] = image
        with torch.no_grad():
            exec(per_image, scope)
        return tuple(scope[n] for n in names)

    return use


def run_card(run: Path, images: list[Image.Image], *names: str) -> list[tuple]:
    use = card_session(run)
    return [use(image, *names) for image in images]


def card_metrics(run: Path) -> dict[str, float]:
    """The card's "Final metrics" table: row label -> value."""
    table = (run / "README.md").read_text().split("## Final metrics")[1].split("##")[0]
    rows = [line.strip("|").split("|") for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    return {label.strip(): float(value) for label, value in rows if label.strip() != "metric"}


def row(metrics: dict, *words: str) -> float:
    (value,) = [v for k, v in metrics.items() if all(w in k for w in words)]
    return value


def split_images(data: Path, split: str) -> tuple[list[Image.Image], list[str]]:
    """A split's images as a user holds them (PIL, grey) and its class names."""
    from datasets import load_from_disk

    ds = load_from_disk(str(data))[split]
    names = ds.features["label"].names
    images = [Image.fromarray(a[..., 0]) for a in np.asarray(ds.with_format("numpy")["image"], dtype=np.uint8)]
    return images, [names[y] for y in ds["label"]]


def score(run: Path, data: Path, split: str, weights: Path | None = None) -> float:
    """Top-1 of the folder as its card loads and uses it (other weights in the same model, when given)."""
    images, truth = split_images(data, split)
    use = card_session(run, weights)
    return float(np.mean([use(image, "label")[0] == t for image, t in zip(images, truth)]))


def test_the_cards_top1_is_the_score_of_the_model_the_folder_loads(finetuned, three_splits):
    """The card's code loads model.safetensors: its test and validation top-1, computed here through timm alone with
    the card's own transform, are the card's numbers, and its validation top-1 is the best epoch's in metrics.jsonl."""
    metrics = card_metrics(finetuned)
    on_test = row(metrics, "on test", "model.safetensors")
    on_validation = row(metrics, "on validation", "model.safetensors")
    last_on_validation = row(metrics, "on validation", "last.safetensors")
    assert score(finetuned, three_splits, "test") == pytest.approx(on_test, abs=5e-5)
    assert score(finetuned, three_splits, "validation") == pytest.approx(on_validation, abs=5e-5)
    logged = [
        r["eval_top1"]
        for r in map(json.loads, (finetuned / "metrics.jsonl").read_text().splitlines())
        if "eval_top1" in r
    ]
    assert on_validation == pytest.approx(max(logged + [last_on_validation]), abs=5e-5)
    # the run is one where the selection matters: the last weights are another model, with another test score
    last_test = score(finetuned, three_splits, "test", weights=finetuned / "last.safetensors")
    assert last_on_validation < on_validation and abs(last_test - on_test) > 0.03, (last_test, on_test)
    assert score(finetuned, three_splits, "validation", weights=finetuned / "last.safetensors") == pytest.approx(
        last_on_validation, abs=5e-5
    )
    best, model = load_file(finetuned / "best.safetensors"), load_file(finetuned / "model.safetensors")
    assert best.keys() == model.keys() and all(torch.equal(best[k], model[k]) for k in best)


def photo_crops() -> list[Image.Image]:
    """Colour pictures of other sizes and shapes than the runs' 28 px, so that the resize and the crop matter."""
    from skimage import data

    base = data.astronaut()
    return [Image.fromarray(base[40 : 40 + h, 100 : 100 + w]) for h, w in [(45, 31), (64, 100), (90, 90), (29, 300)]]


def run_view(images: list[Image.Image], size: int, mean, std) -> torch.Tensor:
    """What the runs feed the model for evaluation: timm_transform's uint8 view, normalised on the device as
    finetune.top1 does, with the mean and std the run recorded."""
    tf = timm_transform(size, False)
    x = torch.stack([tf(im.convert("RGB")) for im in images]).float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_timm_config_builds_the_fine_tuning_runs_evaluation_view(finetuned, three_splits):
    """resolve_data_config + create_transform, as the card says, give the very tensors the run scored; config.json
    names no tag or licence of the architecture's default weights."""
    images = split_images(three_splits, "test")[0][:8] + photo_crops()
    card_view = torch.cat([x for (x,) in run_card(finetuned, images, "x")])
    derived = json.loads((finetuned / "run_config.json").read_text())["derived"]
    assert derived["mean"] != derived["std"]
    torch.testing.assert_close(card_view, run_view(images, 28, derived["mean"], derived["std"]), rtol=0, atol=1e-5)
    pretrained_cfg = json.loads((finetuned / "config.json").read_text())["pretrained_cfg"]
    assert not {"tag", "license", "hf_hub_id", "url", "test_input_size", "test_crop_pct"} & set(pretrained_cfg), (
        pretrained_cfg
    )


def test_weight_files_are_written_with_the_mode_of_the_other_files(finetuned, pretrained):
    mask = os.umask(0)
    os.umask(mask)
    for run, names in [
        (finetuned, ["model.safetensors", "best.safetensors", "last.safetensors", "results.json", "README.md"]),
        (pretrained[0], ["model.safetensors", "mpp_head.safetensors", "config.json", "metrics.jsonl"]),
    ]:
        for name in names:
            assert oct((run / name).stat().st_mode & 0o777) == oct(0o666 & ~mask), name


@pytest.fixture(scope="module")
def pretrained(make_digit_folder, tmp_path_factory):
    """12 steps of MPP pretraining logged every 2 steps, k-NN / linear monitoring every 4: (run folder, stdout)."""
    import contextlib
    import io

    labelled = make_digit_folder(["zero", "one", "two"], train=50, test=10)
    out = tmp_path_factory.mktemp("pt") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert (
            pretrain_main(
                [
                    "--dataset",
                    "mnist5k",
                    *ARCH,
                    "--batch-size",
                    "16",
                    "--max-steps",
                    "12",
                    "--log-every",
                    "2",
                    "--eval-dataset",
                    str(labelled),
                    "--eval-every-steps",
                    "4",
                    "--checkpoint-every",
                    "12",
                    "--no-progress",
                    "--workers",
                    "0",
                    "--report-to",
                    "none",
                    "--output-dir",
                    str(out),
                ]
            )
            == 0
        )
    return out, printed.getvalue()


def test_timm_config_builds_the_pretraining_runs_input(pretrained):
    """The card's transform on the run's own 28 px images gives what the encoder was trained on: the pixels normalised
    with MPP's mean and std for this architecture; on other sizes, the evaluation view of the runs."""
    run, _ = pretrained
    model = MPP(create_encoder("deit_tiny_patch16_224", 28, 7))
    mean, std = model.pixel_mean.flatten().tolist(), model.pixel_std.flatten().tolist()
    from mpp.data.builtin import mnist5k

    digits = [
        Image.fromarray(a[..., 0]) for a in np.asarray(mnist5k().with_format("numpy")["image"][:8], dtype=np.uint8)
    ]
    card_view = torch.cat([x for (x,) in run_card(run, digits + photo_crops(), "x")])
    pixels = torch.stack([torch.from_numpy(np.array(d.convert("RGB"))).permute(2, 0, 1) for d in digits]).float() / 255
    trained_on = (pixels - model.pixel_mean) / model.pixel_std  # MPP.forward's normalisation
    torch.testing.assert_close(card_view[:8], trained_on, rtol=0, atol=1e-5)
    torch.testing.assert_close(card_view[8:], run_view(photo_crops(), 28, mean, std), rtol=0, atol=1e-5)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_closing_line_and_the_card_report_the_mean_of_the_last_windows(pretrained):
    """The README's final loss is a mean of the last 5 logged windows: the closing line and the card say so and
    report that mean, computed here from metrics.jsonl; the card's probe numbers are the newest evaluation's."""
    run, printed = pretrained
    windows = [r for r in records(run) if "loss" in r]
    assert len(windows) == 6
    last5 = windows[-5:]
    loss, acc = np.mean([r["loss"] for r in last5]), np.mean([r["masked_acc"] for r in last5])
    assert abs(loss - np.mean([r["loss"] for r in windows[:5]])) > 1e-3  # the oldest windows would read differently
    line = next(text for text in printed.splitlines() if "final loss" in text)
    assert (
        f"final loss {loss:.4f}, masked-patch accuracy {acc:.4f}" in line
        and "mean of the last 5 logged windows" in line
    )
    assert "steps 4-12" in line
    metrics = card_metrics(run)
    assert row(metrics, "loss (mean of the last 5 logged windows") == pytest.approx(loss, abs=5e-5)
    assert row(metrics, "masked-patch accuracy (mean of the last 5") == pytest.approx(acc, abs=5e-5)
    evals = [r for r in records(run) if "eval_knn20_mean" in r]
    assert [r["step"] for r in evals] == [4, 8, 12] and evals[0]["eval_knn20_mean"] != evals[-1]["eval_knn20_mean"]
    for key in ("eval_knn20_cls", "eval_knn20_mean", "eval_linear_10shot_mean"):
        ((label, value),) = [(k, v) for k, v in metrics.items() if k.startswith(key + " ")]
        assert label == f"{key} (step 12)" and value == pytest.approx(evals[-1][key], abs=5e-5)


def test_the_pretraining_card_says_where_it_corrupts_and_which_features_mpp_trains(pretrained):
    """Run as written, the card's code gives the mean of the patch tokens of the trained encoder (MPP never trains
    the class token, which is what model(x) pools here); the card says the embeddings were corrupted."""
    run, _ = pretrained
    card = (run / "README.md").read_text()
    assert "patch embeddings is corrupted after the patch projection" in card and "--corrupt-at embedding" in card
    assert "pixel regions" not in card and "in the pixels" not in card
    images = photo_crops()
    ((features, x),) = run_card(run, images[:1], "features", "x")
    from mpp import load_backbone

    encoder = load_backbone(run / "model.safetensors").eval()
    with torch.no_grad():
        tokens = encoder.forward_features(x)
        pooled = encoder(x)
    assert encoder.global_pool == "token" and "class token" in card and "never trains" in card
    torch.testing.assert_close(features, tokens[:, encoder.num_prefix_tokens :].mean(1), rtol=0, atol=1e-6)
    assert not torch.allclose(features, pooled, atol=1e-3)


@pytest.mark.parametrize(
    "corrupt_at, said, unsaid",
    [
        ("pixels", "pixel regions of the normalised image", "patch embeddings"),
        ("embedding", "patch embeddings", "pixel regions"),
    ],
)
def test_the_card_names_where_the_run_corrupted(tmp_path, corrupt_at, said, unsaid):
    """--corrupt-at pixels corrupts pixels, not embeddings: the card written at the end of such a run says so."""
    from mpp.training.pretrain import export_weights
    from mpp.training.pretrain_config import PretrainConfig

    model = MPP(create_encoder("test_vit", 28, 7), corrupt_at=corrupt_at)
    export_weights(
        model, PretrainConfig(model="test_vit", img_size=28, patch_size=7, corrupt_at=corrupt_at), tmp_path, step=1
    )
    head = (tmp_path / "README.md").read_text().split("## Final metrics")[0]
    assert said in head and unsaid not in head and f"--corrupt-at {corrupt_at}" in head


def test_a_replayed_fine_tuning_runs_the_preset_it_is_given(finetuned):
    """run_config.json holds every knob as the run used it (paper preset, --lr and --warmup-steps given): replayed
    as is, it is the same run; with --preset modern, every knob the run took from its preset is modern's, and the
    two it was given stay, instead of paper's resolved values overriding modern's."""
    from mpp.training.finetune_config import PRESET_KEYS, PRESETS

    saved = json.loads((finetuned / "run_config.json").read_text())
    assert saved["preset"] == "paper" and (saved["opt"], saved["lr"], saved["zero_head"]) == ("momentum", 0.1, True)
    same = parse_finetune_config(["--config", str(finetuned / "run_config.json")])
    assert {k: same.resolved(k) for k in PRESET_KEYS} == {k: saved[k] for k in PRESET_KEYS}
    as_saved = json.loads(json.dumps(same.to_dict()))  # tuples as JSON lists
    assert {k: v for k, v in as_saved.items() if k not in ("derived", "output_dir")} == {
        k: v for k, v in saved.items() if k not in ("derived", "output_dir")
    }
    modern = parse_finetune_config(["--config", str(finetuned / "run_config.json"), "--preset", "modern"])
    assert {k: modern.resolved(k) for k in PRESET_KEYS} == {**PRESETS["modern"], "lr": 0.1, "warmup_steps": 3}
    assert (modern.dataset, modern.epochs, modern.test_split, modern.eval_split) == (
        saved["dataset"],
        4,
        "test",
        "validation",
    )
