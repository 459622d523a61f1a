"""Re-encode a dataset once into parquet shards of bounded resolution (FFCV's max resolution idea):
training then decodes small JPEGs instead of full-size photos.

Every split becomes `<split>-NNNNN-of-NNNNN.parquet` files (the Hub's naming) with an `image` column
(datasets Image(), JPEG bytes) and, when the source is labelled, a `label` column with the source's
class names; mpp.data.sources.load_images reads such a folder split by split. Unreadable images are counted,
named in the report and left out, never fatal.
"""

import functools
import io
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
from datasets import Array2D, Array3D, ClassLabel, Features, Image, Value
from PIL import Image as PILImage

from mpp.data.decode import open_image
from mpp.data.sources import (
    SPLIT_FILE,
    _local_files,
    find_image_column,
    find_label_column,
    is_sidecar,
    load_images,
    prepare_columns,
)
from mpp.errors import UsageError

DEFAULT_SPLITS = ("train", "validation", "test")
SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")  # what fits the <split>-NNNNN-of-NNNNN file names
# Bicubic: Pillow widens its kernel by the downscale factor, so it is antialiased; it is the filter
# timm's ViT configs resize with, and it rings less than Lanczos on the hard edges of clip art.
RESAMPLE = PILImage.BICUBIC
MAX_BAD_EXAMPLES = 10


def check_request(
    dest: str, short_side: int, quality: int, shard_size: int, num_proc: int, splits: list[str] | None
) -> None:
    """Every argument that can be checked without loading anything; one-line UsageErrors."""
    path = Path(dest).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"DST {dest} exists and is a file; give a new or empty folder")
    if path.is_dir() and any(path.iterdir()):
        raise UsageError(f"DST {dest} exists and is not empty; give a new or empty folder (nothing is overwritten)")
    if short_side < 16:
        raise UsageError(f"--short-side {short_side}: must be at least 16 pixels")
    if not 1 <= quality <= 95:
        raise UsageError(
            f"--quality {quality}: must be in 1..95 (Pillow's JPEG quality; above 95 only grows the files)"
        )
    if shard_size < 1:
        raise UsageError(f"--shard-size {shard_size}: must be at least 1 image per shard")
    if num_proc < 1:
        raise UsageError(f"--num-proc {num_proc}: must be at least 1")
    for split in splits or []:
        if not SPLIT_NAME.match(split):
            raise UsageError(f"--splits {split!r}: a split name is letters, digits and _ (it names the shard files)")
    if splits is not None and (not splits or len(set(splits)) != len(splits)):
        raise UsageError(f"--splits {' '.join(splits)}: name each split once, at least one")


def loose_files(source: str) -> bool:
    """Parquet or .tar files not named <split>-NNNNN-of-NNNNN (a README.md or report beside them aside):
    load_images gives them to whatever split is asked, so they are one split (train), not three copies of it."""
    path = Path(source).expanduser()
    if (
        not (path.exists() or any(c in source for c in "*?["))
        or (path / "state.json").exists()
        or (path / "dataset_dict.json").exists()
    ):
        return False
    files = [f for f in _local_files(source) if not is_sidecar(f)]
    suffixes = {Path(f).suffix.lower() for f in files}
    named = all(SPLIT_FILE.match(Path(f).name) for f in files)
    return bool(files) and (suffixes <= {".parquet"} or suffixes <= {".tar"}) and not named


def load_splits(source: str, splits: list[str] | None, config: str | None) -> dict:
    """{split: Dataset}. Asked splits must all load; by default train must, validation and test may."""
    if splits is not None:
        return {split: load_images(source, split, config) for split in splits}
    found = {"train": load_images(source, "train", config)}
    if loose_files(source):
        return found
    for split in DEFAULT_SPLITS[1:]:
        try:
            found[split] = load_images(source, split, config)
        except UsageError:  # that split does not exist
            continue
    return found


def label_column_of(ds, image_column: str) -> str | None:
    """The label column fine-tuning would find (the only ClassLabel, or one named label/labels), or None."""
    try:
        column = find_label_column(ds, None)
    except UsageError:
        return None
    return None if column == image_column else column


def shrink(image, short_side: int) -> PILImage.Image:
    """An RGB PIL image or (3, H, W) uint8 tensor -> RGB PIL image whose shorter side is at most
    short_side (never enlarged), aspect kept."""
    if not isinstance(image, PILImage.Image):
        image = PILImage.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy()))  # (H, W, 3)
    w, h = image.size
    if min(w, h) <= short_side:
        return image
    scale = short_side / min(w, h)
    size = (short_side, max(1, round(h * scale))) if w <= h else (max(1, round(w * scale)), short_side)
    return image.resize(size, RESAMPLE)


def jpeg_bytes(image: PILImage.Image, quality: int) -> bytes:
    """Baseline JPEG at `quality` with Pillow's default 4:2:0 chroma subsampling (what ImageNet's JPEGs use)."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _missing(label) -> bool:
    return label is None or (isinstance(label, (float, np.floating)) and np.isnan(label))


def reencode_batch(
    batch: dict, indices: list[int], image_column: str, label_column: str | None, short_side: int, quality: int
) -> dict:
    """Dataset.map function: each image decoded, shrunk and re-encoded, or left empty with its name and
    why (an unreadable file); labels passed through."""
    out = {"image": [], "bad_name": [], "bad_reason": []}
    for value, index in zip(batch[image_column], indices):
        image, problem = open_image(value)
        if image is not None:
            try:
                out["image"].append({"bytes": jpeg_bytes(shrink(image, short_side), quality), "path": None})
                problem = ""
            except Exception as e:  # e.g. an image too large for the JPEG format
                problem = f"{type(e).__name__}: {e}"[:200]
        if problem:
            named = isinstance(value, dict) and value.get("path")
            out["image"].append(None)
            out["bad_name"].append(str(value["path"]) if named else f"#{index}")
            out["bad_reason"].append(problem)
        else:
            out["bad_name"].append("")
            out["bad_reason"].append("")
    if label_column is not None:
        out["label"] = [
            None if _missing(y) else y.item() if isinstance(y, np.generic) else y for y in batch[label_column]
        ]
    return out


def prepare_split(
    ds,
    split: str,
    dest: Path,
    scratch: Path,
    image_column: str | None,
    short_side: int,
    quality: int,
    shard_size: int,
    num_proc: int,
) -> dict:
    """Re-encode one split into dest/<split>-NNNNN-of-NNNNN.parquet; returns its report."""
    start = time.perf_counter()
    column = find_image_column(ds, image_column)
    label = label_column_of(ds, column)
    ds = prepare_columns(ds, column, [column] + ([label] if label else []))
    if isinstance(ds.features[column], (Array3D, Array2D)):
        ds = ds.with_format("numpy", columns=[column], output_all_columns=True)  # arrays, not nested lists
    features = {"image": Image(), "bad_name": Value("string"), "bad_reason": Value("string")}
    if label:
        features["label"] = ds.features[label]  # ClassLabel names (or the source's own label type) kept
    encoded = ds.map(
        functools.partial(
            reencode_batch, image_column=column, label_column=label, short_side=short_side, quality=quality
        ),
        batched=True,
        batch_size=64,
        with_indices=True,
        num_proc=min(num_proc, max(1, len(ds))),
        remove_columns=ds.column_names,
        features=Features(features),
        # the re-encoded set goes to a scratch folder in DST, deleted at the end, not to the source's cache
        cache_file_name=str(scratch / f"{split}.arrow"),
        load_from_cache_file=False,
        desc=f"re-encoding {split}",
    )
    bad = encoded.filter(lambda reason: bool(reason), input_columns="bad_reason")
    good = encoded.filter(lambda reason: not reason, input_columns="bad_reason").select_columns(
        ["image"] + (["label"] if label else [])
    )
    shards = max(1, math.ceil(len(good) / shard_size))
    written = 0
    for i in range(shards):
        path = dest / f"{split}-{i:05d}-of-{shards:05d}.parquet"
        good.shard(shards, i, contiguous=True).to_parquet(str(path))  # features travel in the schema metadata
        written += path.stat().st_size
    examples = bad.select(range(min(MAX_BAD_EXAMPLES, len(bad))))
    return {
        "images": len(good),
        "bad_images": len(bad),
        "bad_examples": [{"name": n, "reason": r} for n, r in zip(examples["bad_name"], examples["bad_reason"])],
        "shards": shards,
        "bytes": written,
        "seconds": round(time.perf_counter() - start, 2),
        "image_column": column,
        "label_column": label,
        "class_names": list(features["label"].names) if label and isinstance(features["label"], ClassLabel) else None,
    }


def prepare_dataset(
    source: str,
    dest: str,
    splits: list[str] | None = None,
    short_side: int = 256,
    quality: int = 90,
    shard_size: int = 1000,
    num_proc: int = 1,
    config: str | None = None,
    image_column: str | None = None,
) -> dict:
    """Re-encode `source` (anything --dataset accepts) into `dest`: JPEGs whose shorter side is at most
    short_side, in parquet shards of at most shard_size images per split. Returns the report, also
    written to dest/prepare_report.json."""
    check_request(dest, short_side, quality, shard_size, num_proc, splits)
    start = time.perf_counter()
    sources = load_splits(source, splits, config)
    for ds in sources.values():  # refuse a bad --image-column before re-encoding anything
        find_image_column(ds, image_column)
    out = Path(dest).expanduser()
    existed = out.exists()
    scratch = out / ".prepare-scratch"
    scratch.mkdir(parents=True)
    try:
        report = {
            "source": source,
            "config": config,
            "short_side": short_side,
            "quality": quality,
            "shard_size": shard_size,
            "resample": "bicubic",
            "format": "JPEG 4:2:0",
            "splits": {
                split: prepare_split(ds, split, out, scratch, image_column, short_side, quality, shard_size, num_proc)
                for split, ds in sources.items()
            },
        }
    except BaseException:  # DST was new or empty: leave it so, not half-written
        for child in out.iterdir() if existed else [out]:
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - start, 2)
    (out / "prepare_report.json").write_text(json.dumps(report, indent=2))
    return report


def default_num_proc() -> int:
    """The cores this process may use (taskset/cgroup affinity, not the machine's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
