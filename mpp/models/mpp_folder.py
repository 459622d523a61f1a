"""An MPP objective saved as a timm hub folder: what MPP.save_pretrained and a pretraining run write,
and what MPP.from_pretrained reads.

    DIR/model.safetensors      the encoder under its timm model's keys, with metadata (weights.py)
    DIR/config.json            timm's (hub_folder.py): timm.create_model("local-dir:DIR", pretrained=True)
    DIR/mpp_head.safetensors   the [mask] embedding (or colour) and the head, same metadata

The metadata also records the objective's settings (mpp_target, mpp_corrupt_at, mpp_mask_ratio,
mpp_mask_probs, mpp_random_from). Folders written before those keys read them from the run's
run_config.json; folders without timm's config.json load through the weight file's metadata.
"""

import json
from pathlib import Path

import timm
import torch
import torch.nn as nn

from mpp import __version__
from mpp.models.hub_folder import TIMM_CONFIG, read_run_config, write_timm_config
from mpp.models.weights import load_backbone, load_tensors, read_metadata, save_weights

WEIGHTS_FILE = "model.safetensors"
HEAD_FILE = "mpp_head.safetensors"
MASK_PARAMETERS = ("mask_token", "mask_colour")  # the one in use exists


def square_size(value, what: str) -> int:
    h, w = (value, value) if isinstance(value, int) else tuple(value)
    if h != w:
        raise ValueError(
            f"save_pretrained records square images (timm's config.json input_size), but the encoder's {what} is "
            f"{h}x{w}"
        )
    return int(h)


def objective_metadata(model) -> dict:
    """The weight files' metadata: how to rebuild the encoder, its normalisation, the objective's settings."""
    from mpp.models.model import encoder_stats

    enc = model.encoder
    architecture = (getattr(enc, "pretrained_cfg", None) or {}).get("architecture")
    if not architecture:
        raise ValueError(
            f"{type(enc).__name__} has no pretrained_cfg['architecture']: save_pretrained needs an encoder made by "
            "timm.create_model"
        )
    mean, std = encoder_stats(enc)
    settings = model.settings
    meta = {
        "timm_model": architecture,
        "img_size": square_size(enc.patch_embed.img_size, "image size"),
        "patch_size": square_size(enc.patch_embed.patch_size, "patch size"),
        "mean": list(mean),
        "std": list(std),
        "mpp_target": settings["target"],
        "mpp_corrupt_at": settings["corrupt_at"],
        "mpp_mask_ratio": settings["mask_ratio"],
        "mpp_mask_probs": settings["mask_probs"],
        "mpp_random_from": settings["random_from"],
        "mpp_version": __version__,
    }
    if getattr(enc, "num_classes", 0):
        meta["num_classes"] = enc.num_classes  # the encoder's own classifier, kept as it is
    return meta


def save_objective(model, directory: Path, extra_metadata: dict | None = None) -> dict:
    """Writes the folder (this module's docstring); returns the metadata written. extra_metadata: e.g. a run's steps."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = {**objective_metadata(model), **(extra_metadata or {})}
    write_timm_config(directory, model.encoder, meta)
    check_timm_rebuilds(directory, model.encoder)
    mask = {k: v for k, v in model.named_parameters() if k in MASK_PARAMETERS}
    save_weights(directory / HEAD_FILE, {**mask, **{f"head.{k}": v for k, v in model.head.state_dict().items()}}, meta)
    save_weights(directory / WEIGHTS_FILE, model.encoder.state_dict(), meta)
    return meta


def check_timm_rebuilds(directory: Path, encoder: nn.Module) -> None:
    """timm builds the model that config.json describes (on the meta device: no memory, no weights) and it must
    take the encoder's weights: an encoder whose construction arguments timm did not record (an older timm,
    a model built by hand) would otherwise give a folder that loads only with errors."""
    with torch.device("meta"):
        rebuilt = timm.create_model(f"local-dir:{directory}", pretrained=False)
    want = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if want != got:
        (directory / TIMM_CONFIG).unlink()
        differ = sorted(set(want) ^ set(got)) + sorted(k for k in set(want) & set(got) if want[k] != got[k])
        args = json.loads(json.dumps(getattr(encoder, "_model_args", {})))
        raise ValueError(
            f"timm would rebuild this encoder from config.json with other weights ({', '.join(differ[:4])}"
            f"{' ...' if len(differ) > 4 else ''}): it was not made by timm.create_model with all its arguments "
            f"recorded (recorded: {args}); create it with MPP(name, **timm_arguments) or timm.create_model"
        )


def locate(path: Path) -> tuple[Path, Path]:
    """(folder, weight file) of a folder or of its model.safetensors."""
    return (path, path / WEIGHTS_FILE) if path.is_dir() else (path.parent, path)


def is_timm_folder(folder: Path) -> bool:
    config = folder / TIMM_CONFIG
    return config.is_file() and "architecture" in json.loads(config.read_text())


def load_encoder(path: Path) -> nn.Module:
    """The encoder, loaded strictly: a timm hub folder by timm itself (timm.create_model("local-dir:...")), a
    weight file or a folder from before timm's config.json through the file's metadata (weights.load_backbone)."""
    folder, weights = locate(path)
    if path.is_dir() and is_timm_folder(folder) and weights.is_file():
        return timm.create_model(f"local-dir:{folder}", pretrained=True)
    return load_backbone(weights)  # FileNotFoundError / ValueError for anything else


def saved_settings(path: Path) -> dict:
    """The objective's settings from the weights' metadata, else the run's run_config.json, else the defaults."""
    folder, weights = locate(path)
    meta = read_metadata(weights)
    run = read_run_config(folder)
    return {
        "target": meta.get("mpp_target", "mean3bit"),
        "corrupt_at": meta.get("mpp_corrupt_at", "embedding"),  # files from before the option were embedding-corrupted
        "mask_ratio": meta.get("mpp_mask_ratio", run.get("mask_ratio", 0.5)),
        "mask_probs": tuple(meta.get("mpp_mask_probs", run.get("mask_probs", (0.8, 0.1, 0.1)))),
        "random_from": meta.get("mpp_random_from", run.get("random_from", "batch")),
    }


def load_head(model, head_file: Path) -> None:
    """The [mask] parameter and the head from head_file into model; ValueError for a head of another model."""
    try:
        missing, unexpected = model.load_state_dict(load_tensors(head_file), strict=False)
    except RuntimeError as e:  # shape mismatch: a head for another target or width
        raise ValueError(
            f"{head_file} does not fit {model.encoder.pretrained_cfg.get('architecture')} with target "
            f"{model.target.name}: {str(e).splitlines()[-1].strip()}"
        ) from None
    # only the encoder (loaded already) may be missing; anything else means a foreign file
    wrong = [k for k in missing if not k.startswith("encoder.")] + list(unexpected)
    if wrong:
        raise ValueError(f"{head_file}: keys do not match the MPP head: {', '.join(wrong[:5])}")


def load_objective(cls, path: Path, overrides: dict, head_required: bool = True):
    """(cls on the saved encoder with the saved settings and head, in eval mode; whether a head was loaded).
    Without mpp_head.safetensors: FileNotFoundError, or a fresh head where head_required is False."""
    folder, weights = locate(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such folder (expected one written by save_pretrained or a pretraining run, or its "
            f"{WEIGHTS_FILE})"
        )
    if not weights.is_file():
        raise FileNotFoundError(
            f"{folder}: no {WEIGHTS_FILE} there (expected a folder written by save_pretrained or a pretraining run)"
        )
    head_file = folder / HEAD_FILE
    if head_required and not head_file.is_file():
        raise FileNotFoundError(
            f"{folder} has no {HEAD_FILE}, so it holds no MPP objective; its encoder loads with "
            f"timm.create_model('local-dir:{folder}', pretrained=True), and MPP(encoder) starts a new objective on it"
        )
    model = cls(load_encoder(path), **{**saved_settings(path), **overrides})
    model.freeze_unused()  # the encoder was built here: nothing else will train its pooling or classifier
    if head_file.is_file():
        load_head(model, head_file)
    return model.eval(), head_file.is_file()
