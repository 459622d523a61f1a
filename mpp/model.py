"""The MPP model: a timm VisionTransformer encoder, one learnable [mask] embedding, a linear head."""
from dataclasses import dataclass

import timm
import torch
import torch.nn as nn
from timm.models import VisionTransformer
from timm.models._manipulate import checkpoint_seq

from .masking import Corruption, apply_corruption, sample_corruption
from .targets import get_target


def create_encoder(model_name: str, img_size: int, patch_size: int, **kwargs) -> VisionTransformer:
    """A timm VisionTransformer without classifier (num_classes=0), randomly initialised."""
    if not timm.is_model(model_name):
        raise ValueError(f"unknown timm model {model_name!r}; any timm VisionTransformer is allowed, e.g. vit_tiny_patch16_224")
    try:
        encoder = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=img_size, patch_size=patch_size, **kwargs)
    except TypeError:  # architectures without img_size / patch_size arguments are not ViTs
        encoder = None
    if not isinstance(encoder, VisionTransformer):
        raise ValueError(f"{model_name!r} is not a timm VisionTransformer (try vit_tiny_patch16_224, vit_small_patch16_224, ...)")
    return encoder


@dataclass
class MPPOutput:
    loss: torch.Tensor  # () mean over every corrupted patch (and every 4x4 cell)
    accuracy: torch.Tensor  # () share of corrupted patches whose class is predicted right
    pred: torch.Tensor  # (B, K, out) head outputs at the corrupted positions
    target: torch.Tensor  # (B, K, ...) targets at the corrupted positions
    corruption: Corruption


class MPPModel(nn.Module):
    def __init__(
        self,
        encoder: VisionTransformer,
        target: str = "mean3bit",
        mask_ratio: float = 0.5,
        mask_probs: tuple[float, float, float] = (0.8, 0.1, 0.1),
        random_from_same_image: bool = False,
    ):
        super().__init__()
        self.encoder = encoder
        self.target = get_target(target)
        self.mask_ratio = mask_ratio
        self.mask_probs = tuple(mask_probs)
        self.random_from_same_image = random_from_same_image
        self.patch_size = encoder.patch_embed.patch_size[0]
        dim = encoder.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        # Models that pool with fc_norm have no final norm on the tokens: give the head one.
        head_norm = nn.LayerNorm(dim) if isinstance(encoder.norm, nn.Identity) else nn.Identity()
        self.head = nn.Sequential(head_norm, nn.Linear(dim, self.target.num_outputs(self.patch_size)))
        # small initial logits: the loss starts at ln(512) for mean3bit, as for a uniform guess
        nn.init.trunc_normal_(self.head[-1].weight, std=0.02)
        nn.init.zeros_(self.head[-1].bias)
        # The pooling/classifier parts are not used by MPP: freeze them so DDP sees no unused parameters.
        for name in ("fc_norm", "attn_pool", "head"):
            part = getattr(encoder, name, None)
            if isinstance(part, nn.Module):
                part.requires_grad_(False)
        mean = torch.tensor(encoder.pretrained_cfg.get("mean", (0.5, 0.5, 0.5))).view(1, -1, 1, 1)
        std = torch.tensor(encoder.pretrained_cfg.get("std", (0.5, 0.5, 0.5))).view(1, -1, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    def no_weight_decay(self) -> set[str]:
        """Embeddings keep their size: the encoder's (pos_embed, cls_token, reg_token, ...) and the
        mask token. timm's create_optimizer_v2 reads this only from the model it is given."""
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()} | {"mask_token"}

    @property
    def num_patches(self) -> int:
        return self.encoder.patch_embed.num_patches

    def encode(self, x: torch.Tensor, corruption: Corruption | None = None) -> torch.Tensor:
        """timm's forward_features with corruption between patch projection and position embedding.

        x (B, 3, H, W) normalised -> (B, prefix + N, D)
        """
        enc = self.encoder
        x = enc.patch_embed(x)  # (B, N, D), or (B, gh, gw, D) with dynamic_img_size
        if corruption is not None:
            shape = x.shape
            x = apply_corruption(x.reshape(shape[0], -1, shape[-1]), corruption, self.mask_token).view(shape)
        x = enc._pos_embed(x)  # (B, prefix + N, D): class/register tokens, position embeddings
        x = enc.patch_drop(x)
        x = enc.norm_pre(x)
        if enc.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(enc.blocks, x)
        else:
            x = enc.blocks(x)
        return enc.norm(x)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 in [0, 255] or float in [0, 1] -> float in [0, 1]."""
        if images.dtype == torch.uint8:
            return images.float().div_(255)
        return images.float()

    def forward(self, images: torch.Tensor, corruption: Corruption | None = None) -> MPPOutput:
        """images (B, 3, H, W), uint8 or [0, 1] float. Draws a corruption unless one is given."""
        pixels = self.normalise(images)  # (B, 3, H, W) in [0, 1]
        B = pixels.shape[0]
        if corruption is None:
            corruption = sample_corruption(
                B, self.num_patches, self.mask_ratio, self.mask_probs, self.random_from_same_image, pixels.device
            )
        target = self.target.compute(pixels, self.patch_size)  # (B, N, ...)
        tokens = self.encode((pixels - self.pixel_mean) / self.pixel_std, corruption)
        tokens = tokens[:, self.encoder.num_prefix_tokens :]  # (B, N, D)
        ids = corruption.ids  # (B, K)
        picked = torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))  # (B, K, D)
        pred = self.head(picked)  # (B, K, out)
        target = torch.gather(target, 1, ids.view(B, -1, *[1] * (target.dim() - 2)).expand(-1, -1, *target.shape[2:]))
        loss, accuracy = self.target.loss(pred, target)
        return MPPOutput(loss=loss, accuracy=accuracy, pred=pred, target=target, corruption=corruption)
