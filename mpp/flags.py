"""Dataclass fields that are also command-line flags: each flag is declared once, on its config field.

    batch_size: int = flag(128, help="images per device per micro-batch", group="length")

The field's name gives the flag (--batch-size), its annotation the argparse type (int | None -> int, a bool ->
--x/--no-x, tuple[float, float] -> two floats), its default the parser's default; flag() adds the help text,
the --help group and whatever argparse needs besides (choices, metavar, a one-way switch's action="store_true").
From such a class come the parser (add_flags) and, for code that launches a command, its argument list (argv_for),
so the three cannot drift apart. Help texts are argparse's: a literal % is written %%.

Three options of flag() serve the experiment commands: show_default ends the help with "(default ...)",
parser_default gives the parser another default than the field's (gap's None, "not given", until its --setting fills
the field in), and flag_name names a flag that is not the field's name (--no-finetune for finetune).
"""

import argparse
import dataclasses
import types
import typing

FLAG = "flag"  # the key of a field's metadata that makes it a flag


def flag(
    default=dataclasses.MISSING,
    *,
    help: str,
    group: str | None = None,
    show_default: bool = False,
    parser_default=dataclasses.MISSING,
    flag_name: str | None = None,
    default_factory=dataclasses.MISSING,
    **argparse_options,
):
    """A dataclass field declared as a command-line flag. argparse_options (action, choices, metavar, nargs, type)
    are passed on to add_argument; type and nargs are otherwise read from the field's annotation.
    show_default: the help ends with " (default X)", X the field's default (a tuple shown as a list).
    parser_default: the parser's default when it is not the field's (e.g. None: not given, filled in later).
    flag_name: the flag when it is not the field's name (--no-finetune, with action="store_false").
    default_factory: as dataclasses.field's (such a field needs a parser_default)."""
    metadata = {"help": help, "group": group, **argparse_options}
    if show_default:
        metadata["show_default"] = True
    if parser_default is not dataclasses.MISSING:
        metadata["parser_default"] = parser_default
    if flag_name is not None:
        metadata["flag_name"] = flag_name
    return dataclasses.field(default=default, default_factory=default_factory, metadata={FLAG: metadata})


def with_default(config_class, name: str, default):
    """The flag `name` of config_class (a base class) again, with another default: a subclass's own default for a
    shared flag, its help and group kept."""
    inherited = {f.name: f for f in dataclasses.fields(config_class)}[name]
    return dataclasses.field(default=default, metadata=inherited.metadata)


def option(name: str) -> str:
    """The flag of a field: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def flag_of(f: dataclasses.Field) -> str:
    """The flag of a flag field: its flag_name if it has one, else option(its name)."""
    return f.metadata[FLAG].get("flag_name") or option(f.name)


def parser_default(f: dataclasses.Field):
    """The parser's default for a flag field: its parser_default if it has one, else the field's default."""
    return f.metadata[FLAG].get("parser_default", f.default)


def flag_fields(config_class) -> list[dataclasses.Field]:
    """The fields of config_class that are flags, in --help order: the class's own before those it inherits
    (a command's own flags come first, the flags every run shares after them)."""
    inherited = {
        f.name for base in config_class.__mro__[1:] if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)
    }
    flags = [f for f in dataclasses.fields(config_class) if FLAG in f.metadata]
    return [f for f in flags if f.name not in inherited] + [f for f in flags if f.name in inherited]


def argparse_options(f: dataclasses.Field) -> dict:
    """add_argument's keywords for one flag field."""
    options = dict(f.metadata[FLAG])
    for key in ("group", "show_default", "parser_default", "flag_name"):
        options.pop(key, None)
    if f.metadata[FLAG].get("show_default"):
        shown = list(f.default) if isinstance(f.default, tuple) else f.default
        options["help"] += f" (default {shown})".replace("%", "%%")
    if "flag_name" in f.metadata[FLAG]:
        options["dest"] = f.name
    kind = _without_none(f.type)
    if kind is bool:
        options.setdefault("action", argparse.BooleanOptionalAction)
    elif typing.get_origin(kind) is tuple:
        items = typing.get_args(kind)
        options.setdefault("type", items[0])
        options.setdefault("nargs", "+" if items[-1] is Ellipsis else len(items))
    elif kind is not str:  # strings stay argparse's default (no type), as a config file's values are checked
        options.setdefault("type", kind)
    options["default"] = parser_default(f)
    return options


def add_flags(
    parser: argparse.ArgumentParser, config_class, names: list[str] | None = None
) -> dict[str, argparse._ArgumentGroup]:
    """Adds one flag per flag field of config_class, in argument groups made in the order they first appear;
    returns the groups by title, for flags that are no field (--config). names: only these flags, in this order
    (a parser that places flags which are no field, such as --quick, among the fields' adds them in parts)."""
    by_name = {f.name: f for f in flag_fields(config_class)}
    groups = {}
    for f in flag_fields(config_class) if names is None else [by_name[n] for n in names]:
        title = f.metadata[FLAG]["group"]
        if title not in groups:
            groups[title] = parser.add_argument_group(title) if title else parser
        groups[title].add_argument(flag_of(f), **argparse_options(f))
    return groups


def values_of(config_class, parsed: dict) -> dict:
    """Parsed flag values as config_class holds them: nargs flags give lists, the config keeps tuples."""
    tuples = {f.name for f in dataclasses.fields(config_class) if typing.get_origin(_without_none(f.type)) is tuple}
    return {k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in parsed.items()}


def argv_for(config_class, **values) -> list[str]:
    """The arguments that give these flag values, in the order given (a bool is --x or --no-x, or a one-way
    switch's flag when the value is the one it sets and nothing otherwise; a tuple or list its items, a value its
    str()). A name that is no flag of config_class is refused here, not by a launched run."""
    fields = {f.name: f for f in dataclasses.fields(config_class) if FLAG in f.metadata}
    argv = []
    for name, value in values.items():
        if name not in fields:
            raise TypeError(f"{config_class.__name__} has no flag {option(name)} ({name!r})")
        switch = {"store_true": True, "store_false": False}.get(fields[name].metadata[FLAG].get("action"))
        if switch is not None:
            argv += [flag_of(fields[name])] if value == switch else []
        elif _without_none(fields[name].type) is bool:
            argv.append(option(name) if value else "--no-" + option(name)[2:])
        elif isinstance(value, (tuple, list)):
            argv += [option(name), *map(str, value)]
        else:
            argv += [option(name), str(value)]
    return argv


def _without_none(annotation):
    """int | None -> int; other annotations as they are."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(kinds) == 1:
            return kinds[0]
    return annotation
