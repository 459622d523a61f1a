"""Each flag is declared once, on its config field: every setting of a run has exactly one flag with its help, the
parsers are built from those fields, the experiments' argument lists are checked against them, and the command table
names every recipe."""

import dataclasses
from pathlib import Path

import pytest

from mpp.commands import COMMANDS
from mpp.commands.ablate import build_parser as build_ablate_parser
from mpp.commands.finetune import build_parser as build_finetune_parser
from mpp.commands.gap import build_parser as build_gap_parser
from mpp.commands.pretrain import build_parser
from mpp.experiments.ablate import AblateConfig
from mpp.experiments.gap import SETTINGS, GapConfig, make_config
from mpp.flags import FLAG, argv_for, flag_of, parser_default
from mpp.training.finetune_config import FinetuneConfig
from mpp.training.pretrain_config import PretrainConfig
from mpp.training.run_config import RunConfig

# Per config: the fields that are no flag, and the flags of its parser that are no field.
NOT_FLAGS = {
    RunConfig: {"derived"},  # filled in while a run starts, never given
    PretrainConfig: {"derived"},
    FinetuneConfig: {"derived"},
    GapConfig: {"eval_limit"},  # set by --quick
    AblateConfig: set(),
}
NOT_FIELDS = {"help", "config", "quick"}
RUN_PARSERS = [(PretrainConfig, build_parser), (FinetuneConfig, build_finetune_parser)]
PARSERS = [*RUN_PARSERS, (GapConfig, build_gap_parser), (AblateConfig, build_ablate_parser)]


@pytest.mark.parametrize("config_class", list(NOT_FLAGS))
def test_every_setting_is_a_flag_with_help(config_class):
    for f in dataclasses.fields(config_class):
        if f.name in NOT_FLAGS[config_class]:
            assert FLAG not in f.metadata, f"{config_class.__name__}.{f.name} is a flag: drop it from NOT_FLAGS"
            continue
        assert FLAG in f.metadata, f"{config_class.__name__}.{f.name} is not declared with flag()"
        assert f.metadata[FLAG]["help"].strip(), f"{config_class.__name__}.{f.name} has no help"


@pytest.mark.parametrize("config_class", [RunConfig, PretrainConfig, FinetuneConfig])
def test_every_run_setting_has_a_group(config_class):
    for f in dataclasses.fields(config_class):
        if f.name not in NOT_FLAGS[config_class]:
            assert f.metadata[FLAG]["group"], f"{config_class.__name__}.{f.name} has no --help group"


@pytest.mark.parametrize("config_class, build", PARSERS)
def test_the_parser_has_exactly_one_flag_per_setting(config_class, build):
    actions = [a for a in build()._actions if a.dest not in NOT_FIELDS]
    dests = [a.dest for a in actions]
    assert sorted(dests) == sorted({f.name for f in dataclasses.fields(config_class)} - NOT_FLAGS[config_class])
    flags = {f.name: f for f in dataclasses.fields(config_class) if f.name not in NOT_FLAGS[config_class]}
    for a in actions:
        assert a.option_strings[0] == flag_of(flags[a.dest])
        assert a.default == parser_default(flags[a.dest]), a.dest
        assert a.help, a.dest


def test_gap_flags_are_not_given_until_the_setting_fills_them_in():
    parsed = vars(build_gap_parser().parse_args([]))
    assert parsed.pop("setting") == "grey" and parsed.pop("resume") is False and not parsed.pop("quick")
    assert set(parsed.values()) == {None}
    for setting, values in SETTINGS.items():
        cfg = make_config(setting, **parsed)
        assert {k: getattr(cfg, k) for k in values} == values


def test_shown_defaults_and_one_way_switches():
    helps = {a.dest: a.help for a in build_ablate_parser()._actions}
    assert helps["seeds"].endswith("(default [0, 1, 2, 3, 4])") and helps["model"].endswith("(default test_vit)")
    gap_helps = {a.dest: a.help for a in build_gap_parser()._actions}
    assert "(default" not in gap_helps["img_size"] and gap_helps["model"].endswith("(default test_vit)")
    assert argv_for(AblateConfig, finetune=False, resume=True) == ["--no-finetune", "--resume"]
    assert argv_for(AblateConfig, finetune=True, resume=False) == []
    parsed = build_ablate_parser().parse_args(argv_for(AblateConfig, finetune=False, resume=True))
    assert parsed.finetune is False and parsed.resume is True


@pytest.mark.parametrize("config_class, build", RUN_PARSERS)
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
