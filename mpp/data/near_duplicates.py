"""Groups of images that are the same drawing, so that a split never separates them.

Clip-art collections hold the same drawing many times: in black and white and in colour, recoloured,
mirrored, rescaled, under a slightly different file name, or as the same file in two folders. A
split by file would put one copy in training and another in test, and the test would reward memory.
Two images are linked when any of these holds, and a group is everything linked, directly or not:

- their drawings look alike: on the drawing's tight box (background cropped away, then resized to
  DESCRIPTOR x DESCRIPTOR so that scale does not matter; taken from a SOURCE_SIZE rendering, so that a
  copy drawn small on a large page keeps its detail), the grey levels or the edge strengths
  correlate above a threshold, in either left-right orientation (mirrored copies match). Edges
  survive recolouring and the black-and-white version of a coloured drawing; grey levels catch
  rescaled and re-exported copies whose outlines were redrawn;
- their file-name stems match inside one folder (`pear_simple_bw` ~ `pear_simple`,
  `bee1_mimooh_01` ~ `bee2_mimooh_01`): lower case, digits and one-letter tokens dropped, words that
  name a colour variant dropped, each token cut to its first STEM_CHARS letters (spelling variants);
- they have the same file name in any two folders.
"""

import re
from pathlib import PurePosixPath

import numpy as np
from PIL import Image

DESCRIPTOR = 32  # side of the grey and edge descriptors
SOURCE_SIZE = 256  # the drawings are described from this rendering, not from the small training images
# Thresholds on the descriptors' correlation, set by looking at the pairs of the openclipart package
# in bands of 0.05 (nearly all pairs above them are the same drawing; below, different drawings of
# one template, such as two warning signs, start to dominate).
GREY_THRESHOLD = 0.90
EDGE_THRESHOLD = 0.86
INK_TOLERANCE = 10  # levels below the background that count as drawn
STEM_CHARS = 5
VARIANT_WORDS = {
    "bw",
    "colour",
    "color",
    "colored",
    "coloured",
    "colors",
    "colours",
    "grey",
    "gray",
    "greyscale",
    "grayscale",
    "outline",
    "outlined",
    "lineart",
    "black",
    "white",
    "blackwhite",
    "mono",
    "monochrome",
    "version",
}


def drawing_box(image: np.ndarray, background=(255, 255, 255)) -> np.ndarray:
    """(H, W, 3) uint8 -> the smallest box holding every pixel that differs from the background (the whole
    image when nothing does)."""
    ink = (np.abs(image.astype(np.int16) - np.asarray(background, np.int16)) > INK_TOLERANCE).any(-1)  # (H, W)
    if not ink.any():
        return image
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    return image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def drawing_descriptors(page: np.ndarray, background=(255, 255, 255)) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 page -> grey and edge descriptors, each (DESCRIPTOR, DESCRIPTOR) float32, of the
    drawing's tight box resized to a square. Edges are central differences, so that the edges of a
    mirrored drawing are the mirrored edges."""
    box = Image.fromarray(drawing_box(page, background)).convert("L")
    grey = np.asarray(box.resize((DESCRIPTOR, DESCRIPTOR), Image.BOX), np.float32)
    fine = np.asarray(box.resize((2 * DESCRIPTOR, 2 * DESCRIPTOR), Image.BILINEAR), np.float32)
    dy, dx = np.gradient(fine)
    edges = np.asarray(Image.fromarray(np.abs(dx) + np.abs(dy)).resize((DESCRIPTOR, DESCRIPTOR), Image.BOX), np.float32)
    return grey, edges


def _standardised(x: np.ndarray) -> np.ndarray:
    """(M, D, D) -> (M, D*D) with zero mean and unit norm per row: dot products are correlations."""
    flat = x.reshape(len(x), -1).astype(np.float32)
    flat = flat - flat.mean(1, keepdims=True)
    return flat / (np.linalg.norm(flat, axis=1, keepdims=True) + 1e-6)


def similar_pairs(x: np.ndarray, threshold: float, chunk: int = 1024) -> np.ndarray:
    """(P, 2) index pairs i < j whose descriptors (M, D, D) correlate above `threshold`, the second one
    taken as it is or mirrored left-right."""
    a, mirrored = _standardised(x), _standardised(x[:, :, ::-1])
    pairs = []
    for start in range(0, len(a), chunk):
        block = a[start : start + chunk]  # (c, D*D)
        corr = np.maximum(block @ a.T, block @ mirrored.T)  # (c, M)
        i, j = np.nonzero(corr > threshold)
        i += start
        pairs.append(np.stack([i, j], 1)[i < j])
    return np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)


def name_stem(path: str) -> str:
    """The file name without what distinguishes variants of one drawing: 'food/fruit/pear_simple_bw.png'
    -> 'pear_simpl', 'animals/bugs/bee2_mimooh_01.png' -> 'bee_mimoo'."""
    tokens = re.split(r"[^a-z0-9]+", PurePosixPath(path).stem.lower())
    tokens = [t.rstrip("0123456789").lstrip("0123456789") for t in tokens]
    return "_".join(t[:STEM_CHARS] for t in tokens if len(t) > 1 and t not in VARIANT_WORDS)


def name_pairs(paths: list[str]) -> np.ndarray:
    """(P, 2) index pairs with the same stem in the same folder, or the same file name in any folders."""
    keys: dict[tuple, list[int]] = {}
    for i, p in enumerate(paths):
        posix = PurePosixPath(p)
        keys.setdefault(("stem", str(posix.parent), name_stem(p)), []).append(i)
        keys.setdefault(("name", posix.name.lower()), []).append(i)
    pairs = [(members[0], m) for key, members in keys.items() for m in members[1:] if key[0] == "name" or key[2]]
    return np.asarray(pairs, np.int64).reshape(-1, 2)


def connected_groups(count: int, pairs: np.ndarray) -> np.ndarray:
    """(count,) group id per item: the connected components of the links (union-find), each component
    numbered by its smallest member, so ids do not depend on the order of the links."""
    parent = np.arange(count)

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        ri, rj = root(int(i)), root(int(j))
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)  # the smaller index stays the root
    return np.array([root(i) for i in range(count)])


def drawing_groups(grey: np.ndarray, edges: np.ndarray, paths: list[str]) -> np.ndarray:
    """(M,) group id per image (the index of the group's first image): the same drawing by look (grey and
    edge descriptors, each (M, DESCRIPTOR, DESCRIPTOR)) or by name."""
    pairs = np.concatenate(
        [similar_pairs(grey, GREY_THRESHOLD), similar_pairs(edges, EDGE_THRESHOLD), name_pairs(paths)]
    )
    return connected_groups(len(paths), pairs)
