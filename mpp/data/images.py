"""Map-style training and held-out sets: per-sample augmentation seeded by (run seed, epoch, index), so it
depends on neither workers nor resumes, and the batches they make.
"""

import random
import threading

import numpy as np
import torch
from datasets import (
    Array2D,
    Array3D,
    Dataset,
)

from mpp.data.augment import augment_value, defer_value
from mpp.data.batch import Batch
from mpp.data.decode import BadImage, image_name
from mpp.data.sources import prepare_columns


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
        augment = defer_value if self.defer else augment_value
        return [augment(value, self.transform, image_name(value, index)) for value, index in values_and_indices]


def collate_images(items: list) -> Batch:
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
    batch = Batch(pixels=stack_images(images), valid=valid, bad=bad)
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
