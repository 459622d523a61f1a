"""Which patch tokens are corrupted, and how (ViT paper, Appendix B.1.2).

Exactly K = round(mask_ratio * N) of the N patch tokens of every image are corrupted. Each corrupted
token independently becomes the learnable [mask] embedding (p_mask), the embedding of a random
other patch (p_random), or stays as it is (p_keep): BERT's 80/10/10 by default. All shapes are
static ((B, K) index tensors, no boolean indexing), so the step compiles without graph breaks and
runs on XLA.

The same Corruption applies in embedding space (apply_corruption on patch embeddings, the paper's)
or in pixel space (apply_pixel_corruption on the normalised image, before the patch embedding).
"""

from dataclasses import dataclass

import torch

from mpp.models.targets import patchify, unpatchify

# Codes in Corruption.kind.
MASK_TOKEN, RANDOM_PATCH, UNCHANGED = 0, 1, 2
# Where a RANDOM_PATCH replacement comes from: any other patch of the batch, or another patch of the same image.
RANDOM_FROM = ("batch", "image")


@dataclass
class Corruption:
    ids: torch.Tensor  # (B, K) int64: positions of the corrupted patches, distinct within a row
    kind: torch.Tensor  # (B, K) int64: MASK_TOKEN, RANDOM_PATCH or UNCHANGED
    source: torch.Tensor  # (B, K) int64: flat index into the (B*N) patches that replaces it (RANDOM_PATCH only)


def num_corrupted(num_patches: int, mask_ratio: float) -> int:
    """round(mask_ratio * N), at least one patch and at most all of them."""
    return min(num_patches, max(1, round(mask_ratio * num_patches)))


def sample_corruption(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    probs: tuple[float, float, float],
    random_from: str = "batch",
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Corruption:
    """Draw which patches to corrupt and how. probs = (p_mask, p_random, p_keep), summing to 1;
    random_from: 'batch' or 'image' (RANDOM_FROM)."""
    if random_from not in RANDOM_FROM:
        raise ValueError(f"random_from must be 'batch' or 'image', got {random_from!r}")
    B, N = batch_size, num_patches
    K = num_corrupted(N, mask_ratio)
    # generator=None spelled out fails under torch.compile once the batch dimension is dynamic (a second batch size)
    draw = {"device": device} if generator is None else {"device": device, "generator": generator}
    # a uniformly random K-subset per row: the first K of a random permutation
    noise = torch.rand(B, N, **draw)
    ids = noise.argsort(dim=1)[:, :K]  # (B, K)

    u = torch.rand(B, K, **draw)
    p_mask, p_random = probs[0], probs[1]
    kind = (u >= p_mask).long() + (u >= p_mask + p_random).long()  # (B, K) in {0, 1, 2}

    # A random *other* patch: draw from the pool without the token itself, then shift past it.
    row_offset = torch.arange(B, device=device).unsqueeze(1) * N  # (B, 1)
    if random_from == "image":
        r = torch.randint(0, max(N - 1, 1), (B, K), **draw)
        source = r + (r >= ids).long() + row_offset  # (B, K)
    else:
        self_flat = ids + row_offset  # (B, K)
        r = torch.randint(0, max(B * N - 1, 1), (B, K), **draw)
        source = r + (r >= self_flat).long()  # (B, K)
    return Corruption(ids=ids, kind=kind, source=source)


def apply_corruption(tokens: torch.Tensor, corruption: Corruption, mask_token: torch.Tensor) -> torch.Tensor:
    """tokens (B, N, D) patch embeddings before position embeddings; returns a corrupted copy."""
    B, N, D = tokens.shape
    ids = corruption.ids.unsqueeze(-1).expand(-1, -1, D)  # (B, K, D)
    original = torch.gather(tokens, 1, ids)  # (B, K, D)
    # replacements come from the uncorrupted embeddings of other patches
    replacement = tokens.reshape(B * N, D)[corruption.source.reshape(-1)].view_as(original)  # (B, K, D)
    kind = corruption.kind.unsqueeze(-1)  # (B, K, 1)
    new = torch.where(
        kind == MASK_TOKEN,
        mask_token.to(tokens.dtype).expand_as(original),
        torch.where(kind == RANDOM_PATCH, replacement, original),
    )
    return tokens.scatter(1, ids, new)  # (B, N, D)


def apply_pixel_corruption(
    images: torch.Tensor, corruption: Corruption, mask_colour: torch.Tensor, region: tuple[int, int]
) -> torch.Tensor:
    """images (B, C, H, W) normalised; returns a copy whose corrupted regions hold the [mask] colour
    (C,) everywhere, the pixels of the source region, or their own pixels (same rules as apply_corruption)."""
    B, C, H, W = images.shape
    rh, rw = region
    regions = patchify(images, region)  # (B, N, C, rh, rw)
    fill = mask_colour.view(C, 1, 1).expand(C, rh, rw).reshape(-1)  # (C*rh*rw,) one colour over the region
    out = apply_corruption(regions.flatten(2), corruption, fill)  # (B, N, C*rh*rw)
    return unpatchify(out.view_as(regions), (H // rh, W // rw))  # (B, C, H, W)


def corrupted_mask(corruption: Corruption, num_patches: int) -> torch.Tensor:
    """(B, N) bool, True where a patch was corrupted (for plots and tests; the step uses ids)."""
    B = corruption.ids.shape[0]
    mask = torch.zeros(B, num_patches, dtype=torch.bool, device=corruption.ids.device)
    return mask.scatter(1, corruption.ids, True)
