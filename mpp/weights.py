"""Weight files: the encoder under timm's VisionTransformer keys, the MPP head beside it.

model.safetensors loads strictly into plain timm (no mpp import needed):
    timm.create_model(meta["timm_model"], pretrained=True, num_classes=0,
                      img_size=..., patch_size=...,
                      pretrained_cfg_overlay=dict(file=path, num_classes=0, custom_load=False, mean=..., std=...))
"""
import json
from pathlib import Path

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

# Metadata values that are JSON (safetensors metadata is str -> str).
_JSON_KEYS = ("img_size", "patch_size", "mean", "std", "steps", "num_classes", "class_names")


def save_weights(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write tensors (made contiguous, moved to CPU) with metadata; non-string values are JSON-encoded."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    tmp = Path(str(path) + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", **meta})
    tmp.replace(path)  # atomic: a kill never leaves a half-written weight file under the real name


def read_metadata(path: str | Path) -> dict:
    """The metadata of a weight file, JSON values decoded."""
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    return {k: json.loads(v) if k in _JSON_KEYS else v for k, v in raw.items()}


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def timm_overlay(path: str | Path, meta: dict) -> dict:
    """The pretrained_cfg_overlay that makes timm load this file strictly as encoder-only weights."""
    return dict(
        file=str(Path(path).resolve()),
        num_classes=0,
        custom_load=False,
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
    )


def load_backbone(path: str | Path, num_classes: int = 0, img_size: int | None = None, **kwargs) -> torch.nn.Module:
    """The timm VisionTransformer stored in an mpp weight file, loaded strictly.

    img_size other than the trained one: timm's checkpoint_filter_fn resamples the position
    embeddings (resample_abs_pos_embed, bicubic). num_classes > 0 adds a freshly initialised head.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {path} does not exist")
    meta = read_metadata(path)
    if "timm_model" not in meta:
        raise ValueError(f"{path} has no 'timm_model' metadata: not a weight file written by mpp")
    return timm.create_model(
        meta["timm_model"],
        pretrained=True,
        num_classes=num_classes,
        img_size=img_size or meta["img_size"],
        patch_size=meta["patch_size"],
        pretrained_cfg_overlay=timm_overlay(path, meta),
        **kwargs,
    )
