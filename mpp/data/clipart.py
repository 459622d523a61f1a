"""Debian's openclipart-png as fixed-size colour images: decoded once, cleaned, cached.

Every PNG under /usr/share/openclipart/png/<category>/<sub-category>/... is composited onto white
(the page clip art is drawn for), fitted into a square keeping its aspect, and resized to 64x64.
Dropped: "Linked Image Not Found" placeholders, images blank after compositing, and exact duplicates
(identical decoded RGBA pixels at full resolution, or identical 64x64 results). Images that are the same
drawing (recoloured, black and white, mirrored, rescaled, renamed: mpp/data/near_duplicates.py) form a
group, and splits are drawn by group, so no drawing sits in two splits.
"""

import hashlib
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mpp.data.near_duplicates import DESCRIPTOR, SOURCE_SIZE, drawing_descriptors, drawing_groups

OPENCLIPART_DIR = Path("/usr/share/openclipart/png")
CACHE_VERSION = "clipart-v2"  # bump when the decoding, the cleaning or the drawings' descriptors change
GROUPS_VERSION = "groups-v1"  # bump when the grouping (near_duplicates) or the split of the groups changes
SIZE = 64
BACKGROUND = (255, 255, 255)
SPLIT_FRACTIONS = {"train": 0.70, "validation": 0.15, "test": 0.15}

# Sub-categories used as classes (every file below the folder, sub-folders included): those showing
# objects with >= 38 distinct images after cleaning (>= ~25 train, ~5 validation, ~5 test each). Left
# out as degenerate, near-duplicate-heavy or separable by style alone: computer/icons and buttons (icon
# themes), shapes/* (spirograph stars, jigsaw pieces, arrows), signs_and_symbols/flags, map_symbols and
# led, recreation/games (playing cards), special/* (blank gradients, tiled patterns), people/stickmen (one
# blue figure), people/smilies (one yellow face), transportation/aiga-symbols (one pictogram style),
# recreation/party (balloons); and those under 38 (e.g. food/meats_and_eggs 30, plants/flowers 32).
CLIPART_CLASSES = [
    "animals/birds",
    "animals/bugs",
    "animals/mammals",
    "buildings/homes",
    "computer/hardware",
    "food/beverages",
    "food/desserts",
    "food/fruit",
    "people/clothing",
    "recreation/holiday",
    "recreation/music",
    "recreation/sports",
    "transportation/roadsigns",
    "transportation/vehicles",
]


def missing_package_error(root: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"openclipart PNGs not found under {root}: install them with 'apt-get install openclipart-png'"
    )


def path_hash(relpath: str) -> int:
    return int.from_bytes(hashlib.sha1(relpath.encode()).digest()[:8], "big")


def group_splits(paths: list[str], groups: np.ndarray, classes: list[str]) -> np.ndarray:
    """(M,) 'train' / 'validation' / 'test' per image, the same for every image of a group.

    Groups are dealt out class by class (a group counts for the class most of its images belong to,
    images outside the class folders forming one more class), in the order of a hash of their first
    path, each to the split furthest below its share of that class's images (SPLIT_FRACTIONS): the
    classes keep about 70/15/15 although groups differ in size, and the deal depends on the files only.
    """
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(int(g), []).append(i)
    owner = {}  # group -> (class index, images of that class)
    for g, idx in members.items():
        found = np.array([class_of(paths[i], classes) for i in idx])
        labelled = found[found >= 0]
        cls = int(np.bincount(labelled).argmax()) if labelled.size else -1
        owner[g] = (cls, int((found == cls).sum()))
    split_of_group = {}
    for cls in sorted({c for c, _ in owner.values()}):
        own = sorted((g for g in owner if owner[g][0] == cls), key=lambda g: path_hash(paths[members[g][0]]))
        total = sum(owner[g][1] for g in own)
        filled = dict.fromkeys(SPLIT_FRACTIONS, 0)
        for g in own:
            split = max(SPLIT_FRACTIONS, key=lambda s: SPLIT_FRACTIONS[s] * total - filled[s])  # first of equals: train
            filled[split] += owner[g][1]
            split_of_group[g] = split
    return np.array([split_of_group[int(g)] for g in groups])


def to_square(rgba: Image.Image, size: int = SIZE, background=BACKGROUND) -> np.ndarray:
    """An RGBA image -> (size, size, 3) uint8: fitted into the square keeping its aspect, composited
    over the background (which also fills the padding). Resizing first is exact up to rounding:
    Pillow resizes RGBA with premultiplied alpha."""
    scale = size / max(rgba.size)
    w, h = (max(1, round(d * scale)) for d in rgba.size)
    small = rgba.resize((w, h), Image.BOX)
    square = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    square.paste(small, ((size - w) // 2, (size - h) // 2))
    page = Image.new("RGBA", (size, size), (*background, 255))
    return np.asarray(Image.alpha_composite(page, square).convert("RGB"))


def is_placeholder(rgba: np.ndarray) -> bool:
    """Inkscape's "Linked Image Not Found" box (H, W, 4): a pure red frame whose upper middle holds a
    red square with a white X and whose lower half holds black text, stretched to any box and often
    drawn over. Test: inside the bounding box of pure red (255, 0, 0) pixels, normalised to 20x20, the
    square's cells are mostly red and the text's cells almost free of red. Flags, signs and red objects
    fail one of the two (measured on the whole package: 17 files match, all placeholders)."""
    red = (rgba[..., 0] == 255) & (rgba[..., 1] == 0) & (rgba[..., 2] == 0) & (rgba[..., 3] > 0)
    if red.mean() < 0.005:
        return False
    rows, cols = np.flatnonzero(red.any(1)), np.flatnonzero(red.any(0))
    h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    if min(h, w) < 48 or not 0.5 <= h / w <= 2:
        return False
    box = Image.fromarray(red[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.uint8) * 255)
    cells = np.asarray(box.resize((20, 20), Image.BOX)) / 255  # (20, 20) share of red per cell
    return cells[2:8, 7:13].mean() >= 0.5 and cells[10:19, 2:18].mean() <= 0.02


@dataclass
class Decoded:
    path: str  # relative to the package root
    image: np.ndarray | None  # (SIZE, SIZE, 3) uint8; None when dropped
    pixels_sha1: str  # of the full-resolution RGBA pixels and size
    dropped: str  # '' or why: 'placeholder', 'blank', 'too large', 'unreadable'
    grey: np.ndarray | None = None  # (DESCRIPTOR, DESCRIPTOR) float16 descriptors of the drawing (near_duplicates)
    edges: np.ndarray | None = None


def decode(file: Path, root: Path) -> Decoded:
    path = file.relative_to(root).as_posix()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # 89-179 Mpx: trusted files, decoded
            with Image.open(file) as im:
                rgba = im.convert("RGBA")
    except Image.DecompressionBombError:  # over 2 x Image.MAX_IMAGE_PIXELS (179 Mpx): 3 files of 231-623 Mpx
        return Decoded(path, None, "", "too large")
    except Exception:  # truncated or not a PNG
        return Decoded(path, None, "", "unreadable")
    digest = hashlib.sha1(f"{rgba.size}".encode() + rgba.tobytes()).hexdigest()
    scale = min(1.0, 512 / max(rgba.size))
    probe = rgba.resize(
        (max(1, round(rgba.width * scale)), max(1, round(rgba.height * scale))), Image.NEAREST
    )  # keeps pure colours
    if is_placeholder(np.asarray(probe)):
        return Decoded(path, None, digest, "placeholder")
    image = to_square(rgba)
    if (image == image[0, 0]).all():
        return Decoded(path, None, digest, "blank")
    grey, edges = drawing_descriptors(to_square(rgba, SOURCE_SIZE))
    return Decoded(
        path, image, digest, "", grey.astype(np.float16), edges.astype(np.float16)
    )  # as the cache keeps them


def class_of(path: str, classes: list[str]) -> int:
    """Index of the class folder holding the path, or -1."""
    for i, c in enumerate(classes):
        if path.startswith(c + "/"):
            return i
    return -1


def drop_duplicates(decoded: list[Decoded], classes: list[str]) -> tuple[list[Decoded], dict]:
    """One copy of each image (same full-resolution pixels, or same SIZE x SIZE result). The copy kept
    is one inside a class folder when there is one, else the first path, so classes keep their images
    and the choice is the same for every dataset built from the package."""
    kept, seen, counts = [], set(), {"full_resolution": 0, "resized": 0}
    order = sorted((d for d in decoded if not d.dropped), key=lambda d: (class_of(d.path, classes) < 0, d.path))
    for d in order:
        small = hashlib.sha1(d.image.tobytes()).hexdigest()
        if d.pixels_sha1 in seen or small in seen:
            counts["full_resolution" if d.pixels_sha1 in seen else "resized"] += 1
            continue
        seen.update((d.pixels_sha1, small))
        kept.append(d)
    return sorted(kept, key=lambda d: d.path), counts


def _cache_file(root: Path, files: list[Path]) -> Path:
    key = hashlib.sha1(repr((CACHE_VERSION, SIZE, BACKGROUND, str(root))).encode())
    for f in files:
        st = f.stat()
        key.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    cache = Path(os.environ.get("MPP_CACHE") or Path.home() / ".cache" / "mpp")
    return cache / f"{CACHE_VERSION}-{key.hexdigest()[:16]}.npz"


_decoded: dict[Path, list[Decoded]] = {}  # per process, by cache file: splits share one read
_grouped: dict[Path, np.ndarray] = {}


def _stack(arrays: list, shape: tuple, dtype) -> np.ndarray:
    return np.stack(arrays).astype(dtype) if arrays else np.zeros((0, *shape), dtype)


def decode_all(root: Path) -> list[Decoded]:
    """Every PNG under root, decoded (the slow part: minutes on 2 cores), cached under $MPP_CACHE
    (default ~/.cache/mpp) keyed by the file list, sizes and mtimes."""
    files = sorted(root.rglob("*.png")) if root.is_dir() else []
    if not files:
        raise missing_package_error(root)
    cache = _cache_file(root, files)
    if cache in _decoded:
        return _decoded[cache]
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            kept = zip(z["images"], z["grey"], z["edges"])
            decoded = []
            for p, h, r in zip(z["paths"].tolist(), z["sha1"].tolist(), z["dropped"].tolist()):
                image, grey, edges = (None, None, None) if r else next(kept)
                decoded.append(Decoded(p, image, h, r, grey, edges))
        _decoded[cache] = decoded
        return decoded
    say = os.environ.get("RANK", "0") == "0"  # one line per launch, not per process
    if say:  # minutes of silence otherwise, the first time only
        print(
            f"clip art: decoding {len(files)} PNGs once into {cache} (a few minutes on 2 cores; later loads read it) "
            "...",
            file=sys.stderr,
            flush=True,
        )
    decoded = [decode(f, root) for f in files]
    kept = [d for d in decoded if not d.dropped]
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(
        tmp,
        images=_stack([d.image for d in kept], (SIZE, SIZE, 3), np.uint8),
        grey=_stack([d.grey for d in kept], (DESCRIPTOR, DESCRIPTOR), np.float16),
        edges=_stack([d.edges for d in kept], (DESCRIPTOR, DESCRIPTOR), np.float16),
        paths=np.array([d.path for d in decoded]),
        sha1=np.array([d.pixels_sha1 for d in decoded]),
        dropped=np.array([d.dropped for d in decoded]),
    )
    os.replace(tmp, cache)  # atomic: concurrent builders write the same content
    if say:
        print(f"clip art: {len(kept)} of {len(files)} PNGs kept, cached", file=sys.stderr, flush=True)
    _decoded[cache] = decoded
    return decoded


def drawing_groups_cached(root: Path, kept: list[Decoded]) -> np.ndarray:
    """near_duplicates.drawing_groups of the kept images (seconds for the whole package), cached beside the
    decoded images under a key of the kept images and GROUPS_VERSION."""
    paths = [d.path for d in kept]
    grey, edges = (np.stack([getattr(d, k) for d in kept]).astype(np.float32) for k in ("grey", "edges"))
    key = hashlib.sha1(
        repr((GROUPS_VERSION, str(root))).encode() + "\0".join(paths).encode() + grey.tobytes() + edges.tobytes()
    )
    cache = (
        Path(os.environ.get("MPP_CACHE") or Path.home() / ".cache" / "mpp")
        / f"clipart-{GROUPS_VERSION}-{key.hexdigest()[:16]}.npy"
    )
    if cache not in _grouped:
        if cache.exists():
            _grouped[cache] = np.load(cache, allow_pickle=False)
        else:
            groups = drawing_groups(grey, edges, paths)
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, groups)
            os.replace(tmp, cache)
            _grouped[cache] = groups
    return _grouped[cache]


def load_clipart(root: Path = OPENCLIPART_DIR, classes: list[str] = CLIPART_CLASSES) -> dict:
    """Every kept image of the package: {'images': (M, SIZE, SIZE, 3) uint8, 'paths': (M,) str sorted,
    'groups': (M,) the index of the first image of the same drawing, 'splits': (M,) its group's split,
    'dropped': {reason: count}}."""
    decoded = decode_all(Path(root))
    kept, duplicates = drop_duplicates(decoded, classes)
    dropped = {r: sum(d.dropped == r for d in decoded) for r in ("placeholder", "blank", "too large", "unreadable")}
    dropped.update({f"duplicate ({k})": v for k, v in duplicates.items()})
    images = np.stack([d.image for d in kept]) if kept else np.zeros((0, SIZE, SIZE, 3), np.uint8)
    paths = [d.path for d in kept]
    groups = drawing_groups_cached(Path(root), kept) if kept else np.zeros(0, np.int64)
    # the standard classes balance the deal whatever `classes` is asked, so every set built from the
    # package (clipart, its halves, colour-mix) sees the same split of each drawing
    return {
        "images": images,
        "paths": np.array(paths),
        "groups": groups,
        "splits": group_splits(paths, groups, CLIPART_CLASSES),
        "dropped": dropped,
    }
