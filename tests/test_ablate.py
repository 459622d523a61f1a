"""recipes/ablate.py: one shared default, each setting one change away from it, the pretraining
commands change exactly that flag, verdicts from paired per-seed differences, --quick end to end."""

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from mpp.commands.pretrain import parse_config
from mpp.data.clipart import OPENCLIPART_DIR
from mpp.errors import UsageError
from mpp.experiments.ablate import (
    AXES,
    DEFAULT,
    FINDINGS,
    RANDOM,
    AblateConfig,
    all_settings,
    choose_settings,
    folder_of,
    gate_check,
    judge,
    pretrain_command,
    quick,
    setting_name,
)

ROOT = Path(__file__).parents[1]


def test_one_default_shared_by_every_axis():
    settings = all_settings()
    assert list(settings)[0] == "default" and settings["default"] == DEFAULT
    assert len(settings) == 1 + sum(len(v) for v in AXES.values()) == 10  # the default is not re-run per axis
    for name, setting in list(settings.items())[1:]:
        changed = {k for k in DEFAULT if setting[k] != DEFAULT[k]}
        assert len(changed) == 1, (name, changed)
    # the paper's setting is the default
    assert DEFAULT == {
        "target": "mean3bit",
        "mask_ratio": 0.5,
        "mask_probs": (0.8, 0.1, 0.1),
        "corrupt_at": "embedding",
        "length": 1.0,
    }
    lengths = sorted(
        s["length"]
        for s in settings.values()
        if s["target"] == "mean3bit"
        and s["mask_ratio"] == 0.5
        and s["mask_probs"] == (0.8, 0.1, 0.1)
        and s["corrupt_at"] == "embedding"
    )
    assert lengths == [0.25, 0.5, 1.0, 2.0]


def test_each_pretraining_changes_exactly_its_flag(tmp_path):
    cfg = AblateConfig(steps=800)
    parsed = {
        name: parse_config([str(a) for a in pretrain_command(cfg, s, 3, tmp_path / "x")[4:]]).to_dict()
        for name, s in all_settings().items()
    }
    base = parsed["default"]
    assert (base["target"], base["mask_ratio"], base["mask_probs"], base["corrupt_at"], base["max_steps"]) == (
        "mean3bit",
        0.5,
        (0.8, 0.1, 0.1),
        "embedding",
        800,
    )
    assert base["dataset"] == "colour-mix" and base["seed"] == 3
    length_flags = {"max_steps", "warmup_steps", "log_every", "checkpoint_every"}  # a schedule follows the length
    expected = {
        "target": {"target"},
        "mask_ratio": {"mask_ratio"},
        "mask_probs": {"mask_probs"},
        "corrupt_at": {"corrupt_at"},
        "length": length_flags,
    }
    for axis_values in AXES.values():
        for key, value in axis_values:
            cfg_dict = parsed[setting_name(key, value)]
            differing = {k for k in base if cfg_dict[k] != base[k]}
            assert differing == expected[key], (key, value, differing)
    assert (
        parsed[setting_name("length", 0.25)]["max_steps"] == 200
        and parsed[setting_name("length", 2.0)]["max_steps"] == 1600
    )


def synthetic(values_by_setting: dict[str, list[float]], metric="linear_10shot_mean") -> dict:
    """per_seed[seed][setting]['test'][metric] from one list of per-seed values per setting."""
    seeds = range(len(next(iter(values_by_setting.values()))))
    return {s: {name: {"test": {metric: v[s]}} for name, v in values_by_setting.items()} for s in seeds}


def test_verdicts_from_paired_per_seed_differences():
    names = list(all_settings())
    base = {n: [0.50, 0.60, 0.55] for n in names}  # seeds differ a lot; pairing removes that
    values = {
        **base,
        "default": [0.52, 0.62, 0.57],
        setting_name("target", "mean3bit_4x4"): [
            0.50,
            0.605,
            0.555,
        ],  # a1: default better by 0.015-0.02 each seed: agrees
        setting_name("target", "pixels_l2"): [0.55, 0.65, 0.60],  # a2: default worse by 0.03 each seed: disagrees
        setting_name("mask_ratio", 0.15): [0.53, 0.60, 0.57],  # b: +- mixed: inconclusive
        setting_name("mask_probs", (1.0, 0.0, 0.0)): [0.52, 0.62, 0.57],  # c: identical: inconclusive
        setting_name("length", 0.25): [0.40, 0.50, 0.45],  # d: gains per doubling 0.1, then 0.01: diminishing
        setting_name("length", 0.5): [0.50, 0.60, 0.55],
        setting_name("length", 2.0): [0.53, 0.63, 0.58],
    }
    out = judge(synthetic(values), "linear_10shot_mean")
    verdicts = {k: f["verdict"] for k, f in out["findings"].items()}
    assert verdicts == {"a1": "agrees", "a2": "disagrees", "b": "inconclusive", "c": "inconclusive", "d": "agrees"}
    d = out["findings"]["d"]["difference"]
    assert d["mean"] == pytest.approx(0.09) and d["std"] == pytest.approx(0.0, abs=1e-12)  # (0.10) - (0.01) every seed
    assert out["findings"]["a2"]["difference"]["mean"] == pytest.approx(-0.03)
    # growing returns (the second doubling gains more) disagrees with the paper
    values[setting_name("length", 2.0)] = [0.65, 0.75, 0.70]  # +0.13 each seed after +0.10
    assert judge(synthetic(values), "linear_10shot_mean")["findings"]["d"]["verdict"] == "disagrees"
    assert {f.key for f in FINDINGS} == {"a1", "a2", "b", "c", "d"}


def test_no_verdict_unless_the_default_beats_a_random_encoder():
    """The gate: the default must beat the random-init encoder with a paired interval above 0 (on the
    split asked); otherwise every finding is 'not judged', whatever its own interval says."""
    names = list(all_settings())
    values = {n: [0.50, 0.60, 0.55] for n in names}
    values["default"] = [0.52, 0.62, 0.57]  # a1 below would agree: default beats the 4x4 target every seed
    values[setting_name("target", "mean3bit_4x4")] = [0.50, 0.605, 0.555]
    values[RANDOM] = [0.51, 0.63, 0.55]  # default - random: +0.01, -0.01, +0.02: covers 0
    per_seed = synthetic(values)
    for seed in per_seed:  # the gate reads validation
        for name in per_seed[seed]:
            per_seed[seed][name]["validation"] = per_seed[seed][name]["test"]
    closed = gate_check(per_seed, "linear_10shot_mean")
    assert not closed["passed"] and closed["difference"]["covers_zero"]
    verdicts = {k: f["verdict"] for k, f in judge(per_seed, "linear_10shot_mean", gate=closed)["findings"].items()}
    assert set(verdicts.values()) == {"not judged"}
    for seed, v in zip(per_seed, [0.40, 0.50, 0.45]):  # the random encoder 0.12 below the default every seed
        per_seed[seed][RANDOM]["validation"] = {"linear_10shot_mean": v}
    opened = gate_check(per_seed, "linear_10shot_mean")
    assert opened["passed"] and opened["difference"]["mean"] == pytest.approx(0.12)
    assert judge(per_seed, "linear_10shot_mean", gate=opened)["findings"]["a1"]["verdict"] == "agrees"


@pytest.mark.slow
@pytest.mark.skipif(not OPENCLIPART_DIR.exists(), reason="apt-get install openclipart-png")
def test_ablate_quick(installed_wheel, tmp_path):
    """The experiment as a user installs it: `python -m mpp ablate` from the wheel, outside the checkout."""
    out, runs = tmp_path / "results", tmp_path / "runs"
    proc = installed_wheel("-m", "mpp", "ablate", "--quick", "--output-dir", out, "--runs-dir", runs, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "ablation.json").read_text())
    assert list(report["summary"]) == [
        *all_settings(),
        "random-init encoder",
    ]  # every setting, then the floor they must beat
    assert set(report["metrics"]) == {
        f"{m}_{r}" for m in ("knn20", "linear_5shot", "linear_10shot") for r in ("cls", "mean")
    }
    for name, splits in report["summary"].items():
        for split in ("validation", "test"):
            assert all(math.isfinite(v["mean"]) and 0 <= v["mean"] <= 1 for v in splits[split].values()), name
    assert set(report["findings"]) == {"a1", "a2", "b", "c", "d"}
    assert not report["gate"]["passed"]  # one seed gives no interval: the gate cannot pass
    assert all(f["verdict"] == "not judged" for f in report["findings"].values())
    assert {"majority", "pixels_knn20", "pixels_linear_10shot"} <= set(report["floors"]["test"]) and RANDOM in report[
        "summary"
    ]
    assert json.loads((out / "ablation_protocol.json").read_text())["metric"] == "linear_10shot_mean"
    ft = report["finetune"]
    assert ft["arms"][0] == "default" and ft["arms"][-1] == "scratch" and report["best_setting"] in report["summary"]
    assert all(0 <= r["test_top1"] <= 1 for arm in ft["per_seed"].values() for r in arm.values())
    assert (
        report["git"] == {"commit": None, "dirty": None} and report["versions"]["mpp"]
    )  # an installed wheel: no checkout
    assert report["command"].startswith("python -m mpp ablate --quick")
    md = (out / "ablation.md").read_text()
    assert (
        "| a1 |" in md
        and "**not judged**" in md
        and "Gate NOT passed" in md
        and "ablation.png" in md
        and "## Fine-tuning" in md
    )
    assert "(best)" not in md and "length 100% → 200%" in md
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the pretrainings ran in one process, one after another: the last one's weights must equal those
    # of the same command in a fresh process (state leaking from run to run would show)
    from mpp.models.weights import load_tensors

    last = setting_name("length", 2.0)
    assert list(all_settings())[-1] == last
    cmd = pretrain_command(quick(AblateConfig()), all_settings()[last], 0, tmp_path / "again", runs / "pretrain_images")
    again = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert again.returncode == 0, again.stderr[-2000:]
    ours = load_tensors(runs / "seed0" / f"{folder_of(last)}_s4" / "model.safetensors")
    fresh = load_tensors(tmp_path / "again" / "model.safetensors")
    assert ours.keys() == fresh.keys() and all(ours[k].equal(fresh[k]) for k in ours)


def test_a_resumed_experiment_keeps_finished_stages_and_reruns_the_rest(tmp_path):
    """--resume: a finished pretraining (model.safetensors) or fine-tuning (results.json) is kept; a stage
    stopped half-way (a fine-tuning with only best.safetensors) is removed and run again."""
    from mpp.experiments.harness import reusing

    done_pretrain, done_finetune, half, fresh = (tmp_path / n for n in ("pre", "ft", "half", "new"))
    for folder, files in [
        (done_pretrain, ["model.safetensors"]),
        (done_finetune, ["best.safetensors", "model.safetensors", "results.json"]),
        (half, ["best.safetensors", "model.safetensors"]),
    ]:
        folder.mkdir()
        for f in files:
            (folder / f).write_text("x")
    ran, reused = [], []

    def fake_run(cmd, log):
        out = Path(cmd[cmd.index("--output-dir") + 1])
        assert not out.exists()  # a half-written run folder is gone before the stage runs again
        ran.append(out.name)
        return 1.0

    run = reusing(fake_run, reused)
    for out in (done_pretrain, done_finetune, half, fresh):
        run(["python", "recipes/x.py", "--output-dir", str(out)], tmp_path / "log")
    assert ran == ["half", "new"] and reused == [str(done_pretrain), str(done_finetune)]


def test_findings_whose_settings_were_left_out_are_not_run():
    """--settings runs a subset: a finding that needs a setting left out is 'not run', the others are judged
    as with every setting, and a misspelt setting is refused before any work."""
    kept = {"default": [0.52, 0.62, 0.57], setting_name("target", "mean3bit_4x4"): [0.50, 0.605, 0.555]}
    out = judge(synthetic(kept), "linear_10shot_mean")
    verdicts = {k: f["verdict"] for k, f in out["findings"].items()}
    assert verdicts == {"a1": "agrees", "a2": "not run", "b": "not run", "c": "not run", "d": "not run"}
    assert out["findings"]["a2"]["difference"] is None and out["observations"] == {}
    assert list(choose_settings(["target_pixels_l2", "rate 15%"])) == ["default", "target pixels_l2", "rate 15%"]
    with pytest.raises(
        UsageError, match="--settings 'rate_20pc' is not a setting; choose from: default, target_mean3bit_4x4"
    ):
        choose_settings(["rate_20pc"])
