"""Command line of recipes/pretrain_mpp.py: argparse -> PretrainConfig, errors as one line + exit 2."""

import argparse
import sys
from pathlib import Path

from mpp.errors import UsageError
from mpp.models.families import SUPPORTED
from mpp.models.targets import TARGETS
from mpp.training.pretrain_config import DEFAULT_LR, PAPER_REF_BATCH, PretrainConfig, validate

RECIPE_COMMANDS = {
    "pretrain_mpp.py": "pretrain",
    "finetune.py": "finetune",
    "gap.py": "gap",
    "ablate.py": "ablate",
    "inspect_run.py": "inspect",
    "prepare_data.py": "prepare",
    "push_to_hub.py": "push",
}  # recipes/X: python -m mpp Y


def started_as_module() -> bool:
    """Whether this process is `python -m mpp ...` (or `accelerate launch -m mpp ...`) rather than a recipe script."""
    main = Path(sys.argv[0])
    return main.name == "__main__.py" and main.parent.name == "mpp"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line (no usage block) with exit code 2. Its name is
    the recipe's, or `python -m mpp COMMAND` when the process was started that way."""

    def __init__(self, prog: str | None = None, *args, **kwargs):
        if started_as_module() and prog in RECIPE_COMMANDS:
            prog = f"python -m mpp {RECIPE_COMMANDS[prog]}"
        super().__init__(prog, *args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_run_flags(p: argparse.ArgumentParser, run: argparse._ArgumentGroup, d) -> None:
    """The flags both recipes share: data pipeline, batch and length, the run folder, checkpoints."""
    g = p.add_argument_group("data pipeline")
    g.add_argument(
        "--workers",
        type=int,
        default=d.workers,
        help="DataLoader worker processes per training process, kept across epochs (default: 0 on CPU machines with <= "
        "4 cores, else the cores per process but one)",
    )
    g.add_argument(
        "--crop-scale",
        type=float,
        nargs=2,
        default=d.crop_scale,
        metavar=("MIN", "MAX"),
        help="RandomResizedCrop area range",
    )
    g.add_argument("--hflip", type=float, default=d.hflip, help="horizontal flip probability")
    g.add_argument(
        "--strict-data",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="stop at the first unreadable image or missing label instead of skipping and counting it",
    )
    g = p.add_argument_group("length")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="images per device per micro-batch")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimiser step")
    g.add_argument(
        "--epochs", type=float, default=d.epochs, help="passes over the training images when --max-steps is not given"
    )
    g.add_argument("--max-steps", type=int, default=d.max_steps, help="optimiser steps (overrides --epochs)")
    run.add_argument("--output-dir", default=d.output_dir, help="run folder (default runs/<date-time>)")
    run.add_argument(
        "--checkpoint-every", type=int, default=d.checkpoint_every, help="optimiser steps between checkpoints"
    )
    run.add_argument(
        "--keep-checkpoints", type=int, default=d.keep_checkpoints, help="how many recent checkpoints to keep"
    )
    run.add_argument(
        "--resume", default=d.resume, help="'auto' (newest complete checkpoint of --output-dir) or a checkpoint folder"
    )
    run.add_argument("--seed", type=int, default=d.seed, help="random seed")
    run.add_argument("--log-every", type=int, default=d.log_every, help="optimiser steps between metric records")
    run.add_argument(
        "--max-nonfinite-steps",
        type=int,
        default=d.max_nonfinite_steps,
        help="stop after this many optimiser steps in a row with a non-finite gradient (each is skipped; checked at "
        "logging steps); 0: no check",
    )
    run.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the model (accelerate's dynamo plugin, inductor)",
    )
    run.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help="CPU threads per process (default: the cores / processes on this machine; "
        "accelerate launch without a config sets OMP_NUM_THREADS=1, which would halve a 2-core CPU run)",
    )
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="a progress bar")
    run.add_argument(
        "--report-to",
        default=d.report_to,
        choices=("tensorboard", "wandb", "mlflow", "all", "none"),
        help="where metrics go besides metrics.jsonl, through accelerate's trackers (wandb: pip install "
        "'vit-mpp[wandb]', "
        "mlflow: 'vit-mpp[mlflow]'; 'all': every one installed)",
    )
    run.add_argument(
        "--push-to-hub",
        default=d.push_to_hub,
        metavar="REPO_ID",
        help="upload the finished run folder (a timm hub folder, checkpoints left out) to this Hugging Face model "
        "repo; "
        "needs a token (hf auth login) and the network, checked before training",
    )
    run.add_argument(
        "--hub-private",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="with --push-to-hub: the repo must be private (created private; an existing public repo is refused before "
        "training)",
    )
    run.add_argument(
        "--config",
        default=None,
        help="YAML or JSON file of flag values (keys are the flags' names, e.g. img_size "
        "or img-size; booleans as true/false, with --no-X on the command line to turn one off); flags on the command "
        "line win. "
        "A run's run_config.json replays that run in a new folder: where it went (output_dir), --resume and "
        "--push-to-hub "
        "are taken from the command line only, and its 'derived' block is ignored. Bundled examples by name: "
        "paper_vit_b16, vit_s16_one_gpu "
        "(the files are in mpp/configs/)",
    )


def build_parser() -> argparse.ArgumentParser:
    d = PretrainConfig()
    p = OneLineParser(
        prog="pretrain_mpp.py",
        description="Masked patch prediction pretraining of a timm ViT (Dosovitskiy et al. 2021, §4.6). "
        "Run it through 'accelerate launch'; mixed precision and multi-GPU/TPU are accelerate's flags.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default=d.dataset,
        help="built-in (mnist5k, fashion-mnist[-upstream|-downstream], photos, clipart[-upstream|-downstream], "
        "colour-mix), a local folder (imagefolder or save_to_disk), parquet files, .tar webdataset shards, or a "
        "Hub id",
    )
    g.add_argument("--dataset-config", default=d.dataset_config, help="the Hub dataset's configuration name")
    g.add_argument("--split", default=d.split, help="dataset split to pretrain on")
    g.add_argument("--image-column", default=d.image_column, help="image column (detected when there is only one)")
    g.add_argument(
        "--streaming",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="stream the dataset (iterable, sharded per process); needs --max-steps",
    )
    g.add_argument(
        "--decode",
        default=d.decode,
        choices=("cpu", "pil", "gpu"),
        help="how JPEGs are decoded: cpu (at 1/2-1/8 scale in the DCT domain when the crop is at least twice the "
        "output, "
        "else libjpeg-turbo through torchvision and torch's resize), pil (Pillow, the whole image, as before), "
        "gpu (nvJPEG on the training device; needs CUDA). Other formats always take the pil path",
    )

    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=d.model,
        help=f"a timm ViT of a supported family: {SUPPORTED}; ResNets, ConvNeXt, Swin and other non-ViTs are refused",
    )
    g.add_argument("--img-size", type=int, default=d.img_size, help="input resolution")
    g.add_argument(
        "--patch-size",
        type=int,
        default=d.patch_size,
        help="patch size (must divide --img-size); timm's argument, so for a "
        "hybrid it is the patch on the CNN feature map (usually 1) and each token stands for img-size / grid pixels",
    )
    g.add_argument(
        "--grad-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="timm's activation checkpointing (less memory, ~30%% slower)",
    )

    g = p.add_argument_group("objective")
    g.add_argument("--target", default=d.target, choices=list(TARGETS), help="what each corrupted patch predicts")
    g.add_argument("--mask-ratio", type=float, default=d.mask_ratio, help="share of patches corrupted per image")
    g.add_argument(
        "--mask-probs",
        type=float,
        nargs=3,
        default=d.mask_probs,
        metavar=("MASK", "RANDOM", "KEEP"),
        help="of the corrupted: [mask] token / random other patch / unchanged",
    )
    g.add_argument(
        "--random-from",
        default=d.random_from,
        choices=["batch", "image"],
        help="where random replacement patches come from",
    )
    (
        g.add_argument(
            "--corrupt-at",
            default=d.corrupt_at,
            choices=["auto", "embedding", "pixels"],
            help="embedding: corrupt patch embeddings after the projection (the paper's, with a learnable [mask] "
            "embedding); "
            "pixels: corrupt the regions' pixels before the patch embedding (a learnable [mask] colour, starting at "
            "the "
            "normalisation mean); auto: embedding for plain patch embeddings, pixels for hybrids, whose CNN stem sees "
            "across "
            "region borders and would read a hidden region's colour from its neighbours",
        ),
    )

    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--lr",
        type=float,
        default=d.lr,
        help=f"peak learning rate at the actual global batch (default {DEFAULT_LR:g} unless --base-lr)",
    )
    g.add_argument(
        "--base-lr",
        type=float,
        default=d.base_lr,
        help="instead of --lr: lr = base_lr x global_batch / ref_batch (paper: 2e-4)",
    )
    g.add_argument(
        "--ref-batch", type=int, default=d.ref_batch, help=f"reference batch of --base-lr (paper: {PAPER_REF_BATCH})"
    )
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup steps, then cosine decay")
    g.add_argument("--min-lr", type=float, default=d.min_lr, help="learning rate at the end of the cosine")
    g.add_argument(
        "--weight-decay",
        type=float,
        default=d.weight_decay,
        help="AdamW weight decay (not on biases, norms, embeddings)",
    )
    g.add_argument("--betas", type=float, nargs=2, default=d.betas, help="AdamW betas")
    g.add_argument("--clip-grad", type=float, default=d.clip_grad, help="global gradient-norm clip (0: off)")

    g = p.add_argument_group("run")
    g.add_argument(
        "--log-images-every",
        type=int,
        default=d.log_images_every,
        help="steps between MPP prediction pictures in TensorBoard (0: never)",
    )
    g.add_argument(
        "--eval-dataset",
        default=d.eval_dataset,
        help="labelled set (train and test splits, e.g. fashion-mnist) on which "
        "k-NN and 10-shot linear accuracy of the frozen encoder are logged every --eval-every-steps",
    )
    g.add_argument(
        "--eval-every-steps", type=int, default=d.eval_every_steps, help="steps between frozen-feature evaluations"
    )
    add_run_flags(p, g, d)
    return p


def build_finetune_parser() -> argparse.ArgumentParser:
    from mpp.training.finetune_config import PRESETS, FinetuneConfig

    d = FinetuneConfig()
    p = OneLineParser(
        prog="finetune.py",
        description="Fine-tune a timm ViT classifier from scratch, from MPP weights or from supervised weights. "
        "Optimisation knobs left unset take the --preset's value.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default=d.dataset,
        help="labelled dataset: built-in (mnist5k, fashion-mnist[-upstream|-downstream], "
        "clipart[-upstream|-downstream]), local folder, parquet, Hub id",
    )
    g.add_argument("--dataset-config", default=d.dataset_config, help="the Hub dataset's configuration name")
    g.add_argument("--train-split", default=d.train_split, help="split to train on")
    g.add_argument(
        "--eval-split",
        default=None,
        help="held-out split for top-1 (default: test; with --test-split it is the "
        "validation split, default: validation)",
    )
    g.add_argument(
        "--test-split",
        default=d.test_split,
        help="test split, scored once at the end with the weights of the best "
        "--eval-split top-1, which become model.safetensors (the last weights: last.safetensors); never used to choose "
        "anything",
    )
    g.add_argument("--image-column", default=d.image_column, help="image column (detected when there is only one)")
    g.add_argument("--label-column", default=d.label_column, help="label column (detected: the only ClassLabel column)")
    g.add_argument(
        "--train-per-class", type=int, default=d.train_per_class, help="low-label regime: N training images per class"
    )
    g.add_argument(
        "--train-fraction",
        type=float,
        default=d.train_fraction,
        help="low-label regime: this fraction of the training split",
    )
    g.add_argument("--subset-seed", type=int, default=d.subset_seed, help="seed of the low-label draw")
    g = p.add_argument_group("model")
    g.add_argument(
        "--init",
        default=d.init,
        help="scratch, a run folder or a .safetensors file (from pretrain_mpp.py or finetune.py) or timm:NAME.TAG",
    )
    g.add_argument(
        "--model", default=d.model, help="timm ViT for --init scratch (otherwise the weights' metadata decides)"
    )
    g.add_argument(
        "--img-size",
        type=int,
        default=d.img_size,
        help="resolution (default: the weights'; larger interpolates position embeddings)",
    )
    g.add_argument("--patch-size", type=int, default=d.patch_size, help="patch size for --init scratch (default 7)")
    g.add_argument(
        "--grad-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="timm's activation checkpointing",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--preset",
        default=d.preset,
        choices=list(PRESETS),
        help="paper: SGD momentum, no wd, clip 1, zero head; modern: AdamW, layer decay, drop path, label smoothing, "
        "mixup/cutmix, RandAugment",
    )
    for key, kind in [
        ("opt", str),
        ("lr", float),
        ("weight_decay", float),
        ("layer_decay", float),
        ("drop_path", float),
        ("label_smoothing", float),
        ("mixup", float),
        ("cutmix", float),
        ("auto_augment", str),
        ("clip_grad", float),
        ("warmup_steps", int),
    ]:
        shown = ", ".join(f"{name} {PRESETS[name][key]}" for name in PRESETS)
        g.add_argument(f"--{key.replace('_', '-')}", type=kind, default=None, help=f"(preset: {shown})")
    g.add_argument(
        "--zero-head",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="zero-initialise the head (preset: paper yes, modern no)",
    )
    g.add_argument("--min-lr", type=float, default=d.min_lr, help="learning rate at the end of the cosine")
    g = p.add_argument_group("run")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="epochs between held-out evaluations")
    add_run_flags(p, g, d)
    return p


IGNORED_CONFIG_KEYS = ("derived", "config")  # what a saved run configuration holds besides flag values
# Where a run goes, what it continues and where it is published belong to one invocation, not to the run's
# settings: a configuration file (a replayed run_config.json above all) never sets them; the command line does.
# (hub_private is kept from a file: it only ever makes a push that the command line asks for private.)
INVOCATION_KEYS = ("output_dir", "resume", "push_to_hub")


def parse_with_config(p: argparse.ArgumentParser, argv: list[str] | None) -> dict:
    """p.parse_args(argv) as a dict, with --config FILE's values as the defaults (command-line flags win).
    Values are checked as the flags' own: converted by their type, restricted to their choices, booleans as
    booleans. A saved run configuration lists in derived.from_preset the knobs that took its preset's value:
    those come from the preset in effect (its own, or --preset on the command line), not from the file."""
    import os
    import sys

    argv = sys.argv[1:] if argv is None else argv
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config")
    path = first.parse_known_args(argv)[0].config
    if path:
        actions = {a.dest: a for a in p._actions if a.dest not in ("help", "config")}
        raw = {k.replace("-", "_"): v for k, v in read_config_file(path).items()}
        from_preset = (
            set((raw.get("derived") or {}).get("from_preset", [])) if isinstance(raw.get("derived"), dict) else set()
        )
        values = {k: v for k, v in raw.items() if k not in IGNORED_CONFIG_KEYS and k not in from_preset}
        unknown = sorted(set(values) - set(actions))
        if unknown:
            raise UsageError(
                f"--config {path}: unknown keys {', '.join(unknown)} (keys are the flags' names; see --help)"
            )
        left = {k: values.pop(k) for k in INVOCATION_KEYS if k in values}
        said = [f"{k}={v}" for k, v in left.items() if v not in (None, False)]
        if said and os.environ.get("RANK", "0") == "0":
            print(
                f"--config {path}: not taken from the file ({', '.join(said)}); give them on the command line",
                file=sys.stderr,
            )
        p.set_defaults(**{k: flag_value(actions[k], v, path) for k, v in values.items()})
    values = vars(p.parse_args(argv))
    values.pop("config", None)
    return values


BUNDLED_CONFIGS = Path(__file__).parent / "configs"  # in the package: the wheel has them too


def config_file(path: str) -> Path:
    """A file, or the name of a bundled config (mpp/configs/NAME.yaml) when no such file exists here."""
    file = Path(path)
    if file.is_file():
        return file
    bundled = BUNDLED_CONFIGS / (path if path.endswith((".yaml", ".json")) else f"{path}.yaml")
    if file.name == path and bundled.is_file():
        return bundled
    names = ", ".join(sorted(f.stem for f in BUNDLED_CONFIGS.glob("*.yaml")))
    raise UsageError(f"--config {path}: no such file, nor a bundled config ({names})")


def read_config_file(path: str) -> dict:
    import json

    file = config_file(path)
    try:
        if file.suffix.lower() == ".json":
            values = json.loads(file.read_text())
        else:
            import yaml

            values = yaml.safe_load(file.read_text())
    except Exception as e:  # a syntax error, with where it is
        raise UsageError(
            f"--config {path}: not valid {'JSON' if file.suffix.lower() == '.json' else 'YAML'} "
            f"({str(e).splitlines()[0]})"
        ) from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values, got {type(values).__name__}")
    return values


BOOLEAN_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)


def flag_value(action: argparse.Action, value, path: str):
    """A config file's value for one flag, as the command line would have made it, and as strictly: a boolean flag
    takes true or false, a number flag a number (not a boolean), strings go through the flag's type (YAML reads 2e-4
    as a string), lists for nargs flags, one of its choices; null only where the flag's default is null."""
    name = "--" + action.dest.replace("_", "-")
    if value is None:
        if action.default is not None:
            raise UsageError(f"--config {path}: {name} cannot be null (its default is {action.default!r})")
        return None
    if isinstance(action, BOOLEAN_ACTIONS):
        if not isinstance(value, bool):
            raise UsageError(f"--config {path}: {name} takes true or false (a YAML/JSON boolean), got {value!r}")
        return value
    kind = {int: "an integer", float: "a number"}.get(action.type, "a string")
    multiple = action.nargs not in (None, "?")
    items = list(value) if multiple and isinstance(value, (list, tuple)) else [value]
    if not multiple and isinstance(value, (list, tuple, dict)):
        raise UsageError(f"--config {path}: {name} takes one value, got {value!r}")
    converted = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise UsageError(f"--config {path}: {name} takes {kind}, got {item!r}")
        try:
            converted.append(action.type(str(item)) if action.type is not None else str(item))
        except (TypeError, ValueError) as e:
            raise UsageError(f"--config {path}: {name} {item!r}: {e}") from None
    if isinstance(action.nargs, int) and len(converted) != action.nargs:
        raise UsageError(f"--config {path}: {name} {value!r}: takes {action.nargs} values, got {len(converted)}")
    value = converted if multiple else converted[0]
    for item in converted:
        if action.choices is not None and item not in action.choices:
            raise UsageError(
                f"--config {path}: {name} must be one of {', '.join(map(str, action.choices))}, got {item!r}"
            )
    return value


def parse_finetune_config(argv: list[str] | None = None):
    from mpp.training.finetune_config import FinetuneConfig, validate_finetune

    values = parse_with_config(build_finetune_parser(), argv)
    values["crop_scale"] = tuple(values["crop_scale"])
    cfg = FinetuneConfig(**values)
    validate_finetune(cfg)
    return cfg


def parse_config(argv: list[str] | None = None) -> PretrainConfig:
    values = parse_with_config(build_parser(), argv)
    for key in ("crop_scale", "mask_probs", "betas"):
        values[key] = tuple(values[key])
    cfg = PretrainConfig(**values)
    validate(cfg)
    return cfg


# Exit codes of the recipes besides 0: 2 bad invocation, 1 a run that failed (e.g. non-finite
# gradients), 75 (EX_TEMPFAIL) stopped by SIGTERM/SIGINT after writing a checkpoint: resume it.
EXIT_STOPPED = 75


def run_cli(main, argv: list[str] | None = None):
    """Call main(argv); a UsageError becomes one line on stderr and exit code 2, a RunError exit code 1."""
    from mpp.console import survive_closed_readers
    from mpp.training.guards import RunError

    survive_closed_readers()  # a closed pipe (| tee ended by Ctrl-C) must not end the run before its checkpoint
    try:
        return main(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        exit_cleanly(1)


def exit_cleanly(code: int = 0):
    """Leave without gloo's occasional abort at interpreter exit: tear the group down, flush, _exit."""
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
