"""--config FILE (YAML or JSON): sets any flag, the command line wins, a run's saved configuration
replays it, bad files are refused in one line; the bundled mpp/configs parse and validate."""

import json
import re
from pathlib import Path

import pytest
import torch

from mpp.commands.finetune import parse_config as parse_finetune_config
from mpp.commands.pretrain import parse_config
from mpp.errors import UsageError
from mpp.training.pretrain_config import PretrainConfig

CONFIGS = sorted((Path(__file__).parents[1] / "mpp" / "configs").glob("*.yaml"))


def flags_of(cfg) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if k != "derived"}


def test_a_saved_run_configuration_replays_the_run(tmp_path):
    """run_config.json as a run writes it (PretrainConfig.to_dict, with its derived block) gives back the same
    configuration; a flag on the command line still wins."""
    argv = [
        "--model",
        "test_vit",
        "--img-size",
        "32",
        "--patch-size",
        "8",
        "--mask-probs",
        "1",
        "0",
        "0",
        "--lr",
        "3e-4",
        "--betas",
        "0.8",
        "0.95",
        "--grad-checkpointing",
        "--no-progress",
        "--target",
        "pixels_l2",
        "--decode",
        "pil",
    ]
    original = parse_config(argv)
    saved = tmp_path / "run_config.json"
    saved.write_text(json.dumps({**original.to_dict(), "derived": {"run_dir": "runs/x", "global_batch": 128}}))
    replayed = parse_config(["--config", str(saved)])
    assert flags_of(replayed) == flags_of(original) != flags_of(PretrainConfig())
    assert parse_config(["--config", str(saved), "--lr", "1e-3"]).lr == 1e-3  # the command line wins


def test_yaml_takes_flag_names_and_the_flags_types(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(
        "img-size: 56\npatch_size: 8\nbase_lr: 2e-4\nmask_probs: [0.8, 0.1, 0.1]\ncompile: true\nmax_steps: 10\n"
    )
    cfg = parse_config(["--config", str(f)])
    assert (cfg.img_size, cfg.patch_size, cfg.base_lr, cfg.mask_probs, cfg.compile) == (
        56,
        8,
        2e-4,
        (0.8, 0.1, 0.1),
        True,
    )
    assert isinstance(cfg.base_lr, float)  # YAML 1.1 reads 2e-4 as a string; the flag's type converts it
    ft = tmp_path / "ft.json"
    ft.write_text(json.dumps({"preset": "modern", "epochs": 3, "lr": 0.001}))
    fcfg = parse_finetune_config(["--config", str(ft), "--epochs", "5"])
    assert (fcfg.preset, fcfg.epochs, fcfg.lr) == ("modern", 5, 0.001)


@pytest.mark.parametrize(
    "text, message",
    [
        ("img_sise: 32\n", "unknown keys img_sise"),
        ("target: colour\n", "--target must be one of"),
        ("mask_probs: [0.8, 0.2]\n", "takes 3 values"),
        ("img_size: big\n", "--img-size 'big'"),
        ("- 1\n- 2\n", "expected a mapping"),
        ("img_size: [32\n", "not valid YAML"),
    ],
)
def test_bad_config_files_are_refused_in_one_line(tmp_path, text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(UsageError, match=message) as e:
        parse_config(["--config", str(f)])
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="no such file"):
        parse_config(["--config", str(tmp_path / "missing.yaml")])


def test_a_bundled_config_is_found_by_name_from_anywhere(tmp_path, monkeypatch):
    """--config paper_vit_b16 reads the file the package ships (the wheel has it too); a local file of that
    name wins; a misspelt name is refused in one line that lists the bundled ones."""
    monkeypatch.chdir(tmp_path)
    assert parse_config(["--config", "paper_vit_b16"]) == parse_config(
        ["--config", str(CONFIGS[0].parent / "paper_vit_b16.yaml")]
    )
    (tmp_path / "paper_vit_b16").write_text("img_size: 98\n")
    assert parse_config(["--config", "paper_vit_b16"]).img_size == 98
    with pytest.raises(
        UsageError,
        match=r"--config paper_vit_b17: no such file, nor a bundled config \(paper_vit_b16, vit_s16_one_gpu\)$",
    ):
        parse_config(["--config", "paper_vit_b17"])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_parse_and_validate(path):
    """A dry run of each shipped configuration: every key a flag, every value valid (nothing is loaded)."""
    cfg = parse_config(["--config", str(path)])
    assert cfg.model.startswith("vit_") and cfg.max_steps == 100_000 and cfg.img_size == 224
    if "paper" in path.name:  # Appendix B.1.2: lr 2e-4 at batch 4096, 10k warmup, 50% with 80/10/10, mean colour
        assert (cfg.base_lr, cfg.ref_batch, cfg.warmup_steps, cfg.mask_ratio, cfg.mask_probs, cfg.target) == (
            2e-4,
            4096,
            10_000,
            0.5,
            (0.8, 0.1, 0.1),
            "mean3bit",
        )
        assert cfg.batch_size * 8 == 4096  # 8 GPUs, as its comment's command launches


@pytest.mark.parametrize(
    "text, message",
    [
        ("compile: 'false'\n", "--compile takes true or false (a YAML/JSON boolean), got 'false'"),
        ('streaming: "no"\n', "--streaming takes true or false (a YAML/JSON boolean), got 'no'"),
        ("progress: 0\n", "--progress takes true or false"),
        ("lr: true\n", "--lr takes a number, got True"),
        ("mask_probs: [0.8, true, 0.1]\n", "--mask-probs takes a number, got True"),
        ("img_size: 3.5\n", "--img-size 3.5: invalid literal for int()"),
        ("img_size: null\n", "--img-size cannot be null"),
        ("model: [vit_tiny_patch16_224]\n", "--model takes one value"),
    ],
)
def test_config_values_are_checked_as_strictly_as_the_command_line(tmp_path, text, message):
    """A string is not a boolean ('false' would turn compile on), a boolean is not a number (True would be lr 1.0)."""
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(UsageError, match=re.escape(message)) as e:
        parse_config(["--config", str(f)])
    assert "\n" not in str(e.value)
    j = tmp_path / "bad.json"
    j.write_text(json.dumps({"compile": "false"}))
    with pytest.raises(UsageError, match="--compile takes true or false"):
        parse_config(["--config", str(j)])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_a_boolean_a_file_turns_on_can_be_turned_off_on_the_command_line(path, tmp_path):
    assert parse_config(["--config", str(path)]).compile is True  # the shipped configs compile
    assert parse_config(["--config", str(path), "--no-compile"]).compile is False
    f = tmp_path / "on.yaml"
    f.write_text("streaming: true\nstrict_data: true\ngrad_checkpointing: true\nprogress: false\nmax_steps: 5\n")
    cfg = parse_config(
        ["--config", str(f), "--no-streaming", "--no-strict-data", "--no-grad-checkpointing", "--progress"]
    )
    assert (cfg.streaming, cfg.strict_data, cfg.grad_checkpointing, cfg.progress) == (False, False, False, True)
    f.write_text("compile: false\nhub_private: true\n")
    assert parse_config(["--config", str(f)]).compile is False


def test_replaying_a_run_configuration_reproduces_the_run_in_a_new_folder(hub, tmp_path, monkeypatch, capsys):
    """run_config.json of a run that was resumed (--resume auto) into --output-dir and pushed: the replay neither
    resumes, writes that folder nor pushes again; it trains anew in runs/<date-time> and ends with the same weights."""
    from safetensors.torch import load_file

    from mpp.commands.pretrain import main as pretrain_main

    first = tmp_path / "first"
    tiny = [
        "--dataset",
        "mnist5k",
        "--model",
        "test_vit",
        "--img-size",
        "28",
        "--patch-size",
        "7",
        "--batch-size",
        "8",
        "--max-steps",
        "4",
        "--log-every",
        "2",
        "--checkpoint-every",
        "2",
        "--no-progress",
        "--workers",
        "0",
        "--report-to",
        "none",
    ]
    assert (
        pretrain_main(
            [
                *tiny,
                "--output-dir",
                str(first),
                "--resume",
                "auto",
                "--push-to-hub",
                "someone/mpp-test",
                "--hub-private",
            ]
        )
        == 0
    )
    saved = json.loads((first / "run_config.json").read_text())
    assert (saved["output_dir"], saved["resume"], saved["push_to_hub"], saved["hub_private"]) == (
        str(first),
        "auto",
        "someone/mpp-test",
        True,
    )
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in first.iterdir() if p.is_file()}
    pushes = len(hub)
    capsys.readouterr()

    monkeypatch.chdir(tmp_path)
    assert pretrain_main(["--config", str(first / "run_config.json")]) == 0
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in first.iterdir() if p.is_file()} == before
    assert len(hub) == pushes  # not pushed again
    assert "not taken from the file (output_dir=" in capsys.readouterr().err
    (replay,) = (tmp_path / "runs").iterdir()
    replayed = json.loads((replay / "run_config.json").read_text())
    assert (replayed["output_dir"], replayed["resume"], replayed["push_to_hub"]) == (None, None, None)
    assert {k: v for k, v in replayed.items() if k not in INVOCATION} == {
        k: v for k, v in saved.items() if k not in INVOCATION
    }
    a, b = load_file(first / "model.safetensors"), load_file(replay / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same run again
    # given on the command line, they count; a push then stays private as the run's was
    again = parse_config(
        [
            "--config",
            str(first / "run_config.json"),
            "--output-dir",
            "elsewhere",
            "--resume",
            "auto",
            "--push-to-hub",
            "someone/b",
        ]
    )
    assert (again.output_dir, again.resume, again.push_to_hub, again.hub_private) == (
        "elsewhere",
        "auto",
        "someone/b",
        True,
    )


INVOCATION = ("output_dir", "resume", "push_to_hub", "derived")
