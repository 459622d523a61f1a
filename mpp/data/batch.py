"""The batch the training and evaluation loaders yield (collate_images), as the loops read it.

A TypedDict, not a dataclass: at run time it is a plain dict, which accelerate's prepare moves to the
device (send_to_device rebuilds mappings key by key), skip_first_batches skips and DataLoader workers
pickle, all as before.
"""

from typing import NotRequired, TypedDict

import torch

from mpp.data.augment import EncodedCrop


class Batch(TypedDict):
    """B images, unreadable ones' slots filled with copies of readable ones (static shapes)."""

    pixels: torch.Tensor  # (B, 3, S, S) uint8; zeros at the slots `encoded` still has to decode
    valid: torch.Tensor  # (B,) bool: False at the filled slots, which evaluation leaves out
    bad: list[tuple[str, str]]  # (name, reason) of each unreadable image
    labels: NotRequired[torch.Tensor]  # (B,) int64, for a labelled set
    encoded: NotRequired[list[tuple[int, EncodedCrop]]]  # --decode gpu: (slot, JPEG) to decode on the device
