import math

import pytest
import torch
import torch.nn.functional as F

from mpp.models.targets import Mean3Bit, Mean3Bit4x4, PixelsL2, class_colour, colour_class, patchify


def solid(colour, size=8):
    return torch.tensor(colour, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, size, size).clone()


@pytest.mark.parametrize(
    "colour,cls",
    [
        ((0, 0, 0), 0),
        ((1, 1, 1), 511),
        ((1, 0, 0), 7 * 64),
        ((0, 1, 0), 7 * 8),
        ((0, 0, 1), 7),
        ((0.5, 0.25, 0.0), 4 * 64 + 2 * 8 + 0),  # 0.5*8 = 4, 0.25*8 = 2
        ((0.124, 0.126, 0.999), 0 * 64 + 1 * 8 + 7),  # bin edges: [0, 1/8) is level 0
    ],
)
def test_mean3bit_solid_colours(colour, cls):
    target = Mean3Bit().compute(solid(colour), 8)  # one 8x8 patch
    assert target.shape == (1, 1, 1)
    assert target.item() == cls


def test_mean3bit_uses_the_patch_mean():
    img = torch.zeros(1, 3, 4, 4)
    img[:, 0, :2] = 1.0  # red channel: half the patch at 1 -> mean 0.5 -> level 4
    assert Mean3Bit().compute(img, 4).item() == 4 * 64


def test_grey_images_use_8_classes():
    grey = torch.rand(16, 1, 28, 28).expand(-1, 3, -1, -1)
    classes = Mean3Bit().compute(grey, 4).unique()
    assert set(classes.tolist()) <= {level * 73 for level in range(8)}  # r = g = b: 64l + 8l + l


def test_4x4_checkerboard():
    # an 8x8 patch of 2x2 black/white squares: every 4x4 cell is solid, classes alternate 0 / 511
    board = ((torch.arange(8).view(8, 1) // 2 + torch.arange(8).view(1, 8) // 2) % 2).float()
    img = board.expand(1, 3, 8, 8)
    target = Mean3Bit4x4().compute(img, 8)
    assert target.shape == (1, 1, 16)
    expected = torch.tensor([[0, 511, 0, 511], [511, 0, 511, 0], [0, 511, 0, 511], [511, 0, 511, 0]]).flatten()
    assert torch.equal(target[0, 0], expected)
    # a 1-pixel checkerboard averages to grey 0.5 in every cell: level 4 on each channel
    fine = ((torch.arange(8).view(8, 1) + torch.arange(8).view(1, 8)) % 2).float().expand(1, 3, 8, 8)
    assert (Mean3Bit4x4().compute(fine, 8) == 4 * 73).all()


def test_4x4_with_patch_not_divisible_by_4():
    target = Mean3Bit4x4().compute(solid((1, 0, 1), 14), 7)  # 4 patches of 7x7
    assert target.shape == (1, 4, 16) and (target == 7 * 64 + 7).all()


def test_patchify_matches_unfold():
    img = torch.rand(2, 3, 12, 8)
    ours = patchify(img, 4).flatten(2)  # (B, N, C*p*p)
    ref = F.unfold(img, kernel_size=4, stride=4).transpose(1, 2)  # conv / timm patch order
    assert torch.equal(ours, ref)


def test_pixel_targets_and_loss():
    img = torch.rand(2, 3, 8, 8)
    t = PixelsL2().compute(img, 4)
    assert t.shape == (2, 4, 48)
    assert torch.equal(t[1, 3], img[1, :, 4:8, 4:8].flatten())  # bottom-right patch, channel first
    loss, _ = PixelsL2().loss(t + 0.1, t)
    assert math.isclose(loss.item(), 0.01, rel_tol=1e-4)


def test_class_colour_inverts_colour_class():
    classes = torch.arange(512)
    assert torch.equal(colour_class(class_colour(classes)), classes)
