"""--config FILE (YAML or JSON): sets any flag, the command line wins, a run's saved configuration
replays it, bad files are refused in one line; the shipped recipes/configs parse and validate."""
import json
from pathlib import Path

import pytest

from mpp.cli import parse_config, parse_finetune_config
from mpp.training.pretrain_config import PretrainConfig
from mpp.errors import UsageError

CONFIGS = sorted((Path(__file__).parents[1] / "recipes" / "configs").glob("*.yaml"))


def flags_of(cfg) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if k != "derived"}


def test_a_saved_run_configuration_replays_the_run(tmp_path):
    """run_config.json as a run writes it (PretrainConfig.to_dict, with its derived block) gives back the same
    configuration; a flag on the command line still wins."""
    argv = ["--model", "test_vit", "--img-size", "32", "--patch-size", "8", "--mask-probs", "1", "0", "0", "--lr", "3e-4",
            "--betas", "0.8", "0.95", "--grad-checkpointing", "--no-progress", "--target", "pixels_l2", "--decode", "pil"]
    original = parse_config(argv)
    saved = tmp_path / "run_config.json"
    saved.write_text(json.dumps({**original.to_dict(), "derived": {"run_dir": "runs/x", "global_batch": 128}}))
    replayed = parse_config(["--config", str(saved)])
    assert flags_of(replayed) == flags_of(original) != flags_of(PretrainConfig())
    assert parse_config(["--config", str(saved), "--lr", "1e-3"]).lr == 1e-3  # the command line wins


def test_yaml_takes_flag_names_and_the_flags_types(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("img-size: 56\npatch_size: 8\nbase_lr: 2e-4\nmask_probs: [0.8, 0.1, 0.1]\ncompile: true\nmax_steps: 10\n")
    cfg = parse_config(["--config", str(f)])
    assert (cfg.img_size, cfg.patch_size, cfg.base_lr, cfg.mask_probs, cfg.compile) == (56, 8, 2e-4, (0.8, 0.1, 0.1), True)
    assert isinstance(cfg.base_lr, float)  # YAML 1.1 reads 2e-4 as a string; the flag's type converts it
    ft = tmp_path / "ft.json"
    ft.write_text(json.dumps({"preset": "modern", "epochs": 3, "lr": 0.001}))
    fcfg = parse_finetune_config(["--config", str(ft), "--epochs", "5"])
    assert (fcfg.preset, fcfg.epochs, fcfg.lr) == ("modern", 5, 0.001)


@pytest.mark.parametrize("text, message", [
    ("img_sise: 32\n", "unknown keys img_sise"),
    ("target: colour\n", "--target must be one of"),
    ("mask_probs: [0.8, 0.2]\n", "takes 3 values"),
    ("img_size: big\n", "--img-size 'big'"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("img_size: [32\n", "not valid YAML"),
])
def test_bad_config_files_are_refused_in_one_line(tmp_path, text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(UsageError, match=message) as e:
        parse_config(["--config", str(f)])
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="no such file"):
        parse_config(["--config", str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_parse_and_validate(path):
    """A dry run of each shipped configuration: every key a flag, every value valid (nothing is loaded)."""
    cfg = parse_config(["--config", str(path)])
    assert cfg.model.startswith("vit_") and cfg.max_steps == 100_000 and cfg.img_size == 224
    if "paper" in path.name:  # Appendix B.1.2: lr 2e-4 at batch 4096, 10k warmup, 50% with 80/10/10, mean colour
        assert (cfg.base_lr, cfg.ref_batch, cfg.warmup_steps, cfg.mask_ratio, cfg.mask_probs, cfg.target) == \
            (2e-4, 4096, 10_000, 0.5, (0.8, 0.1, 0.1), "mean3bit")
        assert cfg.batch_size * 8 == 4096  # 8 GPUs, as its comment's command launches
