"""What a pretrained ViT has learned, as numpy arrays (ViT paper §4.5, Figures 6 and 7); no plotting.

- patch_embed_components: principal components of the patch-embedding filters (Fig. 7 left)
- pos_embed_similarity: cosine similarity between position embeddings (Fig. 7 centre)
- attention_maps + mean_attention_distance: how far each head looks (Fig. 7 right)
- attention_rollout: where the class token's information comes from (Fig. 6)
- mpp_predictions / prediction_grid: what the MPP head predicts for corrupted patches
Images are (B, 3, H, W), uint8 or float in [0, 1], as MPP takes them.
"""

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mpp.models.masking import MASK_TOKEN, RANDOM_PATCH, UNCHANGED, Corruption, sample_corruption
from mpp.models.model import MPP
from mpp.models.mpp_folder import HEAD_FILE, load_objective  # noqa: F401
from mpp.models.targets import NUM_COLOURS, class_colour, patchify, unpatchify

# outline colour of a corrupted patch, by how it was corrupted
KIND_RGB = {MASK_TOKEN: (1.0, 0.15, 0.15), RANDOM_PATCH: (1.0, 0.85, 0.0), UNCHANGED: (0.0, 0.9, 1.0)}


def load_mpp_model(path: str | Path) -> tuple[MPP, bool]:
    """(MPP in eval mode, head_loaded) from a run folder or its model.safetensors (MPP.from_pretrained's
    loader): without mpp_head.safetensors the [mask] and head stay random (head_loaded False)."""
    return load_objective(MPP, Path(path), {}, head_required=False)


def to_model_input(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] images (B, 3, H, W) -> float normalised with the encoder's mean and std."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    mean = torch.tensor(encoder.pretrained_cfg.get("mean", (0.5, 0.5, 0.5)), device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(encoder.pretrained_cfg.get("std", (0.5, 0.5, 0.5)), device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def patch_embed_components(encoder: nn.Module, n: int = 28) -> np.ndarray:
    """(n, p, p, C) the first n principal components of the patch-embedding filters, each in [0, 1].

    Each of the D filters (C, p, p) is one sample; components are sorted by explained variance.
    Their sign is arbitrary (as in any PCA). n is capped at min(D, C*p*p).
    """
    w = encoder.patch_embed.proj.weight.detach().float().cpu()  # (D, C, p, p)
    D, C, ph, pw = w.shape
    flat = w.reshape(D, -1)
    flat = flat - flat.mean(0, keepdim=True)  # (D, C*p*p) centred over filters
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)  # rows of vh: components, by variance
    n = min(n, vh.shape[0])
    comps = vh[:n].reshape(n, C, ph, pw).permute(0, 2, 3, 1).numpy().astype(np.float64)  # (n, p, p, C)
    lo = comps.min(axis=(1, 2, 3), keepdims=True)
    hi = comps.max(axis=(1, 2, 3), keepdims=True)
    return (comps - lo) / np.maximum(hi - lo, 1e-12)


def pos_embed_similarity(pos_embed, grid: tuple[int, int] | None = None, num_prefix: int = 0) -> np.ndarray:
    """(gh, gw, gh, gw) cosine similarity of each patch's position embedding with every other's.

    pos_embed: an encoder (its pos_embed, prefix rows dropped unless no_embed_class) or an array
    (N, D) / (1, N, D) whose first num_prefix rows are skipped. grid defaults to a square.
    """
    if isinstance(pos_embed, nn.Module):
        enc = pos_embed
        if getattr(enc, "pos_embed", None) is None:
            raise ValueError("the model has no learned absolute position embedding")
        num_prefix = 0 if enc.no_embed_class else enc.num_prefix_tokens
        grid = tuple(enc.patch_embed.grid_size)
        pos_embed = enc.pos_embed
    e = torch.as_tensor(pos_embed).detach().float().cpu().reshape(-1, pos_embed.shape[-1])[num_prefix:]  # (N, D)
    N = e.shape[0]
    gh, gw = grid or (math.isqrt(N), math.isqrt(N))
    if gh * gw != N:
        raise ValueError(f"{N} position embeddings do not fill a {gh}x{gw} grid")
    e = F.normalize(e, dim=-1)
    return (e @ e.T).reshape(gh, gw, gh, gw).numpy().astype(np.float64)


def attention_weights(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, T) softmax(q k^T * scale) of a timm Attention module for its input x (B, T, D).

    timm's fused SDPA never materialises these, so they are recomputed from the qkv projection,
    with q_norm / k_norm applied as timm applies them.
    """
    if not all(hasattr(attn, a) for a in ("qkv", "num_heads", "scale")):
        raise ValueError(f"{type(attn).__name__} is not a timm Attention with a fused qkv projection")
    B, T, _ = x.shape
    head_dim = attn.qkv.out_features // (3 * attn.num_heads)
    qkv = attn.qkv(x).reshape(B, T, 3, attn.num_heads, head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, T, hd)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)  # (B, H, T, T)


@torch.no_grad()
def attention_maps(encoder: nn.Module, images: torch.Tensor) -> np.ndarray:
    """(L, B, H, T, T) attention weights of every block for images (B, 3, H, W), T = prefix + patches."""
    inputs = []
    hooks = [blk.attn.register_forward_pre_hook(lambda _m, args: inputs.append(args[0])) for blk in encoder.blocks]
    was_training = encoder.training
    try:
        device = next(encoder.parameters()).device
        encoder.eval().forward_features(to_model_input(encoder, images.to(device)))
    finally:
        for h in hooks:
            h.remove()
        encoder.train(was_training)
    maps = [attention_weights(blk.attn, x) for blk, x in zip(encoder.blocks, inputs)]
    return torch.stack(maps).cpu().numpy()


def patch_distances(grid: tuple[int, int], patch_size: int) -> np.ndarray:
    """(N, N) Euclidean distance in pixels between patch centres, patches in row-major order."""
    ys, xs = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    centres = np.stack([ys, xs], axis=-1).reshape(-1, 2) * float(patch_size)  # (N, 2)
    return np.linalg.norm(centres[:, None] - centres[None], axis=-1)


def mean_attention_distance(attn, grid: tuple[int, int], patch_size: int, num_prefix: int = 0) -> np.ndarray:
    """attn (..., T, T) -> (...) mean attention distance in pixels (Fig. 7 right, "attention distance").

    Convention: prefix tokens (class, registers) are dropped as queries and as keys; each query's
    weights over the N patch keys are renormalised to sum to 1; a query's distance is the
    attention-weighted mean of the distances between patch centres; the result is the mean over
    the N queries. Leading dimensions (layer, image, head) are kept: average over images yourself.
    """
    a = np.asarray(attn, dtype=np.float64)[..., num_prefix:, num_prefix:]  # (..., N, N)
    a = a / np.maximum(a.sum(-1, keepdims=True), 1e-12)
    per_query = (a * patch_distances(grid, patch_size)).sum(-1)  # (..., N)
    return per_query.mean(-1)


def attention_rollout(
    attn, num_prefix: int, grid: tuple[int, int] | None = None, from_class_token: bool | None = None
) -> np.ndarray:
    """attn (L, B, H, T, T) -> (B, gh, gw) attention rollout (Abnar & Zuidema 2020; ViT Fig. 6).

    Heads are averaged, the identity is added for the residual path, rows are renormalised, and
    the layers are multiplied: R = A_L ... A_1. The map is the class token's row of R over the patch
    columns, or the mean of the patch rows when there is no class token (default: num_prefix > 0;
    pass from_class_token=False for register-only models). Rows of R sum to 1 over all tokens.
    """
    a = np.asarray(attn, dtype=np.float64).mean(axis=2)  # (L, B, T, T)
    T = a.shape[-1]
    a = a + np.eye(T)
    a = a / a.sum(-1, keepdims=True)
    rollout = a[0]
    for layer in a[1:]:
        rollout = layer @ rollout  # (B, T, T)
    if from_class_token is None:
        from_class_token = num_prefix > 0
    if from_class_token:
        m = rollout[:, 0, num_prefix:]  # (B, N)
    else:
        m = rollout[:, num_prefix:, num_prefix:].mean(1)  # (B, N)
    N = m.shape[-1]
    gh, gw = grid or (math.isqrt(N), math.isqrt(N))
    return m.reshape(-1, gh, gw)


def _patch_contents(target: str, values: torch.Tensor, region: tuple[int, int], logits: bool) -> torch.Tensor:
    """Head outputs (logits=True) or targets (B, K, ...) -> what they say the region looks like (B, K, 3, rh, rw)."""
    B, K = values.shape[:2]
    rh, rw = region
    if target == "pixels_l2":
        return values.float().reshape(B, K, 3, rh, rw).clamp(0, 1)
    # (B, K, cells): the most likely class of each cell, or the target's class
    classes = values.reshape(B, K, -1, NUM_COLOURS).argmax(-1) if logits else values.reshape(B, K, -1)
    cells = class_colour(classes)  # (B, K, cells, 3) centres of the 3-bit bins
    side = math.isqrt(cells.shape[2])  # 1 for mean3bit, 4 for mean3bit_4x4
    grid = cells.reshape(B * K, side, side, 3).permute(0, 3, 1, 2)  # (B*K, 3, side, side)
    return F.interpolate(grid, size=(rh, rw), mode="nearest").reshape(B, K, 3, rh, rw)


def _hwc(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).cpu().numpy().astype(np.float64)  # (B, H, W, C)


@torch.no_grad()
def mpp_predictions(model: MPP, images: torch.Tensor, corruption: Corruption | None = None, seed: int = 0) -> dict:
    """What the MPP head predicts for the corrupted patches of images (B, 3, H, W).

    Returns numpy arrays: input (B, H, W, 3) in [0, 1]; kind (B, gh, gw) int, -1 where not
    corrupted, else MASK_TOKEN / RANDOM_PATCH / UNCHANGED; predicted and true (B, H, W, 3): the input
    with the corrupted patches painted over by the prediction / the target (mean3bit: the 3-bit mean
    colour; mean3bit_4x4: the 4x4 grid of 3-bit colours, upsampled; pixels_l2: the pixels); and the
    scalars accuracy and loss. Without a corruption, one is drawn with the model's settings from seed.
    """
    was_training = model.training
    model.eval()
    pixels = model.pixels(images)  # (B, 3, H, W) in [0, 1]
    B, _, H, W = pixels.shape
    (rh, rw), N = model.region, model.num_patches
    grid = (H // rh, W // rw)
    if corruption is None:
        gen = torch.Generator(device=pixels.device).manual_seed(seed)
        corruption = sample_corruption(B, N, model.mask_ratio, model.mask_probs, model.random_from, pixels.device, gen)
    with torch.no_grad():
        out = model(images, corruption)
    model.train(was_training)

    ids = corruption.ids[..., None, None, None].expand(-1, -1, 3, rh, rw)  # (B, K, 3, rh, rw)
    patches = patchify(pixels, model.region)  # (B, N, 3, rh, rw)
    name = model.target.name
    painted = {
        key: unpatchify(patches.scatter(1, ids, _patch_contents(name, v, model.region, logits)), grid)  # (B, 3, H, W)
        for key, v, logits in (("predicted", out.pred, True), ("true", out.target, False))
    }
    kind = torch.full((B, N), -1, dtype=torch.long).scatter(1, corruption.ids.cpu(), corruption.kind.cpu())
    return {
        "input": _hwc(pixels),
        "kind": kind.reshape(B, *grid).numpy(),
        "predicted": _hwc(painted["predicted"]),
        "true": _hwc(painted["true"]),
        "accuracy": float(out.accuracy),
        "loss": float(out.loss),
        "target": name,
        "patch_size": rh,  # the region's height (square regions for every supported model)
    }


def outline_patches(image: np.ndarray, kind: np.ndarray, patch: int) -> np.ndarray:
    """A copy of image (H, W, 3) with a 1-pixel frame, coloured by KIND_RGB, around each corrupted patch."""
    out = image.copy()
    for (i, j), k in np.ndenumerate(kind):
        if k < 0:
            continue
        y, x = i * patch, j * patch
        c = KIND_RGB[int(k)]
        out[y, x : x + patch] = out[y + patch - 1, x : x + patch] = c
        out[y : y + patch, x] = out[y : y + patch, x + patch - 1] = c
    return out


def prediction_grid(
    model: MPP, images_uint8: torch.Tensor, corruption: Corruption | None = None, min_side: int = 112, seed: int = 0
) -> np.ndarray:
    """(H, W, 3) uint8 picture of MPP predictions, one row per image, for TensorBoard.

    Columns: the input with its corrupted patches framed (red: [mask] token, yellow: replaced by a
    random patch, cyan: left unchanged), the predictions painted into those patches, the true
    targets painted into them. Images are enlarged (nearest) so each panel is at least min_side
    pixels high. Log it with SummaryWriter.add_image(tag, grid, step, dataformats="HWC").
    """
    pred = mpp_predictions(model, images_uint8, corruption, seed)
    H = pred["input"].shape[1]
    s = max(1, math.ceil(min_side / H))
    inputs, predicted, true = (
        pred[k].repeat(s, axis=1).repeat(s, axis=2) for k in ("input", "predicted", "true")
    )  # (B, sH, sW, 3)
    framed = np.stack([outline_patches(im, k, pred["patch_size"] * s) for im, k in zip(inputs, pred["kind"])])
    sep = np.ones_like(framed[:, :, :2])  # white columns between panels
    row = np.concatenate([framed, sep, predicted, sep, true], axis=2)
    gap = np.ones_like(row[:, :2])  # white lines between images
    grid = np.concatenate([np.concatenate([r, g]) for r, g in zip(row, gap)])[:-2]
    return (grid * 255).round().clip(0, 255).astype(np.uint8)
