"""Held-out and low-label subsets: probe images, class-balanced and seeded, and labelled sets for fine-tuning."""

import numpy as np
import torch
from datasets import (
    Array2D,
    Array3D,
)

from mpp.data.decode import decode_image
from mpp.data.sources import find_image_column, find_label_column, load_images, prepare_columns
from mpp.data.transforms import resize_square
from mpp.errors import UsageError


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
