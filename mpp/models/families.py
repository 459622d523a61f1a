"""Which timm models MPP pretrains, and how each family runs with a corruption between its patch
embedding and its position embeddings.

Supported: timm's VisionTransformer (class token, register tokens, no class token / average pool),
VisionTransformerDistilled (DeiT, class + distillation token), hybrid ViTs (a ResNet stem feeding
the transformer through HybridEmbed, e.g. vit_small_r26_s32_224) and Eva (EVA-02, vit_*_rope_*,
vit_*_dinov3: RoPE is computed in Eva._pos_embed and handed to every block).
"""

import sys
from collections.abc import Callable

import timm
import torch
import torch.nn as nn
from timm.layers import HybridEmbed, PatchEmbed
from timm.models import VisionTransformer
from timm.models._manipulate import checkpoint, checkpoint_seq
from timm.models._registry import model_entrypoint
from timm.models.eva import Eva

SUPPORTED = (
    "VisionTransformer (class/register tokens or none), DeiT distilled, hybrid ViTs (vit_*_r*_*), "
    "Eva (eva02_*, vit_*_rope_*, vit_*_dinov3)"
)


def create_encoder(model_name: str, img_size: int | None = None, patch_size: int | None = None, **kwargs) -> nn.Module:
    """A timm ViT of a supported family without classifier (num_classes=0 unless given), randomly initialised.

    patch_size is timm's own argument: the patch in pixels for plain ViTs and Eva, the patch on the
    CNN feature map for hybrids (usually 1). None: the model's own default.
    """
    if not timm.is_model(model_name):
        raise ValueError(f"unknown timm model {model_name!r}; supported families: {SUPPORTED}")
    sizes = {k: v for k, v in (("img_size", img_size), ("patch_size", patch_size)) if v is not None}
    try:
        encoder = timm.create_model(model_name, pretrained=False, **{"num_classes": 0, **sizes, **kwargs})
    except TypeError:  # architectures without img_size / patch_size arguments are not ViTs
        encoder = None
    except AssertionError as e:  # e.g. a hybrid's feature map that the patch size does not divide
        hint = (
            " (for a hybrid, --patch-size is the patch on the CNN feature map, usually 1)"
            if is_hybrid_name(model_name)
            else ""
        )
        raise ValueError(
            f"timm cannot build {model_name!r} at img_size {img_size}, patch_size {patch_size}: "
            f"{e or 'assertion failed'}{hint}"
        ) from None
    if not isinstance(encoder, (VisionTransformer, Eva)):
        raise ValueError(
            f"{model_name!r} is not a timm VisionTransformer or Eva (try vit_tiny_patch16_224, eva02_tiny_patch14_224, "
            "...)"
        )
    return encoder


def is_hybrid_name(model_name: str) -> bool:
    return model_entrypoint(model_name).__module__.endswith("vision_transformer_hybrid")


def token_grid(encoder: nn.Module) -> tuple[int, int]:
    """(rows, cols) of patch tokens: the patch embedding's output grid (a HybridEmbed measures its
    CNN's feature map when built). Never patch_embed.patch_size: a HybridEmbed reports (1, 1)."""
    pe = encoder.patch_embed
    gh, gw = (int(g) for g in pe.grid_size)
    if gh * gw != pe.num_patches:
        raise ValueError(f"{type(pe).__name__}: grid {gh}x{gw} does not match its {pe.num_patches} tokens")
    return gh, gw


def token_region(encoder: nn.Module) -> tuple[int, int]:
    """(rows, cols) of image pixels each token stands for: image size / token grid."""
    H, W = (int(s) for s in encoder.patch_embed.img_size)
    gh, gw = token_grid(encoder)
    if H % gh or W % gw:
        raise ValueError(f"a {gh}x{gw} token grid does not tile a {H}x{W} image into equal regions")
    return H // gh, W // gw


def sees_only_its_region(encoder: nn.Module) -> bool:
    """True for a plain patch embedding (one conv, kernel = stride = region): a token's embedding
    depends on its own pixels only. A CNN stem's receptive field crosses region borders."""
    pe = encoder.patch_embed
    if isinstance(pe, HybridEmbed) or not isinstance(pe, PatchEmbed):
        return False
    proj = pe.proj
    return (
        isinstance(proj, nn.Conv2d)
        and tuple(proj.kernel_size) == tuple(proj.stride) == token_region(encoder)
        and tuple(proj.padding) == (0, 0)
    )


def resolve_corrupt_at(encoder: nn.Module, corrupt_at: str) -> str:
    """'auto' -> 'embedding' (the paper's) where a token sees only its own region, else 'pixels':
    with a CNN stem, embedding-space corruption would leave the hidden region's colour readable from
    its neighbours' embeddings."""
    if corrupt_at not in ("auto", "embedding", "pixels"):
        raise ValueError(f"corrupt_at must be auto, embedding or pixels, got {corrupt_at!r}")
    if corrupt_at == "auto":
        return "embedding" if sees_only_its_region(encoder) else "pixels"
    return corrupt_at


def run_encoder(
    encoder: nn.Module, x: torch.Tensor, corrupt: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """timm's forward_features with corrupt() applied to the patch embeddings (B, N, D) before
    position embeddings (absolute and RoPE) and class/register tokens. x (B, 3, H, W) -> (B, prefix + N, D)."""
    x = encoder.patch_embed(x)  # (B, N, D), or (B, gh, gw, D) with dynamic_img_size
    if corrupt is not None:
        shape = x.shape
        x = corrupt(x.reshape(shape[0], -1, shape[-1])).view(shape)
    if isinstance(encoder, Eva):
        return _eva_blocks(encoder, x)
    x = encoder._pos_embed(x)  # (B, prefix + N, D): class/register/distillation tokens, position embeddings
    x = encoder.patch_drop(x)
    x = encoder.norm_pre(x)
    if encoder.grad_checkpointing and not torch.jit.is_scripting():
        x = checkpoint_seq(encoder.blocks, x)
    else:
        x = encoder.blocks(x)
    return encoder.norm(x)


def _eva_blocks(enc: Eva, x: torch.Tensor) -> torch.Tensor:
    """The rest of Eva.forward_features: _pos_embed also returns the RoPE table the blocks take."""
    x, rope = enc._pos_embed(x)  # (B, prefix + N, D), RoPE for the patch tokens (or None)
    x = enc.norm_pre(x)
    mixed = getattr(enc, "rope_mixed", False) and rope is not None  # one table per block
    for i, blk in enumerate(enc.blocks):
        r = rope[i] if mixed else rope
        if enc.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint(blk, x, rope=r)
        else:
            x = blk(x, rope=r)
    return enc.norm(x)


def checkpoint_filter(model: nn.Module) -> Callable:
    """timm's checkpoint_filter_fn of the model's own family (position-embedding resampling, key renames)."""
    name = model.pretrained_cfg.get("architecture") if getattr(model, "pretrained_cfg", None) else None
    module = (
        sys.modules[model_entrypoint(name).__module__]
        if name and timm.is_model(name)
        else sys.modules[type(model).__module__]
    )
    fn = getattr(module, "checkpoint_filter_fn", None)
    if fn is None:
        from timm.models.vision_transformer import checkpoint_filter_fn as fn
    return fn
