"""Weight files: the encoder under its timm model's own keys (VisionTransformer, Eva, ...), the MPP head beside it.

model.safetensors loads strictly into plain timm (no mpp import needed); its run folder, a timm hub
folder (hub_folder.py), loads as timm.create_model("local-dir:RUN", pretrained=True). The file alone:
    timm.create_model(meta["timm_model"], pretrained=True, num_classes=0,
                      img_size=..., patch_size=...,
                      pretrained_cfg_overlay=dict(file=path, num_classes=0, custom_load=False, mean=..., std=...))
"""

import json
import os
from pathlib import Path

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

# Metadata values that are JSON (safetensors metadata is str -> str).
_JSON_KEYS = (
    "img_size",
    "patch_size",
    "mean",
    "std",
    "steps",
    "num_classes",
    "class_names",
    "mpp_mask_ratio",
    "mpp_mask_probs",
)


def save_weights(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write tensors (made contiguous, moved to CPU) with metadata; non-string values are JSON-encoded."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    tmp = Path(str(path) + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", **meta})
    os.chmod(tmp, default_file_mode())  # safetensors creates its files 0600; the run's other files follow the umask
    tmp.replace(path)  # atomic: a kill never leaves a half-written weight file under the real name


def default_file_mode() -> int:
    """The mode open() gives a new file: 0666 less the process's umask (0644 under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


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
        num_classes=meta.get("num_classes", 0),  # fine-tuned files carry their head
        custom_load=False,
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
    )


def load_backbone(path: str | Path, num_classes: int = 0, img_size: int | None = None, **kwargs) -> torch.nn.Module:
    """The timm model stored in an mpp weight file, loaded strictly.

    img_size other than the trained one: timm's checkpoint_filter_fn resamples the position
    embeddings (resample_abs_pos_embed, bicubic). num_classes > 0 adds a freshly initialised head,
    or, for a fine-tuned file with that many classes, loads its head. Every other weight must be
    in the file: timm itself loads non-strictly when the class count differs, so the file is loaded
    at its own class count and the head is replaced afterwards.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {path} does not exist")
    meta = read_metadata(path)
    if "timm_model" not in meta:
        raise ValueError(f"{path} has no 'timm_model' metadata: not a weight file written by mpp")
    stored_classes = meta.get("num_classes", 0)
    model = timm.create_model(
        meta["timm_model"],
        pretrained=True,
        num_classes=stored_classes,  # = the overlay's: timm loads strictly
        img_size=img_size or meta["img_size"],
        patch_size=meta["patch_size"],
        pretrained_cfg_overlay=timm_overlay(path, meta),
        **kwargs,
    )
    if num_classes != stored_classes:
        model.reset_classifier(num_classes)  # a fresh head (or none) on the strictly loaded encoder
    return model


def load_encoder_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load every non-head weight strictly into a timm ViT; its classification head stays as it is.

    A file's own head (from fine-tuning) belongs to another task and is dropped. The model family's
    own timm checkpoint_filter_fn (vision_transformer, eva, ...) resamples the position embeddings
    to the model's grid. Raises UsageError naming every missing, unexpected or mis-shaped key.
    """
    from mpp.errors import UsageError
    from mpp.models.families import checkpoint_filter

    checkpoint_filter_fn = checkpoint_filter(model)

    state = checkpoint_filter_fn({k: v for k, v in tensors.items() if not k.startswith("head.")}, model)
    own = model.state_dict()
    shapes = [
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if shapes:
        raise UsageError(
            f"{source}: weights of another architecture: " + "; ".join(shapes[:5]) + (" ..." if len(shapes) > 5 else "")
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    head = {k for k in own if k.startswith("head.")}
    not_head = sorted(set(missing) - head)
    if not_head or unexpected:
        raise UsageError(
            f"{source}: only the head may be missing; missing {not_head[:8]}, unexpected {sorted(unexpected)[:8]}"
        )
