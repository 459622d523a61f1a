"""Where --dataset's images come from: built-in sets, local folders, shards, save_to_disk and the Hub,
all through the `datasets` library (save_to_disk aside), so the Hub path is the same code as the local ones;
the image and label columns.
"""

import glob
import os
import re
from pathlib import Path

from datasets import (
    Array2D,
    Array3D,
    ClassLabel,
    Dataset,
    DatasetDict,
    Image,
    IterableDataset,
    load_dataset,
    load_from_disk,
)

from mpp.data.builtin import BUILTIN_DATASETS
from mpp.errors import UsageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _looks_like_path(name: str) -> bool:
    """Hub ids are 'name' or 'owner/name'; anything else with path syntax was meant as a path, and so was
    'data/mine' when a local folder 'data' exists (the Hub would be asked, with retries, for nothing)."""
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or Path(name).suffix.lower() in (".parquet", ".tar", ".arrow")
        or (name.count("/") == 1 and Path(name.split("/")[0]).is_dir())
    )


def _local_files(path: str) -> list[str]:
    if any(c in path for c in "*?["):
        return sorted(glob.glob(os.path.expanduser(path)))
    p = Path(path).expanduser()
    if p.is_file():
        return [str(p)]
    return sorted(str(f) for f in p.rglob("*") if f.is_file())


SPLIT_FILE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-\d{5}-of-\d{5}\.(parquet|tar)$")  # the Hub's shard naming


def files_of_split(files: list[str], split: str, dataset: str) -> list[str]:
    """Shards named `<split>-00000-of-00004.parquet` (as the Hub and recipes/prepare_data.py write
    them) hold several splits: keep the asked one's. Other files all belong to the asked split."""
    splits = {m.group("split") if (m := SPLIT_FILE.match(Path(f).name)) else None for f in files}
    if None in splits:
        return files
    if split not in splits:
        raise UsageError(f"--split {split!r} not in {dataset}; its shards hold: {', '.join(sorted(splits))}")
    return [f for f in files if SPLIT_FILE.match(Path(f).name).group("split") == split]


def is_sidecar(path: str) -> bool:
    """Files that sit beside parquet or .tar shards without being data: the Hub's README.md and
    .gitattributes, recipes/prepare_data.py's prepare_report.json."""
    name = Path(path).name
    return name.startswith(".") or Path(name).suffix.lower() in (".md", ".json", ".txt")


def load_images(
    dataset: str,
    split: str = "train",
    config: str | None = None,
    streaming: bool = False,
) -> Dataset | IterableDataset:
    """The dataset named by --dataset, one split. Raises UsageError for names that cannot work."""
    if dataset in BUILTIN_DATASETS:
        try:
            ds = BUILTIN_DATASETS[dataset](split)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"--dataset {dataset}: {e}") from None
        return ds.to_iterable_dataset(num_shards=8) if streaming else ds

    path = Path(dataset).expanduser()
    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        ds = load_from_disk(str(path))
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise UsageError(f"--split {split!r} not in {path}; it has: {', '.join(ds)}")
            ds = ds[split]
        return ds.to_iterable_dataset(num_shards=max(1, min(64, len(ds) // 1000))) if streaming else ds

    if path.exists() or any(c in dataset for c in "*?["):
        files = _local_files(dataset)
        if not files:
            raise UsageError(f"--dataset {dataset}: no files found")
        shards = [f for f in files if not is_sidecar(f)]
        if shards and {Path(f).suffix.lower() for f in shards} in ({".parquet"}, {".tar"}):
            files = shards  # a README.md or prepare_report.json beside the shards is not data
        suffixes = {Path(f).suffix.lower() for f in files}
        if suffixes <= {".parquet"} or suffixes <= {".tar"}:
            builder = "parquet" if suffixes <= {".parquet"} else "webdataset"
            kwargs = dict(data_files={split: files_of_split(files, split, dataset)})
        elif path.is_dir():
            builder, kwargs = "imagefolder", dict(data_dir=str(path))
        else:
            raise UsageError(
                f"--dataset {dataset}: expected a folder, .parquet files or .tar shards, found {sorted(suffixes)}"
            )
        return _load(builder, split, streaming, **kwargs)

    if _looks_like_path(dataset):
        raise UsageError(f"--dataset {dataset}: no such file or folder (built-in sets: {', '.join(BUILTIN_DATASETS)})")
    return _load(dataset, split, streaming, hub=True, name=config)


def _load(builder: str, split: str, streaming: bool, hub: bool = False, **kwargs):
    """datasets.load_dataset for one split; its errors become one-line UsageErrors."""
    try:
        return load_dataset(builder, split=split, streaming=streaming, **kwargs)
    except ValueError as e:  # unknown split and the like
        raise UsageError(f"--dataset {builder} --split {split}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # not found on the Hub, offline, no access, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "no local file or folder of that name, and the Hugging Face Hub " if hub else ""
        raise UsageError(f"--dataset {builder}: {where}could not load it ({type(e).__name__}: {first})") from None


def is_image_feature(feature) -> bool:
    return isinstance(feature, (Image, Array3D, Array2D))


def find_image_column(ds: Dataset | IterableDataset, requested: str | None = None) -> str:
    """The column holding images: the requested one, or the only image-typed column."""
    features = ds.features
    if features is None:  # some streamed datasets only know their columns after a first example
        features = next(iter(ds.take(1))).keys() if requested is None else {requested: None}
    names = list(features)
    if requested is not None:
        if requested not in names:
            raise UsageError(f"--image-column {requested!r} not in the dataset; columns: {', '.join(names)}")
        return requested
    found = [n for n in names if ds.features is not None and is_image_feature(ds.features[n])]
    if len(found) == 1:
        return found[0]
    if not found:
        raise UsageError(f"the dataset has no image column (columns: {', '.join(names)}); name one with --image-column")
    raise UsageError(f"the dataset has several image columns ({', '.join(found)}); choose one with --image-column")


def prepare_columns(ds, image_column: str, columns: list[str] | None = None):
    """Keep only the columns used (the image column by default); leave encoded images undecoded
    (we decode them safely ourselves)."""
    ds = ds.select_columns(columns or [image_column])
    if ds.features is not None and isinstance(ds.features[image_column], Image):
        ds = ds.cast_column(image_column, Image(decode=False))
    return ds


def find_label_column(ds, requested: str | None) -> str:
    names = list(ds.features)
    if requested is not None:
        if requested not in names:
            raise UsageError(f"--label-column {requested!r} not in the dataset; columns: {', '.join(names)}")
        return requested
    labels = [n for n in names if isinstance(ds.features[n], ClassLabel)] or [
        n for n in names if n in ("label", "labels")
    ]
    if len(labels) != 1:
        raise UsageError(
            f"fine-tuning needs labels: found no single label column among {', '.join(names)}; name it with "
            "--label-column"
        )
    return labels[0]


def class_names_of(ds, column: str) -> list[str]:
    feature = ds.features[column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    return [str(v) for v in sorted(set(ds[column]))]
