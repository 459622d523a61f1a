"""MkDocs hook: a `<!-- flags: COMMAND -->` line in a page becomes the table of that command's flags, read from
the command's own argparse parser (built from its config fields), so the page says what `--help` says."""

import argparse
import importlib
import re

from mpp.commands import COMMANDS

PLACEHOLDER = re.compile(r"^<!-- flags: (\w+) -->$", re.M)


def cell(text) -> str:
    """Text in a table cell, taken literally: no markdown emphasis from names like vit_*, no column break."""
    for char in ("\\", "|", "*", "_"):
        text = str(text).replace(char, "\\" + char)
    return text.replace("\n", " ")


def shown_default(action: argparse.Action) -> str:
    if action.default in (None, argparse.SUPPRESS) or isinstance(action, argparse._HelpAction):
        return ""
    default = list(action.default) if isinstance(action.default, tuple) else action.default
    return f"`{default}`"


def flags_table(command: str) -> str:
    """Markdown: one table per argument group of the command's parser, each flag with its default and help."""
    if command not in COMMANDS:
        raise ValueError(f"<!-- flags: {command} -->: no such command; one of {', '.join(COMMANDS)}")
    parser = importlib.import_module(COMMANDS[command].module).build_parser()
    out = []
    for group in parser._action_groups:  # argparse keeps its groups in --help order here
        rows = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if not rows:
            continue
        out += [f"**{group.title}**", "", "| flag | default | what |", "|---|---|---|"]
        for action in rows:
            names = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest}`"  # code: taken as it is
            choices = " {" + ",".join(map(str, action.choices)) + "}" if action.choices else ""
            what = (action.help or "").replace("%%", "%")
            out.append(f"| {names}{cell(choices)} | {shown_default(action)} | {cell(what)} |")
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, **kwargs) -> str:
    return PLACEHOLDER.sub(lambda m: flags_table(m.group(1)), markdown)
