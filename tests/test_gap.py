"""recipes/gap.py: the stage commands give both pretrainings the same budget and optimiser and every
fine-tuning arm the same settings but its init and lr; lr selection looks at validation only; the
statistics pair seeds; disjoint label spaces; --quick end to end; bad invocations refused early."""

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from mpp.cli import run_cli
from mpp.commands.finetune import parse_config as parse_finetune_config
from mpp.commands.pretrain import parse_config
from mpp.data.builtin import FASHION_MNIST_DIR
from mpp.data.clipart import OPENCLIPART_DIR
from mpp.experiments import harness as experiment
from mpp.experiments.gap import INITS, SETTINGS, finetune_command, make_config, pretrain_commands, quick, summarise

ROOT = Path(__file__).parents[1]
DATA = {"colour": OPENCLIPART_DIR, "grey": FASHION_MNIST_DIR}


def args_of(cmd: list[str]) -> list[str]:
    return [str(a) for a in cmd[4:]]  # after the interpreter, -m mpp and the command


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_both_pretrainings_get_the_same_images_budget_and_optimiser(setting, tmp_path):
    cfg = make_config(setting)
    cmds = pretrain_commands(cfg, seed=1, root=tmp_path)
    assert cmds["mpp"][1:4] == ["-m", "mpp", "pretrain"] and cmds["supervised"][1:4] == ["-m", "mpp", "finetune"]
    mpp = parse_config(args_of(cmds["mpp"]))
    sup = parse_finetune_config(args_of(cmds["supervised"]))
    assert (mpp.dataset, mpp.split) == (sup.dataset, sup.train_split) == (cfg.upstream, "train")
    assert sup.init == "scratch" and sup.train_per_class is None and sup.train_fraction is None  # every upstream image
    pairs = [
        ("model", "model"),
        ("img_size", "img_size"),
        ("patch_size", "patch_size"),
        ("seed", "seed"),
        ("max_steps", "max_steps"),
        ("batch_size", "batch_size"),
        ("grad_accum", "grad_accum"),
        ("crop_scale", "crop_scale"),
        ("hflip", "hflip"),
        ("min_lr", "min_lr"),
    ]
    for a, b in pairs:
        assert getattr(mpp, a) == getattr(sup, b), a
    assert mpp.max_steps == cfg.pretrain_steps and mpp.batch_size == cfg.pretrain_batch
    # the optimiser: AdamW at the same peak lr, warmup, decay, clipping; torch's AdamW betas are MPP's
    assert sup.resolved("opt") == "adamw" and mpp.betas == (0.9, 0.999)
    for key in ("lr", "warmup_steps", "weight_decay", "clip_grad"):
        assert getattr(mpp, key) == sup.resolved(key), key
    # nothing the supervised arm has on top: no smoothing, mixing, drop path, RandAugment, layer decay
    assert [
        sup.resolved(k) for k in ("label_smoothing", "mixup", "cutmix", "drop_path", "auto_augment", "layer_decay")
    ] == [0, 0, 0, 0, None, None]
    assert sup.eval_every > cfg.pretrain_steps  # upstream validation is never looked at during training


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_finetuning_arms_differ_only_in_init_and_lr(setting, tmp_path):
    cfg = make_config(setting)
    configs = {}
    for arm in INITS:
        init = "scratch" if arm == "scratch" else str(tmp_path / arm / "model.safetensors")
        cmd = finetune_command(cfg, seed=2, init=init)
        configs[arm] = parse_finetune_config(
            args_of(cmd) + ["--preset", "modern", "--lr", "0.03", "--epochs", "7", "--output-dir", str(tmp_path / arm)]
        ).to_dict()
    for arm in ("mpp", "supervised"):
        differing = {k for k in configs[arm] if configs[arm][k] != configs["scratch"][k]}
        assert differing == {"init", "output_dir"}, differing
    c = configs["scratch"]
    assert (c["dataset"], c["train_split"], c["eval_split"], c["test_split"]) == (
        cfg.downstream,
        "train",
        "validation",
        "test",
    )
    assert (c["epochs"], c["eval_every"], c["seed"], c["subset_seed"], c["train_per_class"]) == (
        7,
        cfg.eval_every,
        2,
        2,
        cfg.train_per_class,
    )
    assert c["preset"] == "modern" and c["opt"] == "adamw"


def fake_finetune(scores: dict):
    """run_stage stand-in: writes the results a fine-tuning at --lr would, from scores[lr] = (val, test)."""
    calls = []

    def run(cmd, log):
        lr, out = float(experiment.option_value(cmd, "--lr")), Path(experiment.option_value(cmd, "--output-dir"))
        out.mkdir(parents=True)
        val, test = scores[lr]
        (out / "results.json").write_text(
            json.dumps(
                {
                    "best_val_top1": val,
                    "best_epoch": 7,
                    "test_top1": test,
                    "config": {"epochs": 10},
                    "history": [{"epoch": 7, "top1": val}],
                }
            )
        )
        (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "train_acc": 0.9}) + "\n")
        calls.append(lr)
        return 0.0

    return run, calls


def test_the_lr_is_chosen_on_validation_never_on_test(tmp_path):
    run, calls = fake_finetune({0.01: (0.60, 0.90), 0.03: (0.70, 0.50), 0.1: (0.65, 0.95)})
    picked = experiment.finetune_over_grid(
        ["python", "finetune.py"], (0.01, 0.03, 0.1), tmp_path, tmp_path / "logs", "arm", run=run
    )
    assert calls == [0.01, 0.03, 0.1]
    assert picked["chosen_lr"] == 0.03 and picked["test_top1"] == 0.50 and picked["best_val_top1"] == 0.70
    assert set(picked["by_lr"]) == {"0.01", "0.03", "0.1"} and picked["train_acc_last"] == 0.9


def test_differences_pair_the_seeds():
    # scratch varies a lot across seeds, MPP is always 0.02-0.03 above it: paired, the gain is clear;
    # unpaired (e.g. comparing means with the seeds' spread) it would not be
    scratch = [0.50, 0.70, 0.60]
    mpp = [0.52, 0.73, 0.625]
    sup = [0.80, 0.60, 0.70]
    per_seed = {
        s: {
            arm: {"test_top1": v[i], "best_val_top1": v[i], "knn20_mean": v[i], "chosen_lr": 0.1, "best_epoch": 5}
            for arm, v in (("scratch", scratch), ("mpp", mpp), ("supervised", sup))
        }
        for i, s in enumerate((0, 1, 2))
    }
    out = summarise(per_seed)
    gain = out["differences"]["MPP − scratch"]["test_top1"]
    assert gain["mean"] == pytest.approx(0.025) and gain["std"] == pytest.approx(0.005)
    assert gain["covers_zero"] is False and "excludes 0" in gain["phrase"]
    behind = out["differences"]["supervised − MPP"]["knn20_mean"]
    assert behind["covers_zero"] is True  # +0.28, -0.13, +0.075
    assert out["summary"]["scratch"]["test_top1"]["std"] == pytest.approx(0.1)  # ddof=1
    assert "chosen_lr" not in out["summary"]["mpp"]


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_label_spaces_are_disjoint(setting):
    from mpp.experiments.gap import label_spaces

    if not DATA[setting].exists():
        pytest.skip(f"{DATA[setting]} not installed")
    spaces = label_spaces(make_config(setting))
    assert spaces["disjoint"] and len(spaces["upstream"]) >= 2 and len(spaces["downstream"]) >= 2


@pytest.fixture()
def gap_main(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    import gap as recipe  # recipes/gap.py

    return recipe.main


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--setting", "grey", "--shots", "50", "--train-per-class", "20"],
            "--shots 50 is more than the 20 labelled images per class",
        ),
        (["--setting", "sepia"], "--setting 'sepia' is not one of: grey, colour"),
        (["--presets", "paper", "fancy"], "--presets must be distinct names among paper, modern"),
        (["--paper-lr-grid", "0.1", "0.1"], "--paper-lr-grid needs distinct positive learning rates"),
        (["--modern-lr-grid", "0", "0.1"], "--modern-lr-grid needs distinct positive learning rates"),
        (["--grid-extensions", "-1"], "--grid-extensions and --budget-doublings must not be negative"),
        (["--seeds", "1", "1"], "--seeds must be distinct"),
    ],
)
def test_gap_refuses_bad_invocations_before_any_run(argv, message, gap_main, tmp_path, capsys, monkeypatch):
    import mpp.experiments.gap

    def heavy(*args):
        raise AssertionError("got past the checks to the first data load")

    monkeypatch.setattr(mpp.experiments.gap, "label_spaces", heavy)
    out = tmp_path / "gap"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(gap_main, [*argv, "--output-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_gap_refuses_a_used_output_dir(gap_main, tmp_path, capsys):
    (tmp_path / "x").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(gap_main, ["--quick", "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "is not empty" in capsys.readouterr().err


def numbers(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from numbers(v)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield tree


@pytest.mark.slow
@pytest.mark.skipif(not OPENCLIPART_DIR.exists(), reason="apt-get install openclipart-png")
def test_gap_quick(installed_wheel, tmp_path):
    """The experiment as a user installs it: `python -m mpp gap` from the wheel, outside the checkout."""
    out = tmp_path / "gap"
    proc = installed_wheel("-m", "mpp", "gap", "--setting", "colour", "--quick", "--output-dir", out, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["config"]["setting"] == "colour" and report["protocol"]["label_spaces"]["disjoint"]
    assert set(report["summary"]) == set(INITS) and {"MPP − scratch", "supervised − MPP"} <= set(report["differences"])
    assert (
        report["primary"]["comparison"] == "MPP − scratch"
        and report["primary"]["bootstrap"]["low"] <= report["primary"]["bootstrap"]["high"]
    )
    assert set(report["floors"]) >= {"majority", "pixels_knn1", "pixels_knn20", "pixels_linear_5shot"}
    protocol = json.loads((out / "protocol.json").read_text())
    assert protocol["primary"].startswith("MPP − scratch") and protocol["fine_tuning"]["presets"] == ["paper", "modern"]
    predictions = json.loads((out / "predictions.json").read_text())
    assert (
        len(predictions["per_seed"]["0"]["mpp"])
        == len(predictions["labels"])
        == report["per_seed"]["0"]["hygiene"]["test_images"]
    )
    for arm in INITS:
        values = report["per_seed"]["0"][arm]
        assert set(values) >= {
            "test_top1",
            "best_val_top1",
            "preset",
            "lr",
            "knn20_cls",
            "knn20_mean",
            "linear_5shot_cls",
            "linear_5shot_mean",
        }
        assert (values["preset"], values["lr"]) in (("paper", 0.01), ("paper", 0.1), ("modern", 0.001))
        assert all(
            math.isfinite(v) and 0 <= v <= 1
            for k, v in values.items()
            if k.startswith(("test", "best_val", "knn", "linear"))
        )
        for run in ("paper_lr0.01", "paper_lr0.1", "modern_lr0.001"):  # every arm tried every preset and lr
            assert (out / "seed0" / f"finetune_{arm}_{run}_e2" / "best.safetensors").is_file()
    assert report["git"] == {
        "commit": None,
        "dirty": None,
    }  # an installed wheel has no checkout; the versions name the code
    assert (
        report["command"].startswith("python -m mpp gap --setting colour --quick")
        and report["date"]
        and report["machine"]
    )
    assert set(report["versions"]) >= {"torch", "timm", "mpp"}
    markdown = (out / "results.md").read_text()
    assert "| mpp |" in markdown and "gap.png" in markdown and "MPP − scratch" in markdown and "disjoint" in markdown
    png = (out / "gap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    for arm in ("mpp", "supervised"):
        assert (out / "seed0" / arm / "model.safetensors").is_file(), arm
    # the stages ran one after another in one process: the last one's weights must equal those of
    # the same command in a fresh process (state leaking from stage to stage would show)
    from mpp.models.weights import load_tensors

    cmd = finetune_command(quick(make_config("colour")), 0, str(out / "seed0" / "supervised" / "model.safetensors"))
    again = subprocess.run(
        cmd + ["--preset", "modern", "--lr", "0.001", "--epochs", "2", "--output-dir", str(tmp_path / "again")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert again.returncode == 0, again.stderr[-2000:]
    ours = load_tensors(out / "seed0" / "finetune_supervised_modern_lr0.001_e2" / "model.safetensors")
    fresh = load_tensors(tmp_path / "again" / "model.safetensors")
    assert ours.keys() == fresh.keys() and all(ours[k].equal(fresh[k]) for k in ours)


def test_a_relaunch_under_the_same_plan_is_not_a_protocol_change(tmp_path):
    from mpp.experiments.harness import record_protocol

    path, plan = tmp_path / "protocol.json", {"selection": "caps 1 and 1", "seeds": [0, 1]}
    launch = lambda n: {
        "command": f"launch {n}",
        "date": f"2026-12-0{n}",
        "git": {"commit": str(n)},
        "machine": "m",
        "versions": {},
    }  # noqa: E731
    record_protocol(path, plan, launch(1), resume=False, note=None)
    record_protocol(path, plan, launch(2), resume=True, note=None)  # stopped and started again
    kept = json.loads(path.read_text())
    assert (
        kept["command"] == "launch 1"
        and [r["command"] for r in kept["relaunches"]] == ["launch 2"]
        and "earlier_protocols" not in kept
    )
    widened = record_protocol(path, {**plan, "selection": "caps 3 and 2"}, launch(3), resume=True, note="caps were hit")
    assert (
        widened == json.loads(path.read_text())
        and widened["command"] == "launch 3"
        and widened["protocol_note"] == "caps were hit"
    )
    assert [(e["selection"], e["command"]) for e in widened["earlier_protocols"]] == [("caps 1 and 1", "launch 1")]
    record_protocol(path, {**plan, "selection": "caps 3 and 2"}, launch(4), resume=True, note="caps were hit")
    assert (
        json.loads(path.read_text())["earlier_protocols"] == widened["earlier_protocols"]
    )  # a relaunch adds no protocol
