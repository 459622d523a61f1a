"""Stored images to RGB, safely: any encoded file, PIL image or array becomes a (3, H, W) uint8 tensor or
a BadImage saying why not, by fixed rules (alpha over white, EXIF rotation, levels of other dtypes).
"""

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image as PILImage
from PIL import ImageOps


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


def as_tensor(image: PILImage.Image | torch.Tensor) -> torch.Tensor:
    """An RGB PIL image or a (3, H, W) uint8 tensor -> (3, H, W) uint8 tensor."""
    if isinstance(image, torch.Tensor):
        return image
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def decode_image(value) -> tuple[torch.Tensor | None, str]:
    """Any stored image -> ((3, H, W) uint8 tensor, '') or (None, why it was skipped)."""
    image, problem = open_image(value)
    return (None if image is None else as_tensor(image)), problem


def image_name(value, index) -> str:
    """What a report calls a stored image: its file path when it has one, else #index."""
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    return f"#{index}"


@dataclass
class BadImage:
    name: str
    reason: str
