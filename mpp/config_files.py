"""--config FILE/NAME of the training commands: a YAML or JSON file (or a bundled one by name) of flag values that
become the parser's defaults, checked as strictly as the command line checks them."""

import argparse
import sys
from pathlib import Path

from mpp.errors import UsageError

CONFIG_HELP = (
    "YAML or JSON file of flag values (keys are the flags' names, e.g. img_size or img-size; booleans as true/false, "
    "with --no-X on the command line to turn one off); flags on the command line win. A run's run_config.json "
    "replays that run in a new folder: where it went (output_dir), --resume and --push-to-hub are taken from the "
    "command line only, and its 'derived' block is ignored. Bundled examples by name: paper_vit_b16, vit_s16_one_gpu "
    "(the files are in mpp/configs/)"
)


def add_config_flag(group) -> None:
    """--config, the one flag of a training command that is no setting of the run."""
    group.add_argument("--config", default=None, help=CONFIG_HELP)


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
