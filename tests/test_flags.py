"""Each flag is declared once, on its config field: every setting of a run has exactly one flag with its help, the
parsers are built from those fields, the experiments' argument lists are checked against them, and the command table
names every recipe."""

import dataclasses
from pathlib import Path

import pytest

from mpp.commands import COMMANDS
from mpp.commands.finetune import build_parser as build_finetune_parser
from mpp.commands.pretrain import build_parser
from mpp.flags import FLAG, argv_for
from mpp.training.finetune_config import FinetuneConfig
from mpp.training.pretrain_config import PretrainConfig
from mpp.training.run_config import RunConfig

NOT_FLAGS = {"derived"}  # filled in while a run starts, never given
PARSERS = [(PretrainConfig, build_parser), (FinetuneConfig, build_finetune_parser)]


@pytest.mark.parametrize("config_class", [RunConfig, PretrainConfig, FinetuneConfig])
def test_every_setting_is_a_flag_with_help_and_a_group(config_class):
    for f in dataclasses.fields(config_class):
        if f.name in NOT_FLAGS:
            continue
        assert FLAG in f.metadata, f"{config_class.__name__}.{f.name} is not declared with flag()"
        assert f.metadata[FLAG]["help"].strip(), f"{config_class.__name__}.{f.name} has no help"
        assert f.metadata[FLAG]["group"], f"{config_class.__name__}.{f.name} has no --help group"


@pytest.mark.parametrize("config_class, build", PARSERS)
def test_the_parser_has_exactly_one_flag_per_setting(config_class, build):
    actions = [a for a in build()._actions if a.dest not in ("help", "config")]
    dests = [a.dest for a in actions]
    assert sorted(dests) == sorted({f.name for f in dataclasses.fields(config_class)} - NOT_FLAGS)
    defaults = {f.name: f.default for f in dataclasses.fields(config_class) if f.name not in NOT_FLAGS}
    for a in actions:
        assert a.option_strings[0] == "--" + a.dest.replace("_", "-")
        assert a.default == defaults[a.dest], a.dest
        assert a.help, a.dest


@pytest.mark.parametrize("config_class, build", PARSERS)
def test_the_shared_flags_keep_their_groups(config_class, build):
    groups = {a.dest: g.title for g in build()._action_groups for a in g._group_actions}
    for f in dataclasses.fields(RunConfig):
        assert groups[f.name] == f.metadata[FLAG]["group"], f.name
    assert groups["config"] == "run"


def test_an_argument_list_from_settings_parses_back_to_them():
    from mpp.commands.pretrain import parse_config

    settings = dict(img_size=32, patch_size=8, mask_probs=(0.7, 0.2, 0.1), progress=False, compile=True, seed=3)
    argv = argv_for(PretrainConfig, **settings)
    assert argv[:4] == ["--img-size", "32", "--patch-size", "8"] and "--no-progress" in argv and "--compile" in argv
    cfg = parse_config(argv)
    assert {k: getattr(cfg, k) for k in settings} == settings


def test_an_argument_list_refuses_a_name_that_is_no_flag():
    with pytest.raises(TypeError, match="--eval-every-steps"):
        argv_for(FinetuneConfig, eval_every_steps=10)  # a pretraining flag


def test_the_command_table_names_every_recipe():
    recipes = {p.name for p in (Path(__file__).parents[1] / "recipes").glob("*.py")}
    assert {c.recipe for c in COMMANDS.values()} == recipes
