"""recipes/prepare_data.py and mpp.data.prepare: a dataset re-encoded once into small-JPEG parquet shards that
--dataset reads split by split, with its labels and class names, unreadable images counted and left out."""

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import Array3D, ClassLabel, Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage

from mpp.cli import run_cli
from mpp.data import prepare
from mpp.data.sources import load_images
from mpp.errors import UsageError

ROOT = Path(__file__).parents[1]
SHORT = 64
# (class, file, width, height): landscape, portrait, odd sizes, and smaller than SHORT (kept as is)
TRAIN = [
    ("cat", "a.png", 240, 160),
    ("cat", "b.jpg", 150, 330),
    ("cat", "c.png", 40, 50),
    ("cat", "d.jpg", 128, 64),
    ("dog", "e.jpg", 200, 200),
    ("dog", "f.png", 97, 301),
    ("dog", "g.png", 300, 90),
    ("dog", "h.jpg", 64, 70),
]
VALIDATION = [("cat", "v.png", 180, 120), ("dog", "w.jpg", 90, 150), ("dog", "x.png", 50, 30)]


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def picture(width: int, height: int, seed: int) -> PILImage.Image:
    """A colour of its own per image: two gradients and an 8-pixel checker, so a resize has detail to average."""
    rng = np.random.default_rng(seed)
    base = rng.integers(20, 170, 3)
    y, x = np.mgrid[0:height, 0:width]
    a = np.stack([base[0] + 60 * x / width, base[1] + 60 * y / height, base[2] + 40 * ((x // 8 + y // 8) % 2)], axis=-1)
    return PILImage.fromarray(a.round().astype(np.uint8))  # (H, W, 3)


def imagefolder(root: Path) -> Path:
    """train/ and validation/ of cat and dog pictures, PNG and JPEG, plus a corrupt PNG and a truncated JPEG in
    train."""
    for split, files in (("train", TRAIN), ("validation", VALIDATION)):
        for i, (cls, name, w, h) in enumerate(files):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            picture(w, h, seed=100 * (split == "train") + i).save(root / split / cls / name, quality=98)
    (root / "train" / "cat" / "corrupt.png").write_bytes(b"not an image at all")
    buf = io.BytesIO()
    picture(200, 200, seed=7).save(buf, format="JPEG")
    (root / "train" / "dog" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return root


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return imagefolder(tmp_path_factory.mktemp("src") / "photos")


@pytest.fixture(scope="module")
def prepared(source, tmp_path_factory):
    """(report, DST): the folder prepared with two processes and shards of at most 3 images."""
    dest = tmp_path_factory.mktemp("dst") / "small"
    report = prepare.prepare_dataset(str(source), str(dest), short_side=SHORT, shard_size=3, num_proc=2)
    return report, dest


def expected_size(w: int, h: int, short: int) -> tuple[int, int]:
    s = min(short, w, h)
    return (s, h * s / w) if w <= h else (w * s / h, s)


def test_round_trip_keeps_labels_sizes_and_colours(source, prepared):
    """Each prepared image against its source file read with plain PIL + numpy: shorter side
    min(SHORT, original), aspect within a pixel, mean colour within 3 levels; labels and class names kept."""
    _, dest = prepared
    for split in ("train", "validation"):
        src = load_images(str(source), split).cast_column("image", Image(decode=False))
        src = src.filter(lambda v: not v["path"].endswith(("corrupt.png", "truncated.jpg")), input_columns="image")
        out = load_images(str(dest), split)
        assert out.features["label"] == ClassLabel(names=["cat", "dog"])
        assert len(out) == len(src) and out["label"] == src["label"]
        for before, after in zip(src, out):
            original = PILImage.open(before["image"]["path"]).convert("RGB")
            w, h = expected_size(*original.size, SHORT)
            assert min(after["image"].size) == min(w, h), before["image"]["path"]
            assert abs(after["image"].size[0] - w) <= 1 and abs(after["image"].size[1] - h) <= 1, (
                before["image"]["path"],
                after["image"].size,
            )
            assert after["image"].format == "JPEG"
            mean_before = np.asarray(original, dtype=np.float64).mean((0, 1))
            mean_after = np.asarray(after["image"].convert("RGB"), dtype=np.float64).mean((0, 1))
            assert np.abs(mean_before - mean_after).max() < 3, (before["image"]["path"], mean_before, mean_after)


def test_splits_land_in_their_own_bounded_shards(prepared):
    """train (8 good images) -> 3 shards, validation (3) -> 1, each named the Hub's way, at most 3 rows
    each; the parquet schema itself carries the class names; a split the source lacks is not made."""
    report, dest = prepared
    shards = sorted(p.name for p in dest.glob("*.parquet"))
    assert shards == [f"train-0000{i}-of-00003.parquet" for i in range(3)] + ["validation-00000-of-00001.parquet"]
    rows = {name: pq.read_metadata(dest / name).num_rows for name in shards}
    assert max(rows.values()) <= 3 and sum(r for n, r in rows.items() if n.startswith("train")) == 8
    meta = json.loads(pq.read_schema(dest / shards[0]).metadata[b"huggingface"])
    assert meta["info"]["features"]["label"]["names"] == ["cat", "dog"]
    assert set(report["splits"]) == {"train", "validation"}
    assert [report["splits"][s]["shards"] for s in ("train", "validation")] == [3, 1]
    assert len(load_images(str(dest), "train")) == 8 and len(load_images(str(dest), "validation")) == 3
    with pytest.raises(UsageError, match="'test' not in"):
        load_images(str(dest), "test")


def test_unreadable_images_are_counted_and_skipped(prepared):
    report, dest = prepared
    train = report["splits"]["train"]
    assert (train["images"], train["bad_images"]) == (8, 2)
    names = sorted(Path(e["name"]).name for e in train["bad_examples"])
    assert names == ["corrupt.png", "truncated.jpg"] and all(e["reason"] for e in train["bad_examples"])
    assert report["splits"]["validation"]["bad_images"] == 0
    assert json.loads((dest / "prepare_report.json").read_text()) == report
    assert train["bytes"] == sum(p.stat().st_size for p in dest.glob("train-*.parquet"))
    assert not (dest / ".prepare-scratch").exists()


def test_array_source_and_unlabelled_loose_parquet(tmp_path):
    """A save_to_disk set of grey uint8 arrays (the built-ins' storage) with an extra column: resized to
    16 px, labels kept, the extra column dropped. A loose parquet file without labels: one train split
    (not three copies of it), the image column only."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (4, 20, 30, 1), dtype=np.uint8)  # (M, H, W, 1)
    features = Features(
        {"pixels": Array3D((20, 30, 1), "uint8"), "label": ClassLabel(names=["x", "y"]), "note": Value("string")}
    )
    part = Dataset.from_dict({"pixels": grey, "label": [0, 1, 1, 0], "note": list("abcd")}, features=features)
    DatasetDict({"train": part, "test": part.select([2, 3])}).save_to_disk(str(tmp_path / "arrays"))
    report = prepare.prepare_dataset(str(tmp_path / "arrays"), str(tmp_path / "a"), short_side=16, num_proc=1)
    assert {s: r["images"] for s, r in report["splits"].items()} == {"train": 4, "test": 2}
    out = load_images(str(tmp_path / "a"), "test")
    assert set(out.features) == {"image", "label"} and out["label"] == [1, 0]
    image = np.asarray(out[0]["image"].convert("RGB"), dtype=np.float64)  # (16, 24, 3)
    assert image.shape == (16, 24, 3) and abs(image.mean() - grey[2].mean()) < 3

    photos = [picture(40, 30, seed=i) for i in range(3)]
    Dataset.from_dict({"img": photos}, features=Features({"img": Image()})).to_parquet(str(tmp_path / "loose.parquet"))
    report = prepare.prepare_dataset(str(tmp_path / "loose.parquet"), str(tmp_path / "b"), short_side=16, num_proc=1)
    assert list(report["splits"]) == ["train"] and report["splits"]["train"]["images"] == 3
    assert set(load_images(str(tmp_path / "b"), "train").features) == {"image"}


BAD = [
    (["--short-side", "8"], "--short-side 8: must be at least 16"),
    (["--quality", "0"], "--quality 0: must be in 1..95"),
    (["--quality", "96"], "--quality 96: must be in 1..95"),
    (["--shard-size", "0"], "--shard-size 0: must be at least 1"),
    (["--splits", "train", "nosuch"], "nosuch"),
    (["--splits", "train[:2]"], "--splits 'train[:2]': a split name is letters"),
    (["--image-column", "photo"], "--image-column 'photo' not in the dataset"),
    (["--short-side", "big"], "argument --short-side: invalid int value"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_invocations_refused_in_one_line_before_any_work(args, message, source, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(prepare, "prepare_split", lambda *a, **k: pytest.fail("re-encoding started before the refusal"))
    dest = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(load_recipe("prepare_data").main, [str(source), str(dest), *args])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not dest.exists()


@pytest.mark.parametrize("kind", ["not empty", "a file"])
def test_existing_destination_refused(kind, source, tmp_path, capsys):
    dest = tmp_path / "out"
    if kind == "a file":
        dest.write_text("x")
    else:
        dest.mkdir()
        (dest / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(load_recipe("prepare_data").main, [str(source), str(dest)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and f"DST {dest} exists" in err
    assert dest.read_text() == "x" if kind == "a file" else (dest / "keep.txt").read_text() == "mine"


def test_failed_run_leaves_no_half_written_destination(source, tmp_path, monkeypatch):
    def fail_on_validation(ds, split, dest, *args):
        if split == "validation":
            raise RuntimeError("disk full")
        return real(ds, split, dest, *args)

    real = prepare.prepare_split
    monkeypatch.setattr(prepare, "prepare_split", fail_on_validation)
    new, empty = tmp_path / "new", tmp_path / "empty"
    empty.mkdir()
    for dest in (new, empty):
        with pytest.raises(RuntimeError, match="disk full"):
            prepare.prepare_dataset(str(source), str(dest), short_side=SHORT, num_proc=1)
    assert not new.exists() and list(empty.iterdir()) == []


def test_recipe_prints_summary_and_pretraining_trains_from_the_prepared_folder(source, tmp_path, capsys):
    """recipes/prepare_data.py then recipes/pretrain_mpp.py --dataset DST, both in this process: two steps
    on the 8 prepared training images, none of them unreadable."""
    dest = tmp_path / "small"
    assert load_recipe("prepare_data").main([str(source), str(dest), "--short-side", "48", "--num-proc", "1"]) == 0
    printed = capsys.readouterr().out
    assert "train: 8 images in 1 shards" in printed and "2 unreadable skipped" in printed
    assert f"next: accelerate launch recipes/pretrain_mpp.py --dataset {dest}" in printed
    run = tmp_path / "run"
    argv = [
        "--dataset",
        str(dest),
        "--model",
        "test_vit",
        "--img-size",
        "32",
        "--patch-size",
        "8",
        "--batch-size",
        "8",
        "--max-steps",
        "2",
        "--workers",
        "0",
        "--no-progress",
        "--output-dir",
        str(run),
    ]
    assert load_recipe("pretrain_mpp").main(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["bad_images"] == 0
    assert (run / "model.safetensors").exists()
