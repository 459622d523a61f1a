"""The MPP objective: a timm ViT encoder (families.py), one learnable [mask] embedding or [mask] colour,
a linear head, and the loss on the corrupted patches.

    mpp = MPP("vit_small_patch16_224", img_size=96, patch_size=8)   # or MPP(encoder) for a timm ViT you made
    out = mpp(images)            # images (B, 3, H, W) uint8 or float in [0, 1]
    out.loss.backward()
    mpp.save_pretrained("out")   # timm.create_model("local-dir:out", pretrained=True) loads the encoder
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from mpp.models.attention_kernel import SDPA_BACKENDS, attention_kernel
from mpp.models.families import (  # noqa: F401 (SUPPORTED: re-exported)
    SUPPORTED,
    create_encoder,
    resolve_corrupt_at,
    run_encoder,
    token_grid,
    token_region,
)
from mpp.models.inputs import INPUTS, InputCheck, check_choice, check_range
from mpp.models.masking import RANDOM_FROM, Corruption, apply_corruption, apply_pixel_corruption, sample_corruption
from mpp.models.targets import get_target

# The encoder's pooling and classifiers: MPP reads the patch tokens before them, so they never get a gradient.
UNUSED_PARTS = ("fc_norm", "attn_pool", "head", "head_dist")
DEFAULT_STATS = (0.5, 0.5, 0.5)  # mean and std of an encoder whose pretrained_cfg names none


@dataclass
class MPPOutput:
    loss: torch.Tensor  # () mean over every corrupted patch (and every 4x4 cell)
    accuracy: torch.Tensor  # () share of corrupted patches whose class is predicted right
    pred: torch.Tensor  # (B, K, out) head outputs at the corrupted positions
    target: torch.Tensor  # (B, K, ...) targets at the corrupted positions
    corruption: Corruption  # which K patches of each image were corrupted, and how


def encoder_stats(encoder: nn.Module) -> tuple[tuple, tuple]:
    """(mean, std) the encoder's input is normalised with: its pretrained_cfg's, as timm's create_transform uses
    them."""
    cfg = getattr(encoder, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", DEFAULT_STATS)), tuple(cfg.get("std", DEFAULT_STATS))


def check_settings(mask_ratio: float, mask_probs, random_from: str) -> None:
    """ValueError naming the argument, for settings that would make a meaningless objective."""
    if not 0 < mask_ratio < 1:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    if (
        len(mask_probs) != 3
        or any(not (p >= 0 and math.isfinite(p)) for p in mask_probs)
        or abs(sum(mask_probs) - 1) > 1e-6
    ):
        raise ValueError(
            "mask_probs must be three non-negative numbers (mask, random, unchanged) summing to 1, got "
            f"{tuple(mask_probs)}"
        )
    check_choice("random_from", random_from, RANDOM_FROM)


class MPP(nn.Module):
    """Masked patch prediction (ViT paper §4.6) on a timm ViT encoder.

    encoder: a timm ViT of a supported family (families.SUPPORTED), or a timm model name; with a name,
    the keyword arguments that are not MPP's own (img_size, patch_size, depth, ...) go to timm.create_model.

    An encoder you give is left as it is: MPP holds it (training MPP trains it) but changes no flag of
    it. Its pooling and classifier never get a gradient from MPP (unused_parameter_names()): MPP tells
    DistributedDataParallel to ignore them when MPP is the module DDP wraps; inside another module
    (a LightningModule), call freeze_unused(). An encoder MPP builds itself (from a name, or
    from_pretrained) has them frozen from the start.

    inputs: 'pixels' (uint8, or float in [0, 1]) or 'normalised' (float (x - mean) / std, e.g. from timm's
    create_transform; input_mean and input_std default to the encoder's pretrained_cfg mean and std).
    A float batch outside that range raises ValueError (check_inputs: 'auto', 'always', 'never'; inputs.py).
    """

    def __init__(
        self,
        encoder: nn.Module | str,
        *,
        target: str = "mean3bit",
        mask_ratio: float = 0.5,
        mask_probs: tuple[float, float, float] = (0.8, 0.1, 0.1),
        random_from: str = "batch",
        corrupt_at: str = "auto",
        inputs: str = "pixels",
        input_mean: tuple[float, ...] | None = None,
        input_std: tuple[float, ...] | None = None,
        check_inputs: str = "auto",
        sdpa_backend: str = "auto",
        **timm_kwargs,
    ):
        """corrupt_at: 'embedding' (the paper's: after the patch projection), 'pixels' (the corrupted
        regions of the normalised image, before the patch embedding) or 'auto' (embedding where a
        token sees only its own region, pixels for hybrids: see families.resolve_corrupt_at).
        random_from: where a 'random patch' replacement comes from, 'batch' or 'image'.
        sdpa_backend: the kernel of the encoder's attention in forward ('auto', 'flash', 'cudnn', 'efficient',
        'math'; attention_kernel.py): how fast, not what is computed. An attribute, so it can be set later too."""
        super().__init__()
        check_choice("sdpa_backend", sdpa_backend, SDPA_BACKENDS)
        self.sdpa_backend = sdpa_backend  # read inside forward: torch.compile guards on it
        built_here = isinstance(encoder, str)
        if built_here:
            encoder = create_encoder(encoder, **timm_kwargs)
        elif timm_kwargs:
            raise TypeError(
                f"MPP got an encoder module and timm arguments {sorted(timm_kwargs)}: those are for a model name"
            )
        self.target = get_target(target)
        check_settings(mask_ratio, mask_probs, random_from)
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.mask_probs = tuple(mask_probs)
        self.random_from = random_from
        self.grid = token_grid(encoder)  # (gh, gw) tokens
        self.region = token_region(encoder)  # (rh, rw) image pixels behind each token
        if self.grid[0] * self.grid[1] < 2:
            raise ValueError(f"a {self.grid[0]}x{self.grid[1]} token grid has one token; MPP needs at least 2")
        self.corrupt_at = resolve_corrupt_at(encoder, corrupt_at)
        if getattr(getattr(encoder, "patch_drop", None), "prob", 0) > 0:
            raise ValueError(
                "patch dropout removes tokens that MPP predicts: create the encoder with patch_drop_rate=0"
            )
        dim = encoder.embed_dim
        mean, std = encoder_stats(encoder)
        # only the one in use exists, so that DDP sees no unused parameter
        if self.corrupt_at == "embedding":
            self.mask_token = nn.Parameter(torch.zeros(dim))
            nn.init.trunc_normal_(self.mask_token, std=0.02)
        else:
            # learnable like the [mask] embedding, starting at 0 = the normalisation mean colour
            self.mask_colour = nn.Parameter(torch.zeros(len(mean)))  # (C,)
        # Models that pool with fc_norm have no final norm on the tokens: give the head one.
        head_norm = nn.LayerNorm(dim) if isinstance(encoder.norm, nn.Identity) else nn.Identity()
        self.head = nn.Sequential(head_norm, nn.Linear(dim, self.target.num_outputs(self.region)))
        # small initial logits: the loss starts at ln(512) for mean3bit, as for a uniform guess
        nn.init.trunc_normal_(self.head[-1].weight, std=0.02)
        nn.init.zeros_(self.head[-1].bias)
        # the encoder's normalisation: what it is fed, whatever the caller's images were normalised with
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self._set_inputs(inputs, input_mean, input_std, mean, std)
        self.input_check = InputCheck(check_inputs)
        # read by torch's DistributedDataParallel when it wraps this module: no find_unused_parameters needed
        self._ddp_params_and_buffers_to_ignore = self.unused_parameter_names()
        if built_here:
            self.freeze_unused()

    def _set_inputs(self, inputs: str, input_mean, input_std, mean: tuple, std: tuple) -> None:
        check_choice("inputs", inputs, INPUTS)
        if inputs == "pixels" and (input_mean is not None or input_std is not None):
            raise ValueError("input_mean and input_std describe normalised images: give them with inputs='normalised'")
        input_mean = tuple(mean if input_mean is None else input_mean)
        input_std = tuple(std if input_std is None else input_std)
        if len(input_mean) != len(mean) or len(input_std) != len(std) or not all(s > 0 for s in input_std):
            raise ValueError(
                f"input_mean and input_std need {len(mean)} values each (std > 0), got {input_mean} and {input_std}"
            )
        self.inputs = inputs
        self.input_stats = (input_mean, input_std)  # for messages: read without a host-device synchronisation
        # normalised with the encoder's own statistics: fed to the encoder as they are, bit for bit
        self.inputs_are_encoder_input = inputs == "normalised" and (input_mean, input_std) == (mean, std)
        self.register_buffer("input_mean", torch.tensor(input_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(input_std).view(1, -1, 1, 1), persistent=False)

    def unused_parameter_names(self) -> list[str]:
        """Names of the encoder's parameters that MPP never trains: its pooling and classifier."""
        return [
            f"encoder.{part}.{name}"
            for part in UNUSED_PARTS
            if isinstance(getattr(self.encoder, part, None), nn.Module)
            for name, _ in getattr(self.encoder, part).named_parameters()
        ]

    def freeze_unused(self) -> "MPP":
        """requires_grad_(False) on unused_parameter_names(): for DDP around a module that holds MPP."""
        unused = set(self.unused_parameter_names())
        for name, param in self.named_parameters():
            if name in unused:
                param.requires_grad_(False)
        return self

    def no_weight_decay(self) -> set[str]:
        """Embeddings keep their size: the encoder's (pos_embed, cls_token, reg_token, ...) and the
        mask token. timm's create_optimizer_v2 reads this only from the model it is given."""
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()} | {"mask_token", "mask_colour"}

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def settings(self) -> dict:
        """The objective's settings, as the constructor takes them (what save_pretrained records)."""
        return {
            "target": self.target.name,
            "mask_ratio": self.mask_ratio,
            "mask_probs": list(self.mask_probs),
            "random_from": self.random_from,
            "corrupt_at": self.corrupt_at,
        }

    def encode(self, x: torch.Tensor, corruption: Corruption | None = None) -> torch.Tensor:
        """timm's forward_features with corruption between patch projection and position embedding
        (corrupt_at 'embedding'), or of the corrupted image ('pixels').

        x (B, 3, H, W) normalised with the encoder's mean and std -> (B, prefix + N, D)
        """
        if corruption is None:
            return run_encoder(self.encoder, x)
        if self.corrupt_at == "pixels":
            return run_encoder(self.encoder, apply_pixel_corruption(x, corruption, self.mask_colour, self.region))
        return run_encoder(self.encoder, x, lambda tokens: apply_corruption(tokens, corruption, self.mask_token))

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """images as declared by `inputs` -> (B, C, H, W) float pixels in [0, 1], the targets' colours.
        Raises ValueError for a batch outside the declared range (when check_inputs has it checked)."""
        if images.dtype == torch.uint8:
            if self.inputs == "normalised":
                raise ValueError(
                    "uint8 images are pixels, but this MPP was created with inputs='normalised' (float (x - mean) / "
                    "std); "
                    "create it with inputs='pixels' for uint8 or [0, 1] images"
                )
            return images.float().div_(255)
        if not images.is_floating_point():
            raise ValueError(f"images must be uint8 or float, got {images.dtype}")
        pixels = images.float()
        if self.inputs == "normalised":
            pixels = pixels * self.input_std + self.input_mean
        if self.input_check.wanted(pixels):
            check_range(pixels, self.inputs, *self.input_stats)
        return pixels

    def forward(self, images: torch.Tensor, corruption: Corruption | None = None) -> MPPOutput:
        """images (B, 3, H, W) as declared by `inputs`. Draws a corruption unless one is given."""
        pixels = self.pixels(images)  # (B, 3, H, W) in [0, 1]
        B = pixels.shape[0]
        if corruption is None:
            corruption = sample_corruption(
                B, self.num_patches, self.mask_ratio, self.mask_probs, self.random_from, pixels.device
            )
        target = self.target.compute(pixels, self.region)  # (B, N, ...) from the uncorrupted image
        x = images.float() if self.inputs_are_encoder_input else (pixels - self.pixel_mean) / self.pixel_std
        with attention_kernel(self.sdpa_backend):
            tokens = self.encode(x, corruption)
        tokens = tokens[:, self.encoder.num_prefix_tokens :]  # (B, N, D)
        ids = corruption.ids  # (B, K)
        picked = torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))  # (B, K, D)
        pred = self.head(picked)  # (B, K, out)
        target = torch.gather(target, 1, ids.view(B, -1, *[1] * (target.dim() - 2)).expand(-1, -1, *target.shape[2:]))
        loss, accuracy = self.target.loss(pred, target)
        return MPPOutput(loss=loss, accuracy=accuracy, pred=pred, target=target, corruption=corruption)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Writes a timm hub folder, the same files a pretraining run writes (mpp_folder.py): model.safetensors
        (the encoder under timm's keys), timm's config.json, mpp_head.safetensors ([mask] and head).
        timm.create_model("local-dir:DIR", pretrained=True) loads the encoder, MPP.from_pretrained(DIR) all of it."""
        from mpp.models.mpp_folder import save_objective

        save_objective(self, Path(directory))
        return Path(directory)

    @classmethod
    def from_pretrained(cls, path: str | Path, **settings) -> "MPP":
        """The MPP saved in a folder (by save_pretrained or a pretraining run, older runs included) or its
        model.safetensors, in eval mode. settings override the saved ones (e.g. inputs='normalised')."""
        from mpp.models.mpp_folder import load_objective

        return load_objective(cls, Path(path), settings)[0]
