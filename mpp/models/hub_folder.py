"""Run folders as timm hub folders: timm's config.json and a model card beside model.safetensors.

    RUN/model.safetensors   the weights under the timm model's own keys (metadata kept, weights.py)
    RUN/config.json         timm's: architecture, model_args (img_size, patch_size), pretrained_cfg
                            (mean, std, input size), num_classes and, fine-tuned, label_names
    RUN/README.md           a model card (YAML front matter for the Hub, how to load it)
    RUN/run_config.json     the run's own configuration (flags + derived), --config replays it

So `timm.create_model("local-dir:RUN", pretrained=True)` builds and loads the model with nothing of
mpp, and the same folder on the Hub loads as "hf-hub:USER/NAME".
"""

import json
from pathlib import Path, PurePath, PureWindowsPath

import torch

RUN_CONFIG = "run_config.json"
TIMM_CONFIG = "config.json"
MODEL_CARD = "README.md"


def read_run_config(run_dir: str | Path) -> dict:
    """The run's own configuration; folders written before run_config.json kept it in config.json."""
    run_dir = Path(run_dir)
    for name in (RUN_CONFIG, TIMM_CONFIG):
        path = run_dir / name
        if path.is_file():
            config = json.loads(path.read_text())
            if "architecture" not in config:  # not timm's config.json
                return config
    return {}


# The pretrained_cfg keys that describe these weights: how to build, feed and read the model. The rest of
# the architecture's default pretrained config (its tag, licence, source, paper) describes other weights.
DESCRIBES_THESE_WEIGHTS = (
    "input_size",
    "fixed_input_size",
    "interpolation",
    "crop_pct",
    "crop_mode",
    "mean",
    "std",
    "num_classes",
    "pool_size",
    "first_conv",
    "classifier",
    "custom_load",
)


def preprocessing(meta: dict) -> dict:
    """The run's evaluation view as timm names it (resolve_data_config's keys): its size, resize, crop, mean and std."""
    from mpp.data.transforms import EVAL_CROP_MODE, EVAL_CROP_PCT, EVAL_INTERPOLATION

    size = meta["img_size"]
    return {
        "input_size": (3, size, size),
        "interpolation": EVAL_INTERPOLATION,
        "crop_pct": EVAL_CROP_PCT,
        "crop_mode": EVAL_CROP_MODE,
        "mean": tuple(meta["mean"]),
        "std": tuple(meta["std"]),
    }


def write_timm_config(
    run_dir: str | Path, model: torch.nn.Module, meta: dict, label_names: list[str] | None = None
) -> None:
    """timm's own config.json (timm.models._hub.save_config_for_hf, what timm's push_to_hf_hub writes), with the
    run's preprocessing, so that timm.data.resolve_data_config + create_transform build the run's evaluation view,
    and nothing of the architecture's default pretrained weights (tag, licence)."""
    from timm.models._hub import save_config_for_hf

    path = Path(run_dir) / TIMM_CONFIG
    tmp = path.with_name(path.name + ".tmp")
    save_config_for_hf(
        model,
        str(tmp),
        model_config={"label_names": list(label_names)} if label_names else None,
        model_args={"img_size": meta["img_size"], "patch_size": meta["patch_size"]},
        data_config=preprocessing(meta),
    )
    config = json.loads(tmp.read_text())
    config["pretrained_cfg"] = {k: v for k, v in config["pretrained_cfg"].items() if k in DESCRIBES_THESE_WEIGHTS}
    path.write_text(json.dumps(config, indent=2))
    tmp.unlink()


def hub_dataset_ids(*datasets: str | None) -> list[str]:
    """The datasets that are Hub ids (user/name or a bare Hub name), not local folders or built-in sets."""
    from mpp.data.builtin import BUILTIN_DATASETS

    return [d for d in datasets if d and d not in BUILTIN_DATASETS and not Path(d).expanduser().exists()]


def public_path(value: str | None) -> str | None:
    """A path as a card or an uploaded file may show it: an absolute path becomes <local>/ and its last two parts
    (where a run's files were on its machine means nothing elsewhere and tells about that machine); relative paths,
    built-in set names and Hub ids stay as they are."""
    if not value or not (value.startswith("/") or value.startswith("~") or PureWindowsPath(value).drive):
        return value
    path = PureWindowsPath(value) if PureWindowsPath(value).drive else PurePath(value)
    return "/".join(["<local>", *path.parts[1:][-2:]])  # parts[0] is the anchor: "/", "C:\\" or "~"


def write_model_card(
    run_dir: str | Path,
    *,
    title: str,
    summary: str,
    facts: dict,
    metrics: dict,
    tags: list[str],
    datasets: list[str],
    use: list[str],
    note: str,
) -> None:
    """README.md: YAML front matter (library_name, tags, license, datasets), what was trained, final metrics, how to
    load
    and use it: `use`, code lines that follow the loading code (x: one transformed image), and a `note` about them. The
    folder appears by a placeholder path: the card is uploaded too and names no path of the machine it was written
    on."""
    run_dir = Path(run_dir)
    front = [
        "---",
        "library_name: timm",
        "license: other  # the weights follow the license of the data they were trained on",
        "tags:",
        *[f"- {t}" for t in tags],
    ]
    if datasets:
        front += ["datasets:", *[f"- {d}" for d in datasets]]
    front.append("---")
    body = [
        f"# {title}",
        "",
        summary,
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in facts.items()],
        "",
        "## Final metrics",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()],
        "",
        "## How to load it",
        "",
        "With timm alone (no mpp needed), from this folder or, once pushed, from the Hub:",
        "",
        "```python",
        "import timm",
        f'model = timm.create_model("local-dir:path/to/{run_dir.name}", pretrained=True).eval()  # this folder',
        '# model = timm.create_model("hf-hub:USER/NAME", pretrained=True).eval()',
        "config = timm.data.resolve_data_config({}, model=model)  # the run's evaluation view: size, resize, centre "
        "crop, mean, std",
        "transform = timm.data.create_transform(**config)",
        'x = transform(image.convert("RGB")).unsqueeze(0)  # image: a PIL image',
        *use,
        "```",
        "",
        note,
        "",
        "Trained with mpp (masked patch prediction pretraining of timm ViTs; Dosovitskiy et al., ICLR 2021, §4.6). "
        f"The run's full configuration is in `{RUN_CONFIG}`; `--config {RUN_CONFIG}` replays it.",
        "",
    ]
    (run_dir / MODEL_CARD).write_text("\n".join(front + [""] + body))
