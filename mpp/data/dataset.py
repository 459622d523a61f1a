"""Image datasets through the `datasets` library, decoded safely and augmented per sample.

--dataset may be a built-in offline set, a local folder (imagefolder layout or save_to_disk),
parquet files, webdataset .tar shards, or a Hugging Face Hub id. Every kind except save_to_disk
goes through datasets.load_dataset, so the Hub path is the same code as the local ones.
"""

import glob
import io
import itertools
import os
import random
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
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
from PIL import Image as PILImage
from PIL import ImageOps

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


def to_levels(a: np.ndarray, what: str = "array") -> np.ndarray:
    """Numbers -> uint8 levels 0..255 by a fixed rule per dtype, never by the image's own range:
    uint8 as is; bool False/True -> 0/255; uint16 0..65535 -> x / 257 (= x * 255 / 65535);
    floats must lie in [0, 1] -> x * 255; other integers must lie in 0..255 and are taken as they are.
    Scaled values are rounded to the nearest level, halves up (0.5 -> 128). Raises ValueError for
    values outside the rule's range (NaN included) or another dtype."""
    if a.dtype == np.uint8:
        return a
    if a.size == 0:
        raise ValueError(f"{what} is empty")
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint16:
        return np.floor(a / 257 + 0.5).astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        low, high = np.min(a), np.max(a)  # NaN propagates, and fails the test below
        if not (low >= 0 and high <= 1):
            raise ValueError(
                f"{what}: float values must lie in [0, 1], found {low:g}..{high:g} (store uint8 0..255 or floats 0..1)"
            )
        return np.floor(a.astype(np.float64) * 255 + 0.5).astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        low, high = int(np.min(a)), int(np.max(a))
        if low < 0 or high > 255:
            raise ValueError(
                f"{what}: {a.dtype} values must lie in 0..255, found {low}..{high} (only uint16 is read as 16-bit)"
            )
        return a.astype(np.uint8)
    raise ValueError(f"{what}: unsupported dtype {a.dtype}")


def pil_to_rgb(img: PILImage.Image) -> PILImage.Image:
    """Any PIL image -> RGB. Modes I;16* and I (32-bit integers) are read as 16-bit levels 0..65535
    (x / 257; I values outside 0..65535 are refused), mode F as floats in [0, 1] (x * 255, others
    refused), both rounded halves up; transparency is composited over white; CMYK, P, L, 1 and the
    rest by PIL's own conversion. An upright RGB image comes back as it is (decoded), not copied."""
    if img.getexif().get(0x0112, 1) != 1:  # photos taken sideways (exif_transpose would copy even an upright one)
        img = ImageOps.exif_transpose(img)
    if img.mode == "I" or img.mode.startswith("I;16"):
        a = np.asarray(img).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(
                f"mode {img.mode} values must lie in 0..65535 (read as 16-bit), found {a.min()}..{a.max()}"
            )
        img = PILImage.fromarray(to_levels(a.astype(np.uint16), f"mode {img.mode} image"))
    elif img.mode == "F":
        img = PILImage.fromarray(to_levels(np.asarray(img), "mode F image"))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = PILImage.alpha_composite(white, rgba)
    if img.mode == "RGB":
        img.load()
        return img
    return img.convert("RGB")


CHANNELS = (1, 3, 4)  # grey, RGB, RGBA


def _array_to_rgb(a: np.ndarray) -> torch.Tensor | PILImage.Image:
    """An Array2D / Array3D value -> (3, H, W) uint8 tensor (an RGB PIL image for RGBA: over white).

    Shapes: (H, W) grey; (H, W, C) or (C, H, W) with C in 1, 3, 4: the end that can be a channel
    axis is; when both can (e.g. (3, 4, 4)) the array is refused as ambiguous. Values: to_levels.
    """
    shape = a.shape
    if a.ndim == 2:
        a = a[..., None]  # (H, W, 1)
    elif a.ndim == 3:
        first, last = shape[0] in CHANNELS, shape[-1] in CHANNELS
        if first and last:
            raise ValueError(
                f"array of shape {shape} is ambiguous: channels first or last? (C must be 1, 3 or 4 at one end only)"
            )
        if not (first or last):
            raise ValueError(f"array of shape {shape}: no channel axis of 1, 3 or 4 at either end")
        if first:
            a = a.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    else:
        raise ValueError(f"array of shape {shape}: expected (H, W), (H, W, C) or (C, H, W)")
    a = to_levels(a, f"array of shape {shape}")
    if a.shape[-1] == 4:
        return pil_to_rgb(PILImage.fromarray(np.ascontiguousarray(a), "RGBA"))
    t = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)  # (C, H, W)
    return t.expand(3, -1, -1) if t.shape[0] == 1 else t


def open_image(value) -> tuple[PILImage.Image | torch.Tensor | None, str]:
    """Any stored image -> (an RGB PIL image, '') for encoded files, ((3, H, W) uint8 tensor, '') for
    arrays, or (None, why it was skipped).

    Encoded images stay PIL so that augmentation crops and resizes them before the conversion to a
    tensor: PIL's resize of the crop plus a small conversion costs a quarter less than converting
    the whole image first (benchmarks/bench_loop.py, JPEG arm). Numbers become levels by a fixed
    rule per dtype or PIL mode (to_levels, pil_to_rgb); arrays that break it are skipped with the reason.
    """
    try:
        if isinstance(value, dict):  # Image(decode=False): {"bytes": ..., "path": ...}
            opened = open_encoded(value)
            if opened is None:
                return None, "empty image entry"
            with opened as img:
                img.load()
                return pil_to_rgb(img), ""
        if isinstance(value, PILImage.Image):
            return pil_to_rgb(value), ""
        if value is None:
            return None, "missing image"
        return _array_to_rgb(np.asarray(value)), ""
    except Exception as e:  # truncated, corrupt, not an image, decompression bomb, ambiguous array, ...
        return None, why(e)


def read_bytes(value) -> bytes | None:
    """The encoded file behind an Image(decode=False) value, or None."""
    if not isinstance(value, dict):
        return None
    if value.get("bytes"):
        return value["bytes"]
    if value.get("path"):
        with open(value["path"], "rb") as f:
            return f.read()
    return None


def open_encoded(value) -> PILImage.Image | None:
    """An Image(decode=False) value opened but not decoded (the header read), or None for other values."""
    if not isinstance(value, dict):
        return None
    data = value.get("bytes")
    source = io.BytesIO(data) if data else value.get("path")
    return None if source is None else PILImage.open(source)


def why(e: Exception) -> str:
    """One line, at most 200 characters: what went wrong reading an image."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]


def augment_value(value, transform, name: str, defer: bool = False):
    """One stored image -> its augmented (3, S, S) uint8 tensor, or (defer: --decode gpu) an EncodedCrop
    for the training process to decode, or a BadImage saying why not. A transform that opens images
    itself (augment.CropFlip) gets encoded files undecoded, so that it decodes only what its crop needs."""
    from mpp.data.augment import defer_or_apply

    if getattr(transform, "opens_images", False) and isinstance(value, dict):
        try:
            opened = open_encoded(value)
            if opened is None:
                return BadImage(name, "empty image entry")
            with opened:
                return (
                    defer_or_apply(opened, read_bytes(value), transform, name)
                    if defer
                    else transform(opened, lambda: read_bytes(value))
                )
        except Exception as e:  # as open_image: truncated, corrupt, not an image, ...
            return BadImage(name, why(e))
    image, problem = open_image(value)
    return BadImage(name, problem) if image is None else as_tensor(transform(image))


def as_tensor(image: PILImage.Image | torch.Tensor) -> torch.Tensor:
    """An RGB PIL image or a (3, H, W) uint8 tensor -> (3, H, W) uint8 tensor."""
    if isinstance(image, torch.Tensor):
        return image
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def decode_image(value) -> tuple[torch.Tensor | None, str]:
    """Any stored image -> ((3, H, W) uint8 tensor, '') or (None, why it was skipped)."""
    image, problem = open_image(value)
    return (None if image is None else as_tensor(image)), problem


def _describe(value, index) -> str:
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    return f"#{index}"


@dataclass
class BadImage:
    name: str
    reason: str


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A seed per (run seed, epoch, index): augmentation that depends on neither workers nor resumes."""
    return (seed * 1_000_003 + epoch) * 2_147_483_647 + index & 0x7FFF_FFFF_FFFF_FFFF


def _missing(label) -> bool:
    """None, or NaN (how a numpy-formatted dataset shows a missing integer)."""
    return label is None or (isinstance(label, (float, np.floating)) and np.isnan(label))


# seeded() borrows the process's global RNGs; threads that augment at once must take turns. On XLA
# with no worker processes, torch_xla's loader thread augments the next training batches while the
# main thread augments a held-out set for an evaluation: without the lock each reseeds the other's draws.
_GLOBAL_RNGS = threading.Lock()


def seeded(transform, image, seed: int):
    """transform(image) with torch's, Python's and numpy's global RNGs seeded (timm's RandAugment
    draws from the last two), leaving all three as they were."""
    with _GLOBAL_RNGS:
        state, np_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed % 2**32)  # numpy takes 32-bit seeds
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return transform(image)
        finally:
            random.setstate(state)
            np.random.set_state(np_state)


class AugmentedImages(torch.utils.data.Dataset):
    """A map-style dataset of augmented (3, H, W) uint8 tensors, with their labels when label_column
    is given; broken images become BadImage."""

    def __init__(
        self, ds: Dataset, image_column: str, transform, seed: int, label_column: str | None = None, defer: bool = False
    ):
        columns = [image_column] + ([label_column] if label_column else [])
        self.ds = prepare_columns(ds, image_column, columns)
        if isinstance(self.ds.features[image_column], (Array3D, Array2D)):
            self.ds = self.ds.with_format("numpy")
        self.column = image_column
        self.label_column = label_column
        self.transform = transform
        self.seed = seed
        self.defer = defer  # --decode gpu: JPEGs leave as EncodedCrop
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list):
        """indices: ints (the epoch is self.epoch) or (epoch, index) pairs from loader.EpochBatches: worker
        processes that live across epochs keep the dataset copy of the first, so the epoch travels with them."""
        epoch = indices[0][0] if isinstance(indices[0], tuple) else self.epoch
        indices = [i[1] if isinstance(i, tuple) else i for i in indices]
        rows = self.ds[indices]  # one Arrow read per batch instead of one per image
        # one seed per batch, from its first index (unique within an epoch): the same batches get
        # the same augmentation whatever the number of workers, and after a resume
        images = seeded(
            self._augment_all, list(zip(rows[self.column], indices)), sample_seed(self.seed, epoch, indices[0])
        )
        if self.label_column is None:
            return images
        return [
            x if isinstance(x, BadImage) else BadImage(f"#{i}", "missing label") if _missing(y) else (x, int(y))
            for x, y, i in zip(images, rows[self.label_column], indices)
        ]

    def _augment_all(self, values_and_indices):
        return [
            augment_value(value, self.transform, _describe(value, index), self.defer)
            for value, index in values_and_indices
        ]


@dataclass
class StreamPosition:
    """How far a streaming run got into an epoch: the batches each DataLoader worker had delivered
    (each worker reads its own shards of the stream) and the worker whose batch comes next."""

    epoch: int = 0
    worker_batches: tuple[int, ...] = (0,)
    next_worker: int = 0

    @classmethod
    def of_run(cls, state: dict, workers: int) -> "StreamPosition":
        """From a checkpoint's trainer state, for a loader with `workers` workers (0: the main process)."""
        n = max(1, workers)
        counts = state.get("stream_worker_batches")
        if counts is None:  # older checkpoints: the DataLoader's round robin over workers that all had batches left
            b = state["batches_in_epoch"]
            return cls(state["epoch"], tuple(b // n + (w < b % n) for w in range(n)), b % n)
        if len(counts) != n and sum(counts):
            raise UsageError(
                f"--workers {workers}: this streaming run was checkpointed with "
                f"{len(counts) if len(counts) > 1 else 0} "
                f"loader workers, and each reads its own part of the stream; resume it with that many"
            )
        return cls(state["epoch"], tuple(counts) if len(counts) == n else (0,) * n, state.get("stream_next_worker", 0))


class StreamGap:
    """A placeholder item: see AugmentedStream.__iter__."""


class AugmentedStream(torch.utils.data.IterableDataset):
    """The streaming twin of AugmentedImages over a datasets.IterableDataset (already split by node).

    A resumed run reads exactly what the uninterrupted one would have read: in the resumed epoch each
    worker re-reads its share of the shuffled stream (the epoch's shuffle is kept) and drops the
    examples it had delivered. The DataLoader takes one batch from each worker in turn, starting at
    worker 0; workers before `next_worker` first yield one batch of StreamGap placeholders, which
    StreamLoader drops, so the turn order continues where it stopped.
    """

    def __init__(
        self,
        ds: IterableDataset,
        image_column: str,
        transform,
        seed: int,
        rank: int = 0,
        batch_size: int = 1,
        resume: StreamPosition | None = None,
        defer: bool = False,
    ):
        self.ds = prepare_columns(ds, image_column)
        self.column = image_column
        self.transform = transform
        self.seed = seed
        self.rank = rank
        self.batch_size = batch_size
        self.resume = resume or StreamPosition()
        self.defer = defer
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.ds.set_epoch(epoch)

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        wid = worker.id if worker else 0
        consumed = 0
        if self.epoch == self.resume.epoch and any(self.resume.worker_batches):
            consumed = self.resume.worker_batches[wid] * self.batch_size
            if wid < self.resume.next_worker:
                yield from [StreamGap()] * self.batch_size
        seed = self.seed * 1009 + self.rank * 101 + wid
        # iterating self.ds in a worker reads that worker's shards only (datasets splits them)
        for j, row in itertools.islice(enumerate(self.ds), consumed, None):  # skipped rows are read, not decoded
            value = row[self.column]
            yield seeded(
                lambda v, j=j: augment_value(v, self.transform, _describe(v, j), self.defer),
                value,
                sample_seed(seed, self.epoch, j),
            )

    @staticmethod
    def collate(items: list) -> dict:
        """collate_images, plus which worker made the batch (or a gap batch of placeholders)."""
        worker = torch.utils.data.get_worker_info()
        wid = worker.id if worker else 0
        if isinstance(items[0], StreamGap):
            return {"gap": True, "worker": wid}
        return {**collate_images(items), "worker": wid}


class StreamLoader:
    """A DataLoader over an AugmentedStream that drops gap batches and counts each worker's batches,
    for the checkpoint (position())."""

    def __init__(self, loader: torch.utils.data.DataLoader, resume: StreamPosition):
        self.loader = loader
        self.resume = resume
        self.workers = max(1, loader.num_workers)
        self.worker_batches, self.next_worker = [0] * self.workers, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.resume.epoch and any(self.resume.worker_batches):
            self.worker_batches, self.next_worker = list(self.resume.worker_batches), self.resume.next_worker
        else:
            self.worker_batches, self.next_worker = [0] * self.workers, 0

    def __iter__(self):
        for batch in self.loader:
            worker = batch.pop("worker")
            if batch.get("gap"):
                continue
            self.worker_batches[worker] += 1
            self.next_worker = (worker + 1) % self.workers
            yield batch

    def position(self) -> dict:
        return {"stream_worker_batches": list(self.worker_batches), "stream_next_worker": self.next_worker}


def collate_images(items: list) -> dict:
    """Stack the images (and labels); name the bad ones so the training loop can count and report them.

    Items are image tensors, (image, label) pairs or BadImage. A bad image's slot is filled with a
    good item of the same batch, so every batch keeps its static shape and every process takes the
    same number of steps (a short batch on one rank of a multi-process run would leave the others
    waiting). `valid` (B,) bool is False at the filled slots: evaluation leaves them out of its
    counts; training keeps them (the copy is trained on once more, which keeps shapes static).
    """
    good = [x for x in items if not isinstance(x, BadImage)]
    bad = [(x.name, x.reason) for x in items if isinstance(x, BadImage)]
    if not good:
        raise RuntimeError(f"all {len(items)} images of a batch are unreadable, e.g. {bad[0][0]}: {bad[0][1]}")
    filled = good + [good[i % len(good)] for i in range(len(bad))]
    valid = torch.arange(len(filled)) < len(good)  # (B,)
    labelled = isinstance(filled[0], tuple)
    images = [x for x, _ in filled] if labelled else filled
    batch = {"pixels": stack_images(images), "valid": valid, "bad": bad}  # pixels (B, 3, H, W) uint8
    encoded = [(slot, x) for slot, x in enumerate(images) if not isinstance(x, torch.Tensor)]
    if encoded:  # --decode gpu: these slots are filled on the device (augment.decode_deferred)
        batch["encoded"] = encoded
    if labelled:
        batch["labels"] = torch.tensor([y for _, y in filled])
    return batch


def stack_images(images: list) -> torch.Tensor:
    """(B, 3, S, S) uint8; zeros where an EncodedCrop (of size S) waits to be decoded."""
    if all(isinstance(x, torch.Tensor) for x in images):
        return torch.stack(images)
    size = next(x.shape[-1] if isinstance(x, torch.Tensor) else x.size for x in images)
    return torch.stack(
        [x if isinstance(x, torch.Tensor) else torch.zeros(3, size, size, dtype=torch.uint8) for x in images]
    )


# The evaluation view: the shorter side resized to the input size (bilinear), then the centre crop
# (crop_pct 1.0). timm's config.json in a run folder names the same, so that timm.data.create_transform
# builds this view from it (models/hub_folder.py).
EVAL_INTERPOLATION, EVAL_CROP_PCT, EVAL_CROP_MODE = "bilinear", 1.0, "center"


def timm_transform(
    img_size: int, training: bool, crop_scale=(0.35, 1.0), hflip: float = 0.5, auto_augment: str | None = None
):
    """timm's own transforms (RandomResizedCrop, flip, RandAugment; or resize + centre crop for
    evaluation) on RGB PIL images or (3, H, W) uint8 tensors, returning uint8 tensors: normalisation
    happens on the device."""
    from timm.data import create_transform
    from torchvision.transforms.v2.functional import to_pil_image

    if training:
        tf = create_transform(
            img_size,
            is_training=True,
            scale=tuple(crop_scale),
            hflip=hflip,
            auto_augment=auto_augment,
            color_jitter=None,
            normalize=False,
        )
    else:
        tf = create_transform(
            img_size,
            is_training=False,
            interpolation=EVAL_INTERPOLATION,
            crop_pct=EVAL_CROP_PCT,
            crop_mode=EVAL_CROP_MODE,
            normalize=False,
        )
    return lambda image: tf(image if isinstance(image, PILImage.Image) else to_pil_image(image))


def train_transform(
    img_size: int, crop_scale: tuple[float, float] = (0.35, 1.0), hflip: float = 0.5, decode: str = "cpu"
):
    """Pretraining augmentation: RandomResizedCrop and horizontal flip (augment.CropFlip: torchvision's
    draws; decode 'cpu': JPEGs decoded the cheapest way that keeps the crop's resolution, 'pil': as
    before, by Pillow in full), on RGB PIL images, opened JPEGs or (3, H, W) uint8 tensors, returning
    (3, img_size, img_size) uint8."""
    from mpp.data.augment import CropFlip

    return CropFlip(img_size, crop_scale, hflip=hflip, fast=decode != "pil")


def resize_square(image: torch.Tensor, img_size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, img_size, img_size): shorter side resized, then centre-cropped (evaluation view)."""
    from torchvision.transforms.v2.functional import center_crop, resize

    return center_crop(resize(image, img_size, antialias=True), img_size)


def sample_images(
    dataset: str, split: str, config: str | None, column: str | None, count: int, seed: int, img_size: int
):
    """(count, 3, img_size, img_size) uint8: random readable images, resized and centre-cropped."""
    ds = load_images(dataset, split, config)
    column = find_image_column(ds, column)
    ds = prepare_columns(ds, column)
    if isinstance(ds.features[column], (Array3D, Array2D)):
        ds = ds.with_format("numpy")
    order = np.random.default_rng(seed).permutation(len(ds))
    images = []
    for i in order[: 4 * count]:  # a few spare draws for unreadable images
        image, _ = decode_image(ds[int(i)][column])
        if image is not None:
            images.append(resize_square(image, img_size))
        if len(images) == count:
            break
    if not images:
        raise UsageError(f"--dataset {dataset}: no readable images found")
    return torch.stack(images)


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


def low_label_subset(ds, label_column: str, per_class: int | None, fraction: float | None, seed: int):
    """A reproducible subset: per_class examples of each class, or a fraction of the whole (seeded)."""
    if per_class is None and fraction is None:
        return ds
    labels = np.asarray(ds[label_column])
    rng = np.random.default_rng(seed)
    if fraction is not None:
        picked = rng.permutation(len(ds))[: max(1, round(fraction * len(ds)))]
    else:
        classes, counts = np.unique(labels, return_counts=True)
        if per_class > counts.min():
            raise UsageError(
                f"--train-per-class {per_class}: class {classes[counts.argmin()]} has only {counts.min()} examples"
            )
        picked = np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in classes])
    return ds.select(np.sort(picked))


def stratified_subset(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """`limit` sorted indices whose class counts differ by at most one (a class with fewer examples
    gives them all): each class in a seeded random order, the classes taking turns."""
    order = np.random.default_rng(seed).permutation(len(labels))
    rank = np.empty(len(labels), dtype=np.int64)  # position of each example within its class's order
    for c in np.unique(labels):
        members = order[labels[order] == c]
        rank[members] = np.arange(len(members))
    return np.sort(order[np.argsort(rank[order], kind="stable")][:limit])


def labelled_images(
    dataset: str,
    split: str,
    img_size: int,
    per_class: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    label_column: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A labelled split as (M, 3, img_size, img_size) uint8 images (resized, centre-cropped) and (M,) labels,
    for frozen-feature evaluation: per_class examples of each class, and/or `limit` examples balanced
    over the classes (both seeded; a folder is stored class by class, so its first rows would not do)."""
    ds = load_images(dataset, split)
    label = find_label_column(ds, label_column)
    ds = low_label_subset(ds, label, per_class, None, seed)
    if limit and limit < len(ds):
        ds = ds.select(stratified_subset(np.asarray(ds[label]), limit, seed))
    column = find_image_column(ds)
    # a row slice reads the column in one go; iterating a lazy Column reads it image by image (76 s for 27k)
    decoded = [decode_image(v)[0] for v in prepare_columns(ds, column).with_format("numpy")[:][column]]
    keep = [i for i, image in enumerate(decoded) if image is not None]
    images = torch.stack([resize_square(decoded[i], img_size) for i in keep])
    return images, torch.tensor(np.asarray(ds[label]))[keep]
