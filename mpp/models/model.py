"""The MPP model: a timm ViT encoder (families.py), one learnable [mask] embedding or [mask] colour,
a linear head."""
from dataclasses import dataclass

import torch
import torch.nn as nn

from mpp.models.families import SUPPORTED, create_encoder, resolve_corrupt_at, run_encoder, token_grid, token_region  # noqa: F401
from mpp.models.masking import Corruption, apply_corruption, apply_pixel_corruption, sample_corruption
from mpp.models.targets import get_target


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
        encoder: nn.Module,
        target: str = "mean3bit",
        mask_ratio: float = 0.5,
        mask_probs: tuple[float, float, float] = (0.8, 0.1, 0.1),
        random_from_same_image: bool = False,
        corrupt_at: str = "auto",
    ):
        """corrupt_at: 'embedding' (the paper's: after the patch projection), 'pixels' (the corrupted
        regions of the normalised image, before the patch embedding) or 'auto' (embedding where a
        token sees only its own region, pixels for hybrids: see families.resolve_corrupt_at)."""
        super().__init__()
        self.encoder = encoder
        self.target = get_target(target)
        self.mask_ratio = mask_ratio
        self.mask_probs = tuple(mask_probs)
        self.random_from_same_image = random_from_same_image
        self.grid = token_grid(encoder)  # (gh, gw) tokens
        self.region = token_region(encoder)  # (rh, rw) image pixels behind each token
        if self.grid[0] * self.grid[1] < 2:
            raise ValueError(f"a {self.grid[0]}x{self.grid[1]} token grid has one token; MPP needs at least 2")
        self.corrupt_at = resolve_corrupt_at(encoder, corrupt_at)
        if getattr(getattr(encoder, "patch_drop", None), "prob", 0) > 0:
            raise ValueError("patch dropout removes tokens that MPP predicts: create the encoder with patch_drop_rate=0")
        dim = encoder.embed_dim
        # only the one in use exists, so that DDP sees no unused parameter
        if self.corrupt_at == "embedding":
            self.mask_token = nn.Parameter(torch.zeros(dim))
            nn.init.trunc_normal_(self.mask_token, std=0.02)
        else:
            # learnable like the [mask] embedding, starting at 0 = the normalisation mean colour
            self.mask_colour = nn.Parameter(torch.zeros(len(encoder.pretrained_cfg.get("mean", (0.5, 0.5, 0.5)))))  # (C,)
        # Models that pool with fc_norm have no final norm on the tokens: give the head one.
        head_norm = nn.LayerNorm(dim) if isinstance(encoder.norm, nn.Identity) else nn.Identity()
        self.head = nn.Sequential(head_norm, nn.Linear(dim, self.target.num_outputs(self.region)))
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
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()} | {"mask_token", "mask_colour"}

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def encode(self, x: torch.Tensor, corruption: Corruption | None = None) -> torch.Tensor:
        """timm's forward_features with corruption between patch projection and position embedding
        (corrupt_at 'embedding'), or of the corrupted image ('pixels').

        x (B, 3, H, W) normalised -> (B, prefix + N, D)
        """
        if corruption is None:
            return run_encoder(self.encoder, x)
        if self.corrupt_at == "pixels":
            return run_encoder(self.encoder, apply_pixel_corruption(x, corruption, self.mask_colour, self.region))
        return run_encoder(self.encoder, x, lambda tokens: apply_corruption(tokens, corruption, self.mask_token))

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
        target = self.target.compute(pixels, self.region)  # (B, N, ...) from the uncorrupted image
        tokens = self.encode((pixels - self.pixel_mean) / self.pixel_std, corruption)
        tokens = tokens[:, self.encoder.num_prefix_tokens :]  # (B, N, D)
        ids = corruption.ids  # (B, K)
        picked = torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))  # (B, K, D)
        pred = self.head(picked)  # (B, K, out)
        target = torch.gather(target, 1, ids.view(B, -1, *[1] * (target.dim() - 2)).expand(-1, -1, *target.shape[2:]))
        loss, accuracy = self.target.loss(pred, target)
        return MPPOutput(loss=loss, accuracy=accuracy, pred=pred, target=target, corruption=corruption)
