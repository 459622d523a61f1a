"""The transforms of a run: training augmentation (crop-first decoding, flips) and the held-out
evaluation view, which timm's config.json describes with the same constants.
"""

import torch
from PIL import Image as PILImage

from mpp.data.augment import CropFlip

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
    return CropFlip(img_size, crop_scale, hflip=hflip, fast=decode != "pil")


def resize_square(image: torch.Tensor, img_size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, img_size, img_size): shorter side resized, then centre-cropped (evaluation view)."""
    from torchvision.transforms.v2.functional import center_crop, resize

    return center_crop(resize(image, img_size, antialias=True), img_size)
