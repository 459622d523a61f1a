"""Runs from Python (a notebook, a script): mpp.pretrain(...) and mpp.finetune(...).

Each takes the settings of its command line, as a config object (PretrainConfig, FinetuneConfig), as
keyword arguments named like the flags (img_size=28 for --img-size 28), or both (the keywords win).
They are checked exactly as the command line checks them, by its own parser and validation: a bad
value raises mpp.errors.UsageError (a ValueError) naming the flag, before anything is built. A run
happens in this process and returns a RunResult; nothing calls sys.exit.

    run = mpp.pretrain(dataset="mnist5k", max_steps=200, output_dir="runs/notebook")
    run.run_dir, run.summary["steps"]
    tuned = mpp.finetune(init=run.run_dir / "model.safetensors", dataset="mnist5k", eval_split="train")
"""

import argparse
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

from mpp.config_files import BOOLEAN_ACTIONS
from mpp.errors import UsageError
from mpp.flags import values_of


@dataclass
class RunResult:
    run_dir: Path
    summary: dict  # summary.json: steps, unreadable images; pretraining: wall time, images/s; fine-tuning: final top-1
    results: dict | None = None  # fine-tuning: results.json (top-1 per evaluation, best epoch, test top-1)
    stopped_by: str | None = (
        None  # a signal (e.g. SIGINT, interrupting a notebook) stopped it at a checkpoint: resume="auto" continues
    )


def pretrain(config=None, /, **settings) -> RunResult:
    """One MPP pretraining run in this process, as `python -m mpp pretrain` runs it.

    `config` is a PretrainConfig, `settings` the flags as keywords (img_size=28 for --img-size 28; they win over
    `config`). Both are checked as the command line checks them: a bad value raises mpp.errors.UsageError (a
    ValueError) naming the flag, before anything is built. Returns a RunResult; its run_dir is a timm hub folder
    that MPP.from_pretrained(run.run_dir) and timm.create_model("local-dir:...") load.

        run = mpp.pretrain(dataset="mnist5k", max_steps=200, output_dir="runs/notebook")
    """
    from mpp.commands.pretrain import build_parser
    from mpp.training.pretrain import pretrain as run_pretraining
    from mpp.training.pretrain_config import PretrainConfig, validate

    cfg = resolve_config(build_parser(), PretrainConfig, validate, config, settings, "mpp.pretrain")
    result = run_pretraining(cfg)
    return RunResult(result.run_dir, read_summary(result.run_dir), stopped_by=result.stopped_by)


def finetune(config=None, /, **settings) -> RunResult:
    """One fine-tuning run in this process, as `python -m mpp finetune` runs it.

    `config` is a FinetuneConfig, `settings` the flags as keywords (they win over `config`), checked as the
    command line checks them (mpp.errors.UsageError before anything is built). Returns a RunResult whose results
    holds results.json (top-1 per evaluation, the best epoch, test top-1), or None when a signal stopped the run.

        tuned = mpp.finetune(init="runs/notebook/model.safetensors", dataset="fashion-mnist", train_per_class=100)
    """
    from mpp.commands.finetune import build_parser
    from mpp.training.finetune import finetune as run_finetuning
    from mpp.training.finetune_config import FinetuneConfig, validate_finetune

    cfg = resolve_config(build_parser(), FinetuneConfig, validate_finetune, config, settings, "mpp.finetune")
    results = run_finetuning(cfg)
    run_dir = Path(cfg.derived["run_dir"])
    stopped_by = results.get("stopped_by")
    return RunResult(run_dir, read_summary(run_dir), None if stopped_by else results, stopped_by)


def read_summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def resolve_config(parser: argparse.ArgumentParser, config_class, validate, config, settings: dict, caller: str):
    """The config a command line with these settings would give: the config object's values, then the
    keywords, become flags that the command's own parser reads; then the command's validation."""
    if config is not None and not isinstance(config, config_class):
        raise TypeError(f"{caller} takes a {config_class.__name__} (or keywords only), got {type(config).__name__}")
    given = (
        {f.name: getattr(config, f.name) for f in fields(config) if f.name != "derived"} if config is not None else {}
    )
    given.update(settings)

    def refuse(message: str):  # argparse would print and exit
        raise UsageError(f"{caller}: {message}")

    parser.error = refuse
    values = vars(parser.parse_args(as_flags(parser, given, caller)))
    values.pop("config", None)
    cfg = config_class(**values_of(config_class, values))
    try:
        validate(cfg)
    except UsageError as e:
        raise UsageError(f"{caller}: {e}") from None
    return cfg


def as_flags(parser: argparse.ArgumentParser, settings: dict, caller: str) -> list[str]:
    """settings {dest: value} -> the command-line arguments that give them; values equal to a flag's default are left
    out."""
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    argv = []
    for name, value in settings.items():
        action = actions.get(name)
        if action is None:
            raise UsageError(
                f"{caller}: unknown setting {name!r}; the settings are its flags' names: {', '.join(sorted(actions))}"
            )
        flag = action.option_strings[0]
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if value is None:
            if action.default is None:
                continue
            raise UsageError(f"{caller}: {name} cannot be None (the default of {flag} is {action.default!r})")
        if isinstance(action, BOOLEAN_ACTIONS):
            if not isinstance(value, bool):
                raise UsageError(f"{caller}: {name} takes True or False, got {value!r}")
            if value == action.default:
                continue
            if isinstance(action, argparse.BooleanOptionalAction):  # option_strings: --x, --no-x
                argv.append(action.option_strings[0 if value else 1])
            else:  # store_true (const True) or store_false (const False): the other value is the default
                argv.append(flag)
            continue
        if isinstance(value, bool):
            raise UsageError(
                f"{caller}: {name} takes {'a string' if action.type is None else action.type.__name__}, got {value!r}"
            )
        if value == action.default or (
            isinstance(value, (list, tuple))
            and isinstance(action.default, (list, tuple))
            and list(value) == list(action.default)
        ):
            continue
        if action.nargs not in (None, "?"):
            if not isinstance(value, (list, tuple)):
                raise UsageError(f"{caller}: {name} takes a list of {action.nargs} values, got {value!r}")
            argv += [flag, *map(str, value)]
            continue
        if isinstance(value, (list, tuple, dict, set)) or (action.type is None and not isinstance(value, str)):
            raise UsageError(
                f"{caller}: {name} takes one {'string' if action.type is None else action.type.__name__}, got {value!r}"
            )
        argv.append(f"{flag}={value}")  # one token: a value that starts with '-' stays a value
    return argv
