"""Pretraining augmentation (RandomResizedCrop + horizontal flip) that decodes only what the crop needs.

The crop box and the flip are drawn first, from the image's size in its header, with exactly the draws
of torchvision's `v2.Compose([v2.RandomResizedCrop, v2.RandomHorizontalFlip])` (same RNG, same order), so
a seeded sample gets the same box and flip whichever way it is decoded (--decode):

- `pil`: Pillow decodes the whole image, torchvision crops and resizes it as a PIL image (the path
  that decoded everything first, bit for bit);
- `cpu` (default), for baseline RGB or grey JPEGs: when the crop is at least twice the output size,
  Pillow decodes at 1/2, 1/4 or 1/8 scale in the DCT domain (`Image.draft`), never below the output
  resolution, and the box is cropped from that at sub-pixel precision (PIL's `resize(box=...)`, same
  bilinear antialiasing filter); otherwise libjpeg-turbo decodes through `torchvision.io.decode_jpeg`
  and torch crops and resizes the tensor (antialiased bilinear, within 1 level of PIL's): 2-3x less CPU
  than `pil` on ImageNet-sized JPEGs (benchmarks/bench_data.py);
- `gpu`: the worker hands over the JPEG's bytes and the box; the training process decodes the batch
  with nvJPEG and crops, resizes and flips the whole batch on the device at once, with the `cpu` path's
  filter as two batched matrix products (`decode_deferred`, `crop_batch`).

Other images (PNG, CMYK, EXIF-rotated JPEGs, arrays) take the `pil` path in every mode.
"""

import math
from dataclasses import dataclass

import torch
from PIL import Image as PILImage
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from mpp.data.decode import BadImage, as_tensor, open_encoded, open_image, pil_to_rgb, read_bytes, why

DECODE_MODES = ("cpu", "pil", "gpu")
EXIF_ORIENTATION = 0x0112
DRAFT_SCALES = (8, 4, 2)  # the DCT-domain reductions libjpeg offers


@dataclass(frozen=True)
class CropBox:
    """Where to crop (in the image as it is shown, rotation applied) and whether to flip it."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


@dataclass
class EncodedCrop:
    """A JPEG to be decoded by the training process (--decode gpu): its bytes, its crop, the output
    size and the image's name (for the count of unreadable images)."""

    data: bytes
    box: CropBox
    size: int
    name: str = ""


class CropFlip:
    """RandomResizedCrop(size, scale, ratio) then a horizontal flip with probability hflip, on an RGB
    PIL image (decoded or only opened), or a (3, H, W) uint8 tensor; returns (3, size, size) uint8.
    `opens_images`: the data pipeline may hand it an opened, not yet decoded image (see `draft`)."""

    opens_images = True

    def __init__(self, size: int, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5, fast: bool = True):
        self.size = size
        self.crop = v2.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio), antialias=True)
        self.hflip = hflip
        self.fast = fast  # --decode cpu; False: pil

    def sample(self, height: int, width: int) -> CropBox:
        """The box and flip for an image of this size: the draws of v2.RandomResizedCrop, then (only when
        hflip > 0, as the old pipeline had no flip transform then) v2.RandomHorizontalFlip's."""
        shape_only = torch.empty(1, 1, 1, dtype=torch.uint8).expand(1, height, width)  # a size, no pixels
        p = self.crop.make_params([shape_only])
        flip = self.hflip > 0 and not bool(torch.rand(1) >= self.hflip)  # RandomHorizontalFlip: skip when rand >= p
        return CropBox(p["top"], p["left"], p["height"], p["width"], flip)

    def __call__(self, image, read=None) -> torch.Tensor:
        """image: PIL (decoded, or opened only) or (3, H, W) uint8; read(): the encoded file's bytes, for the
        libjpeg-turbo path of an opened JPEG (without it that path is not taken)."""

        if isinstance(image, torch.Tensor):  # (3, H, W) uint8
            box = self.sample(*image.shape[-2:])
            return crop_tensor(image, box, self.size)
        box = self.sample(*shown_size(image))
        if self.fast and deferrable(image):
            scale = draft_jpeg(image, box, self.size)
            if scale:  # decoded at 1/scale: the box in the reduced image's coordinates, sub-pixel
                image = pil_to_rgb(image)
                # libjpeg's reduced pixel i averages full pixels [i * scale, (i + 1) * scale): the map is exactly
                # 1/scale, not reduced size / full size, which ceil() makes larger (a shift to the bottom right)
                area = (
                    box.left / scale,
                    box.top / scale,
                    (box.left + box.width) / scale,
                    (box.top + box.height) / scale,
                )
                return self.finish(as_tensor(image.resize((self.size, self.size), PILImage.BILINEAR, box=area)), box)
            if read is not None:
                return crop_tensor(decode_jpeg_rgb(read()), box, self.size)
        out = F.resized_crop(
            pil_to_rgb(image),
            box.top,
            box.left,
            box.height,
            box.width,
            [self.size, self.size],
            InterpolationMode.BILINEAR,
            antialias=True,
        )
        return self.finish(as_tensor(out), box)

    @staticmethod
    def finish(pixels: torch.Tensor, box: CropBox) -> torch.Tensor:
        return F.horizontal_flip(pixels) if box.flip else pixels


def crop_tensor(image: torch.Tensor, box: CropBox, size: int) -> torch.Tensor:
    """(3, H, W) uint8 on any device -> its box resized to (3, size, size) (antialiased bilinear), flipped if asked."""
    out = F.resized_crop(
        image, box.top, box.left, box.height, box.width, [size, size], InterpolationMode.BILINEAR, antialias=True
    )
    return CropFlip.finish(out, box)


def crop_batch(images: list[torch.Tensor], boxes: list[CropBox], size: int) -> torch.Tensor:
    """Each (3, H_i, W_i) uint8 image's box resized to (size, size) and flipped if asked, for the whole batch at
    once -> (N, 3, size, size) uint8 (per-image resizes cost a kernel launch each, which starves a GPU step).
    The resize is crop_tensor's antialiased bilinear (PIL's triangle filter, widened by the scale when shrinking,
    confined to the box) written as two batched matrix products: out_n = Wy_n @ (image_n @ Wx_n^T), the images
    zero-padded to one (N, 3, H, W) tensor that no weight reaches. Within 1 level of crop_tensor."""
    height, width = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    padded = images[0].new_zeros(len(images), 3, height, width, dtype=torch.float32)  # (N, 3, H, W)
    for k, image in enumerate(images):
        padded[k, :, : image.shape[1], : image.shape[2]] = image
    device = padded.device
    rows = resize_weights([b.top for b in boxes], [b.height for b in boxes], size, height, device)  # (N, S, H)
    cols = resize_weights([b.left for b in boxes], [b.width for b in boxes], size, width, device)  # (N, S, W)
    # along the width first, rounded to whole levels between the passes, as Pillow and torch's uint8 resize do
    wide = torch.einsum("nchw,ntw->ncht", padded, cols).round_().clamp_(0, 255)  # (N, 3, H, S)
    out = torch.einsum("nsh,ncht->ncst", rows, wide)  # (N, 3, S, S)
    flips = torch.tensor([b.flip for b in boxes], device=device)[:, None, None, None]  # (N, 1, 1, 1)
    out = torch.where(flips, out.flip(-1), out)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def resize_weights(starts: list[int], lengths: list[int], size: int, extent: int, device) -> torch.Tensor:
    """(N, size, extent) weights of an antialiased bilinear resize of each crop [start, start + length) of an axis
    to `size` samples, as PIL and torch's antialiased upsampling compute them: output o has its centre at
    scale * (o + 0.5) in the crop, a triangle filter of half-width max(scale, 1), taps from
    trunc(centre - support + 0.5) to trunc(centre + support + 0.5) clipped to the crop, normalised to sum 1."""
    start = torch.tensor(starts, dtype=torch.float64, device=device)[:, None, None]  # (N, 1, 1)
    length = torch.tensor(lengths, dtype=torch.float64, device=device)[:, None, None]
    scale = length / size
    stretch = scale.clamp(min=1.0)  # the filter widens when shrinking: that is the antialiasing
    centre = scale * (torch.arange(size, dtype=torch.float64, device=device)[None, :, None] + 0.5)  # (N, S, 1)
    tap = torch.arange(extent, dtype=torch.float64, device=device)[None, None, :] - start  # (N, 1, E) in the crop
    first = torch.trunc(centre - stretch + 0.5).clamp(min=0)
    last = torch.minimum(torch.trunc(centre + stretch + 0.5), length)  # exclusive
    weights = (1 - ((tap - centre + 0.5) / stretch).abs()).clamp(min=0)
    weights = weights * ((tap >= first) & (tap < last))
    return (weights / weights.sum(-1, keepdim=True)).float()


def decode_jpeg_rgb(data, device="cpu"):
    """libjpeg-turbo (CPU) or nvJPEG (CUDA) through torchvision: bytes, or a list of them -> (3, H, W) uint8 RGB."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    with (
        warnings.catch_warnings()
    ):  # torchvision 0.29 deprecates its decoders in favour of TorchCodec, not yet a dependency
        warnings.simplefilter("ignore", DeprecationWarning)
        if isinstance(data, list):
            return decode_jpeg(
                [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data], mode=ImageReadMode.RGB, device=device
            )
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB, device=device)


def shown_size(image: PILImage.Image) -> tuple[int, int]:
    """(height, width) as shown: an EXIF rotation by 90 or 270 degrees swaps them. Reads the header only."""
    w, h = image.size
    return (w, h) if orientation(image) in (5, 6, 7, 8) else (h, w)


def orientation(image: PILImage.Image) -> int:
    return image.getexif().get(EXIF_ORIENTATION, 1) if hasattr(image, "getexif") else 1


def deferrable(image: PILImage.Image) -> bool:
    """A JPEG that nvJPEG decodes to the same picture as Pillow: RGB or grey, not yet decoded, no EXIF rotation."""
    return (
        image.format == "JPEG"
        and image.mode in ("RGB", "L")
        and bool(getattr(image, "tile", None))
        and orientation(image) == 1
    )


def draft_jpeg(image: PILImage.Image, box: CropBox, size: int) -> int | None:
    """Ask libjpeg to decode at 1/r scale, the largest r in 8, 4, 2 that keeps the crop at least `size`
    pixels on each side (so no resolution is lost); returns the scale it decoded at (Pillow may take a
    smaller one than asked), None when it decodes in full."""
    if not deferrable(image):
        return None
    room = min(box.height, box.width) / size  # how far the crop may shrink before it is smaller than the output
    r = next((r for r in DRAFT_SCALES if r <= room), 1)
    if r == 1:
        return None
    full = image.size
    drafted = image.draft("RGB" if image.mode == "RGB" else "L", (math.ceil(full[0] / r), math.ceil(full[1] / r)))
    if drafted is None or image.size == full:
        return None
    return round(full[0] / drafted[1][2])  # draft's box is (0, 0, width / scale, height / scale)


def defer_or_apply(image: PILImage.Image, data: bytes | None, transform: CropFlip, name: str = ""):
    """--decode gpu in a worker: an EncodedCrop for a JPEG the device can decode (the header is all
    that is read), else the CPU result (PNG, CMYK, progressive-rotated, ... take the CPU path)."""
    if data is not None and deferrable(image):
        return EncodedCrop(data, transform.sample(*shown_size(image)), transform.size, name)
    return transform(image)


def decode_deferred(
    pixels: torch.Tensor, encoded: list[tuple[int, EncodedCrop]], size: int
) -> tuple[torch.Tensor, list[tuple[int, str]]]:
    """Decode the batch's deferred JPEGs on pixels' device (nvJPEG on CUDA, libjpeg-turbo on CPU), then crop,
    resize and flip them all at once (crop_batch) into their slots of pixels (B, 3, size, size) uint8.
    Returns pixels and the slots that failed to decode, with why."""
    if not encoded:
        return pixels, []
    try:
        decoded = decode_jpeg_rgb([e.data for _, e in encoded], pixels.device)  # list of (3, H, W) uint8
    except RuntimeError:  # one broken file fails the whole call: decode them one by one
        decoded = []
        for _, e in encoded:
            try:
                decoded.append(decode_jpeg_rgb(e.data, pixels.device))
            except RuntimeError as err:
                decoded.append(str(err).splitlines()[0][:200] or "RuntimeError")
    failed = [(slot, f"{e.name}: {image}") for (slot, e), image in zip(encoded, decoded) if isinstance(image, str)]
    good = [(slot, e.box, image) for (slot, e), image in zip(encoded, decoded) if not isinstance(image, str)]
    if good:
        slots, boxes, images = zip(*good)
        crops = crop_batch(list(images), list(boxes), size)  # (n, 3, size, size)
        pixels[torch.tensor(slots, device=pixels.device)] = crops
    return pixels, failed


def augment_value(value, transform, name: str) -> torch.Tensor | BadImage:
    """One stored image -> its augmented (3, S, S) uint8 tensor, decoded here (--decode cpu / pil), or a
    BadImage saying why not (what collate_images counts). A transform that opens images itself
    (augment.CropFlip) gets encoded files undecoded, so that it decodes only what its crop needs."""
    return _augment_stored(value, transform, name, lambda opened: transform(opened, lambda: read_bytes(value)))


def defer_value(value, transform, name: str) -> EncodedCrop | torch.Tensor | BadImage:
    """--decode gpu, in a worker: an EncodedCrop of a JPEG the training process decodes on its device
    (decode_deferred); any other image as augment_value gives it."""

    def defer_or_crop(opened):
        return defer_or_apply(opened, read_bytes(value), transform, name)

    return _augment_stored(value, transform, name, defer_or_crop)


def _augment_stored(value, transform, name: str, take_opened):
    """take_opened(an opened, not yet decoded image) when the transform opens images itself and the value
    is an encoded file, else transform(decoded image); any failure becomes a BadImage."""
    if getattr(transform, "opens_images", False) and isinstance(value, dict):
        try:
            opened = open_encoded(value)
            if opened is None:
                return BadImage(name, "empty image entry")
            with opened:
                return take_opened(opened)
        except Exception as e:  # as open_image: truncated, corrupt, not an image, ...
            return BadImage(name, why(e))
    image, problem = open_image(value)
    return BadImage(name, problem) if image is None else as_tensor(transform(image))
