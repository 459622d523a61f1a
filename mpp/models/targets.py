"""What is predicted for each corrupted patch (ViT paper, Appendix B.1.2).

Targets are computed from the un-normalised [0, 1] pixels of exactly the image the model sees, over
the image region each token stands for: region = image size / the patch embedding's token grid
(for a plain ViT the patch; for a hybrid the block of pixels behind one cell of the CNN feature map).
- mean3bit: each channel's mean over the patch, quantised to 3 bits: one of 8**3 = 512 classes.
- mean3bit_4x4: the patch average-pooled to 4x4, each cell quantised the same way: 16 x 512 classes.
- pixels_l2: the patch's pixels, regressed with a mean squared error.
Grey images are fed as RGB with r = g = b, so only the 8 grey classes of the 512 occur.
"""

import torch
import torch.nn.functional as F

LEVELS = 8  # 3 bits per channel
NUM_COLOURS = LEVELS**3  # 512


def as_region(region: int | tuple[int, int]) -> tuple[int, int]:
    """A region size (rows, cols) in pixels; an int is a square."""
    return (region, region) if isinstance(region, int) else (int(region[0]), int(region[1]))


def patchify(pixels: torch.Tensor, region: int | tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C, rh, rw), regions in timm's row-major token order."""
    B, C, H, W = pixels.shape
    rh, rw = as_region(region)
    gh, gw = H // rh, W // rw
    x = pixels.reshape(B, C, gh, rh, gw, rw)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C, rh, rw)


def unpatchify(patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, C, rh, rw) -> (B, C, gh*rh, gw*rw): the inverse of patchify."""
    B, N, C, rh, rw = patches.shape
    gh, gw = grid
    return patches.reshape(B, gh, gw, C, rh, rw).permute(0, 3, 1, 4, 2, 5).reshape(B, C, gh * rh, gw * rw)


def colour_class(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3) colours in [0, 1] -> (...) int64 class r*64 + g*8 + b of the 3-bit colour."""
    q = (rgb * LEVELS).floor().clamp(0, LEVELS - 1).long()  # 1.0 falls in the top level
    return q[..., 0] * LEVELS**2 + q[..., 1] * LEVELS + q[..., 2]


def class_colour(classes: torch.Tensor) -> torch.Tensor:
    """Inverse of colour_class: (...) class ids -> (..., 3) centre of each 3-bit colour bin in [0, 1]."""
    r, g, b = classes // LEVELS**2, (classes // LEVELS) % LEVELS, classes % LEVELS
    return (torch.stack([r, g, b], dim=-1).float() + 0.5) / LEVELS


class Mean3Bit:
    """One 512-way class per patch: its mean colour in 3 bits per channel."""

    name = "mean3bit"
    cells = 1

    def num_outputs(self, region: int | tuple[int, int], channels: int = 3) -> int:
        return self.cells * NUM_COLOURS

    def compute(self, pixels: torch.Tensor, region: int | tuple[int, int]) -> torch.Tensor:
        """pixels (B, 3, H, W) in [0, 1] -> (B, N, cells) int64, one row per token region."""
        patches = patchify(pixels, region)  # (B, N, 3, rh, rw)
        cells = self._cell_means(patches)  # (B, N, cells, 3)
        return colour_class(cells)

    def _cell_means(self, patches: torch.Tensor) -> torch.Tensor:
        return patches.mean(dim=(-2, -1)).unsqueeze(2)  # (B, N, 1, 3)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pred (B, K, cells*512), target (B, K, cells) -> (cross-entropy, accuracy), means over all cells."""
        logits = pred.float().reshape(-1, NUM_COLOURS)  # (B*K*cells, 512)
        target = target.reshape(-1)
        loss = F.cross_entropy(logits, target)
        accuracy = (logits.argmax(-1) == target).float().mean()
        return loss, accuracy


class Mean3Bit4x4(Mean3Bit):
    """The patch average-pooled to 4x4: 16 predictions of 512 classes."""

    name = "mean3bit_4x4"
    cells = 16

    def _cell_means(self, patches: torch.Tensor) -> torch.Tensor:
        B, N, C, rh, rw = patches.shape
        # adaptive pooling also covers region sizes that 4 does not divide (e.g. 7)
        pooled = F.adaptive_avg_pool2d(patches.reshape(B * N, C, rh, rw), 4)  # (B*N, C, 4, 4)
        return pooled.reshape(B, N, C, 16).transpose(-1, -2)  # (B, N, 16, 3)


class PixelsL2:
    """L2 regression of the region's pixels (flattened channel-first, C*rh*rw values)."""

    name = "pixels_l2"

    def num_outputs(self, region: int | tuple[int, int], channels: int = 3) -> int:
        rh, rw = as_region(region)
        return channels * rh * rw

    def compute(self, pixels: torch.Tensor, region: int | tuple[int, int]) -> torch.Tensor:
        """pixels (B, C, H, W) in [0, 1] -> (B, N, C*rh*rw) float."""
        return patchify(pixels, region).flatten(2)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = F.mse_loss(pred.float(), target.float())
        # "accuracy" for a regression: share of predicted pixels within half a 3-bit level of the truth
        accuracy = ((pred.float() - target.float()).abs() < 0.5 / LEVELS).float().mean()
        return loss, accuracy


TARGETS = {t.name: t for t in (Mean3Bit(), Mean3Bit4x4(), PixelsL2())}


def get_target(name: str):
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; allowed: {', '.join(TARGETS)}")
    return TARGETS[name]
