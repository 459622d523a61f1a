"""The paper's gap experiment (§4.6) as a transfer: scratch vs MPP vs supervised pretraining.

Upstream, MPP (no labels) and supervised pretraining see the same images for the same steps, batch
and optimiser; the supervised arm learns a label space disjoint from the downstream one. Downstream,
the first seed chooses each arm's fine-tuning recipe on validation with the same effort for every arm
(every preset at every lr of its grid, grids grown at an edge, the budget doubled until the chosen
runs converge: tuning.py), and every seed fine-tunes each arm with its choice; the test split is
scored once per run, with its best-validation weights, image by image. The frozen encoders are probed
(few-shot linear, k-NN; class-token and mean-patch readouts) beside the floors (majority class, raw
pixels) on the same images. The protocol, power included, is written before the first run. Every stage
is a real recipe's main(), called in this process with its output in a log.
"""

import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from mpp.errors import UsageError
from mpp.evaluation.stats import detectable_difference, paired_difference, two_level_bootstrap
from mpp.experiments.harness import (
    check_fresh_output_dir,
    check_seeds,
    command,
    pm,
    power_table,
    provenance,
    provenance_lines,
    record_protocol,
    reusing,
    run_in_process,
    summarise_finetune,
    summary_over_seeds,
    table,
    write_json,
)
from mpp.experiments.tuning import TuningRules, finetune_runner, tune
from mpp.flags import argv_for, flag
from mpp.training.finetune_config import FinetuneConfig
from mpp.training.pretrain_config import PretrainConfig

INITS = ("scratch", "mpp", "supervised")
PRIMARY = ("MPP − scratch", "mpp", "scratch")  # the one comparison the experiment is powered for: fine-tuned test top-1
EXPLORATORY = {
    "supervised − MPP": ("supervised", "mpp"),
    "supervised − scratch (a positive control: labels upstream must help)": ("supervised", "scratch"),
}

# Per setting: the data and the sizes that fit it. grey (the headline): Fashion-MNIST classes 0-4
# upstream, 5-9 downstream (5,000 test, 3,000 validation images); colour (an illustration): clip-art
# classes split in two disjoint halves (about 60 test images).
SETTINGS = {
    "grey": dict(
        upstream="fashion-mnist-upstream",
        downstream="fashion-mnist-downstream",
        train_per_class=100,
        img_size=28,
        patch_size=7,
        pretrain_steps=500,
        pretrain_batch=256,
        finetune_epochs=100,
        finetune_batch=100,
        eval_every=5,
        seeds=(0, 1, 2, 3, 4),
    ),
    "colour": dict(
        upstream="clipart-upstream",
        downstream="clipart-downstream",
        train_per_class=None,
        img_size=32,
        patch_size=8,
        pretrain_steps=1000,
        pretrain_batch=128,
        finetune_epochs=200,
        finetune_batch=64,
        eval_every=5,
        seeds=(0, 1, 2),
    ),
}


def override(default, *, help: str, shown: bool = True):
    """A flag of the gap experiment: an override of its --setting's values, so the parser's default is None (not
    given) and make_config fills the field in. shown=False for a field the setting decides: its help shows no
    default."""
    return flag(default, help=help, show_default=shown, parser_default=None)


@dataclass
class GapConfig:
    setting: str = flag(
        "grey", help=f"data setting: {' or '.join(SETTINGS)} (grey is the headline, colour an illustration)"
    )
    upstream: str = override(
        "fashion-mnist-upstream", help="pretraining set (its labels used only by the supervised arm)", shown=False
    )
    downstream: str = override(
        "fashion-mnist-downstream", help="fine-tuning set with train / validation / test splits", shown=False
    )
    train_per_class: int | None = override(  # None: every downstream training image
        100, help="labelled downstream training images per class (default colour: all)", shown=False
    )
    model: str = override("test_vit", help="timm ViT for every arm")
    img_size: int = override(28, help="img size", shown=False)
    patch_size: int = override(7, help="patch size", shown=False)
    pretrain_steps: int = override(500, help="optimiser steps of both pretrainings", shown=False)
    pretrain_batch: int = override(256, help="batch of both pretrainings", shown=False)
    pretrain_lr: float = override(1e-3, help="peak AdamW lr of both pretrainings")
    finetune_epochs: float = override(
        100,
        help="starting fine-tuning budget in epochs (doubled while a chosen run has not converged); the best "
        "validation epoch is kept",
        shown=False,
    )
    finetune_batch: int = override(100, help="fine-tuning batch", shown=False)
    eval_every: int = override(5, help="epochs between validation evaluations while fine-tuning", shown=False)
    presets: tuple[str, ...] = override(
        ("paper", "modern"), help="fine-tuning presets every arm is tuned over (paper, modern)"
    )
    paper_lr_grid: tuple[float, ...] = override(
        (0.01, 0.03, 0.1), help="learning rates of the paper preset (SGD momentum)"
    )
    modern_lr_grid: tuple[float, ...] = override(  # AdamW with layer decay, Mixup/CutMix, RandAugment
        (3e-4, 1e-3, 3e-3), help="learning rates of the modern preset (AdamW)"
    )
    grid_extensions: int = override(
        1, help="lr grid steps added on a side while an arm's best lr in the grid is on that edge"
    )
    budget_doublings: int = override(
        1, help="times the fine-tuning budget may double while a chosen run has not converged"
    )
    shots: tuple[int, ...] = override((1, 5, 10), help="few-shot linear probes: examples per class")
    seeds: tuple[int, ...] = override(  # the setting decides, but the help has always shown grey's
        (0, 1, 2, 3, 4),
        help="one full repetition per seed; the first one chooses every arm's fine-tuning recipe on validation",
    )
    bootstrap: int = override(
        10_000, help="resamples of the two-level bootstrap (seeds x test images) of the primary comparison"
    )
    output_dir: str = override("runs/gap", help="folder for every run, results.md, results.json and gap.png")
    eval_limit: int | None = None  # no flag: probes on a stratified part of the test split (quick mode)
    resume: bool = flag(  # finished stages are kept (harness.reusing), the earlier protocol recorded
        False,
        help="continue in --output-dir: finished runs are kept and only missing ones run "
        "(also to widen a finished experiment's grid or budget; its earlier protocol is kept on record)",
        action="store_true",
    )
    protocol_note: str | None = flag(
        None, help="with --resume, why the protocol changed (recorded in protocol.json and results.md)"
    )

    def grids(self) -> dict:
        return {p: getattr(self, f"{p}_lr_grid") for p in self.presets}


def make_config(setting: str = "grey", **overrides) -> GapConfig:
    """The setting's defaults, then every override that is not None."""
    if setting not in SETTINGS:
        raise UsageError(f"--setting {setting!r} is not one of: {', '.join(SETTINGS)}")
    known = {f.name for f in fields(GapConfig)}
    values = {**SETTINGS[setting], **{k: v for k, v in overrides.items() if v is not None and k in known}}
    return GapConfig(setting=setting, **values)


def quick(cfg: GapConfig) -> GapConfig:
    """A few steps of everything, one seed, two-value grids (for the tests; a few minutes on 2 cores)."""
    cfg.pretrain_steps, cfg.pretrain_batch, cfg.finetune_epochs, cfg.eval_every = 4, 32, 2, 1
    cfg.finetune_batch, cfg.shots, cfg.seeds, cfg.eval_limit, cfg.bootstrap = 32, (1, 5), (0,), 200, 200
    cfg.paper_lr_grid, cfg.modern_lr_grid, cfg.grid_extensions, cfg.budget_doublings = (0.01, 0.1), (1e-3,), 0, 0
    if cfg.train_per_class is not None:
        cfg.train_per_class = 10
    return cfg


def validate(cfg: GapConfig) -> None:
    """Every check that needs no training, before any run starts."""
    from mpp.training.finetune_config import PRESETS

    check_seeds(cfg.seeds)
    unknown = [p for p in cfg.presets if p not in PRESETS]
    if unknown or not cfg.presets or len(set(cfg.presets)) != len(cfg.presets):
        raise UsageError(f"--presets must be distinct names among {', '.join(PRESETS)}, got {list(cfg.presets)}")
    for preset, grid in cfg.grids().items():
        if not grid or any(not lr > 0 for lr in grid) or len(set(grid)) != len(grid):
            raise UsageError(f"--{preset}-lr-grid needs distinct positive learning rates, got {list(grid)}")
    if cfg.train_per_class is not None and max(cfg.shots) > cfg.train_per_class:
        raise UsageError(
            f"--shots {max(cfg.shots)} is more than the {cfg.train_per_class} labelled images per class "
            "(--train-per-class)"
        )
    if cfg.pretrain_steps < 1 or cfg.finetune_epochs <= 0 or cfg.eval_every < 1:
        raise UsageError("--pretrain-steps, --finetune-epochs and --eval-every must be positive")
    if cfg.grid_extensions < 0 or cfg.budget_doublings < 0 or cfg.bootstrap < 100:
        raise UsageError("--grid-extensions and --budget-doublings must not be negative, --bootstrap at least 100")
    if cfg.protocol_note and not cfg.resume:
        raise UsageError("--protocol-note says why a resumed experiment's protocol changed: give it with --resume")
    if not cfg.resume:
        check_fresh_output_dir(Path(cfg.output_dir))


def pretrain_commands(cfg: GapConfig, seed: int, root: Path) -> dict[str, list[str]]:
    """MPP and supervised pretraining on the same upstream training images, with the same steps,
    batch, lr schedule, AdamW settings, clipping and augmentation."""
    arch = dict(model=cfg.model, img_size=cfg.img_size, patch_size=cfg.patch_size, seed=seed, progress=False)
    shared = dict(
        max_steps=cfg.pretrain_steps,
        batch_size=cfg.pretrain_batch,
        lr=cfg.pretrain_lr,
        warmup_steps=max(1, cfg.pretrain_steps // 15),
        min_lr=0,
        weight_decay=0.05,
        clip_grad=1,
        crop_scale=(0.35, 1.0),
        hflip=0.5,
        log_every=max(1, cfg.pretrain_steps // 30),
        checkpoint_every=cfg.pretrain_steps,
    )
    return {
        "mpp": command(
            "pretrain",
            *argv_for(PretrainConfig, dataset=cfg.upstream, split="train", **arch, **shared, output_dir=root / "mpp"),
        ),
        # the fine-tuning recipe on the upstream labels; validation is never looked at (--eval-every
        # beyond the run), the final weights are the init
        "supervised": command(
            "finetune",
            *argv_for(
                FinetuneConfig,
                dataset=cfg.upstream,
                train_split="train",
                eval_split="validation",
                init="scratch",
                **arch,
                **shared,
                opt="adamw",
                zero_head=False,
                eval_every=1_000_000,
                output_dir=root / "supervised",
            ),
        ),
    }


def init_of(arm: str, root: Path) -> str:
    return "scratch" if arm == "scratch" else str(root / arm / "model.safetensors")


def finetune_command(cfg: GapConfig, seed: int, init: str) -> list[str]:
    """The downstream fine-tuning of one arm, without --preset, --lr, --epochs and --output-dir (the tuning
    adds them): identical for the three arms but for --init."""
    subset = dict(train_per_class=cfg.train_per_class) if cfg.train_per_class else {}
    return command(
        "finetune",
        *argv_for(
            FinetuneConfig,
            dataset=cfg.downstream,
            train_split="train",
            eval_split="validation",
            test_split="test",
            **subset,
            subset_seed=seed,
            init=init,
            model=cfg.model,
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            batch_size=cfg.finetune_batch,
            eval_every=cfg.eval_every,
            log_every=10,
            checkpoint_every=1_000_000,
            seed=seed,
            progress=False,
        ),
    )


def probe_data(cfg: GapConfig, seed: int):
    """The downstream images the probes and the floors read: the seed's labelled training images (the
    fine-tuning's own subset) and the test split."""
    from mpp.data.heldout import labelled_images

    train = labelled_images(cfg.downstream, "train", cfg.img_size, per_class=cfg.train_per_class, seed=seed)
    test = labelled_images(cfg.downstream, "test", cfg.img_size, limit=cfg.eval_limit, seed=seed)
    return (*train, *test)


def probe_encoders(cfg: GapConfig, seed: int, root: Path, data) -> dict[str, dict]:
    """Few-shot linear and k-NN accuracy of each arm's frozen encoder (scratch: the seed's random init)."""
    from mpp.evaluation.probes import describe_readouts, frozen_feature_report
    from mpp.models.model import create_encoder
    from mpp.models.weights import load_backbone

    torch.manual_seed(seed)
    encoders = {
        "scratch": create_encoder(cfg.model, cfg.img_size, cfg.patch_size),
        "mpp": load_backbone(root / "mpp" / "model.safetensors"),
        "supervised": load_backbone(root / "supervised" / "model.safetensors"),
    }
    reports = {}
    for name, encoder in encoders.items():
        mean, std = encoder.pretrained_cfg["mean"], encoder.pretrained_cfg["std"]
        reports[name] = {
            k: v
            for k, v in frozen_feature_report(encoder, *data, mean, std, cfg.shots, draws=5, seed=seed).items()
            if not k.endswith("_std")
        }
    reports["readouts"] = describe_readouts(encoders["mpp"])
    return reports


def hygiene(cfg: GapConfig, seed: int, data) -> dict:
    """Near-twins by raw-pixel correlation (> 0.98, mirrored too) of the test images among the seed's
    labelled training images and among the validation images: an independent check of the splits."""
    from mpp.data.heldout import labelled_images
    from mpp.experiments.baselines import near_twins

    train_images, _, test_images, _ = data
    validation = labelled_images(cfg.downstream, "validation", cfg.img_size)[0]
    return {
        "test_images": len(test_images),
        "test_with_a_twin_in_train": near_twins(train_images, test_images),
        "test_with_a_twin_in_validation": near_twins(validation, test_images),
        "validation_with_a_twin_in_train": near_twins(train_images, validation),
    }


def label_spaces(cfg: GapConfig) -> dict:
    from mpp.data.sources import class_names_of, find_label_column, load_images

    names = {}
    for side in ("upstream", "downstream"):
        ds = load_images(getattr(cfg, side), "train")
        names[side] = class_names_of(ds, find_label_column(ds, None))
    return {**names, "disjoint": not set(names["upstream"]) & set(names["downstream"])}


def check_shots(cfg: GapConfig, train_labels: torch.Tensor) -> None:
    smallest = int(torch.bincount(train_labels.long()).min())
    if max(cfg.shots) > smallest:
        raise UsageError(
            f"--shots {max(cfg.shots)} is more than the {smallest} training images of the smallest downstream class"
        )


def protocol(cfg: GapConfig, spaces: dict, test_images: int) -> dict:
    """The plan, fixed before the first run."""
    return {
        "setting": cfg.setting,
        "upstream": cfg.upstream,
        "downstream": cfg.downstream,
        "seeds": list(cfg.seeds),
        "pretraining": f"MPP and supervised, {cfg.pretrain_steps} steps of {cfg.pretrain_batch}, AdamW lr "
        f"{cfg.pretrain_lr:g}",
        "fine_tuning": {
            "labelled_per_class": cfg.train_per_class,
            "presets": list(cfg.presets),
            "lr_grids": {p: list(g) for p, g in cfg.grids().items()},
            "starting_epochs": cfg.finetune_epochs,
            "eval_every": cfg.eval_every,
            "batch": cfg.finetune_batch,
        },
        "selection": (
            f"seed {cfg.seeds[0]} chooses each arm's (preset, lr) by best validation top-1 over every preset and lr; a "
            "grid "
            f"grows by one step a side (up to {cfg.grid_extensions}) while an arm's best lr in it is on that edge, for "
            "every arm; "
            "the chosen runs must be converged (validation smoothed over 10% of the budget: the best of the last 20% "
            "no "
            "more "
            f"than 0.005 above the best before), else the budget doubles (up to {cfg.budget_doublings} times); the "
            "other "
            "seeds fine-tune with the choice and the final budget. The test split is scored once per run, with its "
            "best-validation weights."
        ),
        "primary": f"{PRIMARY[0]}, fine-tuned test top-1: paired per-seed t-interval and a two-level (seeds x test "
        "images) bootstrap",
        "exploratory": [*EXPLORATORY, "every probe: each pretrained encoder − the random-init encoder"],
        "floors": [
            "majority class",
            "raw-pixel k-NN (k = 1 and 20)",
            "raw-pixel few-shot linear",
            "random-init frozen encoder",
        ],
        "label_spaces": spaces,
        "power": power_table(len(cfg.seeds), test_images),
    }


SCRIPT = "recipes/gap.py"


def run_gap(cfg: GapConfig, argv: list[str] | None = None) -> dict:
    validate(cfg)
    start = time.time()
    origin = provenance(
        SCRIPT, argv or []
    )  # the code as it was at the start: a commit made mid-run must not be recorded
    out = Path(cfg.output_dir)
    spaces = label_spaces(cfg)
    first = probe_data(cfg, cfg.seeds[0])
    check_shots(cfg, first[1])  # before any training
    from mpp.data.sources import load_images

    plan = protocol(
        cfg, spaces, len(load_images(cfg.downstream, "test"))
    )  # the fine-tunings score the whole test split
    out.mkdir(parents=True, exist_ok=True)
    reused: list[str] = []
    run = reusing(run_in_process, reused) if cfg.resume else run_in_process
    plan = record_protocol(out / "protocol.json", plan, origin, cfg.resume, cfg.protocol_note)  # before the first run
    per_seed, predictions, tuned = {}, {}, None
    for seed in cfg.seeds:
        root, logs = out / f"seed{seed}", out / f"seed{seed}" / "logs"
        data = first if seed == cfg.seeds[0] else probe_data(cfg, seed)
        for name, cmd in pretrain_commands(cfg, seed, root).items():
            print(f"[seed {seed}] pretrain {name} ...", flush=True)
            run(cmd, logs / f"pretrain_{name}.log")
        runner = finetune_runner(
            {arm: finetune_command(cfg, seed, init_of(arm, root)) for arm in INITS}, root, logs, run, summarise_finetune
        )
        if tuned is None:
            print(f"[seed {seed}] tune every arm over {', '.join(cfg.presets)} ...", flush=True)
            rules = TuningRules(
                cfg.presets, cfg.grids(), cfg.finetune_epochs, cfg.grid_extensions, cfg.budget_doublings
            )
            tuned = tune(list(INITS), runner, rules)
            finetuned = tuned.chosen
        else:
            print(f"[seed {seed}] fine-tune with the chosen recipes ...", flush=True)
            finetuned = {
                arm: {"preset": c["preset"], "lr": c["lr"], **runner(arm, c["preset"], c["lr"], tuned.epochs)}
                for arm, c in tuned.chosen.items()
            }
        probes = probe_encoders(cfg, seed, root, data)
        per_seed[seed] = {
            arm: {
                "test_top1": finetuned[arm]["test_top1"],
                "best_val_top1": finetuned[arm]["best_val_top1"],
                "preset": finetuned[arm]["preset"],
                "lr": finetuned[arm]["lr"],
                "best_epoch": finetuned[arm]["best_epoch"],
                "train_acc_last": finetuned[arm]["train_acc_last"],
                **probes[arm],
            }
            for arm in INITS
        }
        per_seed[seed]["floors"] = floors(cfg, seed, data)
        per_seed[seed]["hygiene"] = hygiene(cfg, seed, data)
        predictions[seed] = {
            arm: json.loads((Path(finetuned[arm]["run_dir"]) / "test_predictions.json").read_text()) for arm in INITS
        }
        readouts = probes["readouts"]
        print(
            f"[seed {seed}] test top-1: " + ", ".join(f"{a} {per_seed[seed][a]['test_top1']:.4f}" for a in INITS),
            flush=True,
        )
    report = {
        "protocol": plan,
        "config": asdict(cfg),
        "readouts": readouts,
        "per_seed": per_seed,
        "tuning": {
            "chosen": {a: {k: c[k] for k in ("preset", "lr")} for a, c in tuned.chosen.items()},
            "epochs": tuned.epochs,
            "grids": tuned.grids,
            "convergence": tuned.convergence,
            "trials": [{k: v for k, v in t.items() if k not in ("val_curve", "run_dir")} for t in tuned.trials],
        },
        **summarise(per_seed, predictions, cfg.bootstrap),
        "wall_time_s": time.time() - start,
        "reused_stages": len(reused),
        **origin,
    }
    write_json(out / "results.json", report)
    write_json(
        out / "predictions.json",
        {
            "labels": next(iter(predictions.values()))["mpp"]["labels"],
            "per_seed": {s: {a: p["predictions"] for a, p in v.items()} for s, v in predictions.items()},
        },
    )
    (out / "results.md").write_text(markdown(report))
    bar_chart(report, out / "gap.png")
    return report


def floors(cfg: GapConfig, seed: int, data) -> dict:
    from mpp.experiments.baselines import pixel_baselines

    return pixel_baselines(*data, shots=cfg.shots, seed=seed)


def metric_names(per_seed: dict) -> list[str]:
    """The numbers compared across arms: fine-tune top-1, then the probes."""
    first = next(iter(per_seed.values()))["scratch"]
    probes = [k for k in first if k.startswith(("knn", "linear_"))]
    return ["test_top1", "best_val_top1", *probes]


def correctness(predictions: dict, arm: str) -> np.ndarray:
    """(seeds, images) 1.0 where the arm's fine-tuned model is right; unreadable images (not scored) left out."""
    rows = []
    for p in predictions.values():
        scored = np.asarray(p[arm]["scored"], bool)
        rows.append((np.asarray(p[arm]["predictions"]) == np.asarray(p[arm]["labels"]))[scored].astype(np.float64))
    return np.stack(rows)


def summarise(per_seed: dict, predictions: dict | None = None, resamples: int = 10_000) -> dict:
    """{"summary": {arm: {metric: mean_std}}, "floors": {floor: mean_std}, "primary": {...}, "differences":
    {comparison: {metric: paired difference}}}: the differences pair the arms seed by seed; the primary
    comparison also gets the two-level bootstrap over seeds and test images when predictions are given."""
    seeds = list(per_seed)
    metrics = metric_names(per_seed)
    summary = {
        arm: {
            m: v
            for m, v in summary_over_seeds([per_seed[s][arm] for s in seeds]).items()
            if m in metrics + ["best_epoch"]
        }
        for arm in INITS
    }

    def diff(a, b, m):
        return paired_difference([per_seed[s][a][m] for s in seeds], [per_seed[s][b][m] for s in seeds]).to_dict()

    name, a, b = PRIMARY
    primary = {"comparison": name, "metric": "test_top1", "per_seed_t": diff(a, b, "test_top1")}
    if predictions:
        primary["bootstrap"] = two_level_bootstrap(correctness(predictions, a), correctness(predictions, b), resamples)
    differences = {name: {m: diff(a, b, m) for m in metrics}}
    differences.update({n: {m: diff(x, y, m) for m in metrics} for n, (x, y) in EXPLORATORY.items()})
    probes = [m for m in metrics if m.startswith(("knn", "linear_"))]
    versus_random = {arm: {m: diff(arm, "scratch", m) for m in probes} for arm in ("mpp", "supervised")}
    out = {
        "summary": summary,
        "primary": primary,
        "differences": differences,
        "probes_versus_random_init": versus_random,
    }
    if "floors" in per_seed[seeds[0]]:
        out["floors"] = summary_over_seeds([per_seed[s]["floors"] for s in seeds])
    return out


def markdown(report: dict) -> str:
    cfg, s, per_seed, plan = report["config"], report["summary"], report["per_seed"], report["protocol"]
    seeds = list(per_seed)
    metrics = [m for m in s["scratch"] if m not in ("best_epoch", "best_val_top1")]
    floors_ = report.get("floors", {})
    spaces = plan["label_spaces"]
    subset = (
        f"{cfg['train_per_class']} labelled images per class"
        if cfg["train_per_class"]
        else "all its labelled training images"
    )
    primary = report["primary"]
    boot = primary.get("bootstrap")
    tuning = report["tuning"]

    def floor_cell(metric):
        if metric.startswith("knn20"):
            return pm(floors_["pixels_knn20"])
        if metric.startswith("linear_") and f"pixels_{metric.split('_')[0]}_{metric.split('_')[1]}" in floors_:
            return pm(floors_[f"pixels_{metric.split('_')[0]}_{metric.split('_')[1]}"])
        return "—"

    rows = [
        [arm if arm != "scratch" else "scratch (probes: the random-init encoder)", *(pm(s[arm][m]) for m in metrics)]
        for arm in INITS
    ]
    if floors_:
        rows += [
            ["majority class", *(pm(floors_["majority"]) for _ in metrics)],
            [
                "raw pixels (test top-1 column: 1-NN on the labelled images)",
                *(pm(floors_["pixels_knn1"]) if m == "test_top1" else floor_cell(m) for m in metrics),
            ],
        ]
    power = plan["power"]
    observed_sd = primary["per_seed_t"]["std"]
    lines = [
        f"# Gap experiment ({cfg['setting']}): fine-tuning from scratch vs MPP vs supervised pretraining",
        "",
        *provenance_lines(report),
        "",
        "## Protocol (written to protocol.json before the first run)",
        "",
        f"Upstream `{cfg['upstream']}` (train split): MPP without labels and supervised pretraining on its labels, "
        f"{cfg['pretrain_steps']} steps of {cfg['pretrain_batch']} each, AdamW lr {cfg['pretrain_lr']:g}. "
        f"Label spaces {'disjoint' if spaces['disjoint'] else 'SHARED (not a transfer)'}: upstream "
        f"{', '.join(spaces['upstream'])}; "
        f"downstream {', '.join(spaces['downstream'])}.",
        "",
        f"Downstream `{cfg['downstream']}` with {subset}: model {cfg['model']} at {cfg['img_size']} px / patch "
        f"{cfg['patch_size']}, "
        f"batch {cfg['finetune_batch']}, validation top-1 every {cfg['eval_every']} epochs. {plan['selection']}",
        "",
        *protocol_changes(plan),
        f"Primary comparison: **{plan['primary']}**. Exploratory (no correction for multiple comparisons; read as "
        "leads, not "
        f"findings): {'; '.join(plan['exploratory'])}. Seeds {list(cfg['seeds'])}.",
        "",
        f"Power, computed before the run: with {power['seeds']} seeds, a paired t-test detects with 80% power a true "
        "difference of "
        + ", ".join(
            f"{_num(v, 3)} when per-seed differences spread by {k}" for k, v in power["detectable_by_spread"].items()
        )
        + f". The {power['test_images']} test images alone spread a per-seed difference by "
        + ", ".join(
            f"{v:.4f} (arms disagreeing on {float(k):.0%} of images)"
            for k, v in power["test_image_spread_by_disagreement"].items()
        )
        + (
            f". Observed spread of the per-seed differences: {observed_sd:.4f}, so this run could detect "
            f"{detectable_difference(observed_sd, len(seeds)):.3f}."
            if observed_sd
            else ". (One seed: no test.)"
        ),
        "",
        "## Result",
        "",
        f"**{primary['comparison']}, fine-tuned test top-1: {primary['per_seed_t']['phrase']}**"
        + (
            f"; two-level bootstrap over seeds and test images ({boot['resamples']} resamples): 95% interval "
            f"[{boot['low']:+.3f}, {boot['high']:+.3f}]."
            if boot
            else "."
        ),
        "",
        "Mean ± sample std (ddof=1) over seeds. Probes: frozen encoders on the seed's labelled training images (k-NN, "
        "k=20, cosine; "
        "few-shot linear, closed form, mean of 5 draws), scored on the test split; readouts `cls` = "
        f"{report['readouts']['cls']}, "
        f"`mean` = {report['readouts']['mean']}. Floors on the same images: the majority class, raw pixels through the "
        "same k-NN "
        "and linear probes.",
        "",
        *table(["init", *metrics], rows),
        "",
        "Exploratory paired per-seed differences (mean ± sample std, 95% t-interval):",
        "",
        *table(
            ["metric", *report["differences"]],
            [[m, *(report["differences"][c][m]["phrase"] for c in report["differences"])] for m in metrics],
        ),
        "",
        "Each pretrained encoder − the random-init encoder, on the probes (can the probe metric fail? it can only pass "
        "if pretraining "
        "beats a random encoder):",
        "",
        *table(
            ["probe", *report["probes_versus_random_init"]],
            [
                [m, *(report["probes_versus_random_init"][a][m]["phrase"] for a in report["probes_versus_random_init"])]
                for m in report["probes_versus_random_init"]["mpp"]
            ],
        ),
        "",
        "Paper (ViT-B/16, JFT -> ImageNet): MPP about +2 points over scratch, supervised about +4 over MPP.",
        "",
        "## Tuning and convergence",
        "",
        f"Chosen on seed {cfg['seeds'][0]}'s validation split: "
        + "; ".join(f"{a}: {c['preset']} at lr {c['lr']:g}" for a, c in tuning["chosen"].items())
        + f". Final budget {tuning['epochs']:g} epochs; final grids "
        + "; ".join(f"{p} {[float(f'{x:.3g}') for x in g]}" for p, g in tuning["grids"].items())
        + ".",
        "",
        *table(
            ["budget (epochs)", *INITS],
            [
                [
                    c["epochs"],
                    *(
                        f"{'converged' if c[a]['converged'] else 'NOT converged'} "
                        f"(smoothed best: last 20% {_num(c[a]['best_tail'], 3)}, before "
                        f"{_num(c[a]['best_before'], 3)})"
                        for a in INITS
                    ),
                ]
                for c in tuning["convergence"]
            ],
        ),
        "",
        "Validation top-1 of every tuning run (best epoch of the run):",
        "",
        *table(["preset", "lr", "budget", *INITS], tuning_rows(tuning["trials"])),
        "",
        "Per seed (test top-1; chosen recipe; best validation epoch; last logged training accuracy):",
        "",
        *table(
            ["seed", *INITS],
            [
                [
                    seed,
                    *(
                        f"{per_seed[seed][a]['test_top1']:.4f}; {per_seed[seed][a]['preset']} lr "
                        f"{per_seed[seed][a]['lr']:g}; epoch {per_seed[seed][a]['best_epoch']}; train acc "
                        f"{_num(per_seed[seed][a]['train_acc_last'])}"
                        for a in INITS
                    ),
                ]
                for seed in seeds
            ],
        ),
        "",
        "## Split hygiene",
        "",
        "Test images with a near-twin (raw-pixel correlation above 0.98, mirrored too) among the seed's labelled "
        "training images "
        "and among the validation images:",
        "",
        *table(
            ["seed", "test images", "twin in train", "twin in validation", "validation with a twin in train"],
            [
                [
                    seed,
                    h["test_images"],
                    h["test_with_a_twin_in_train"],
                    h["test_with_a_twin_in_validation"],
                    h["validation_with_a_twin_in_train"],
                ]
                for seed, h in ((seed, per_seed[seed]["hygiene"]) for seed in seeds)
            ],
        ),
        "",
        f"Wall time {report['wall_time_s'] / 60:.1f} min.",
        "",
        "![gap](gap.png)",
        "",
    ]
    return "\n".join(lines)


def protocol_changes(plan: dict) -> list[str]:
    """The protocols this one replaced, with the reason given, for the record."""
    if not plan.get("earlier_protocols"):
        return []
    lines = [
        f"**The protocol changed after results were seen**: {plan.get('protocol_note') or '(no reason given)'}. "
        "Earlier:"
    ]
    for old in plan["earlier_protocols"]:
        lines.append(f"{old.get('date', '?')[:16]}: {old['selection']}")
    return [" ".join(lines), ""]


def tuning_rows(trials: list[dict]) -> list[list]:
    by_config: dict[tuple, dict] = {}
    for t in trials:
        by_config.setdefault((t["preset"], t["lr"], t["epochs"]), {})[t["arm"]] = t
    return [
        [
            p,
            f"{lr:.3g}",
            f"{e:g}",
            *(f"{c[a]['best_val_top1']:.4f} ({c[a]['best_epoch']})" if a in c else "—" for a in INITS),
        ]
        for (p, lr, e), c in sorted(by_config.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1]))
    ]


def _num(x, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def bar_chart(report: dict, path: Path) -> None:
    """The arms' test top-1 and probes with sample-std bars, the floors as lines across each metric."""
    from matplotlib.figure import Figure

    summary, floors_ = report["summary"], report.get("floors", {})
    metrics = [m for m in summary["scratch"] if m not in ("best_epoch", "best_val_top1")]
    fig = Figure(figsize=(max(6, 1.1 * len(metrics)), 3.8), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(INITS)
    for i, arm in enumerate(INITS):
        means = [summary[arm][m]["mean"] for m in metrics]
        stds = [summary[arm][m]["std"] or 0 for m in metrics]
        ax.bar(np.arange(len(metrics)) + i * width, means, width, yerr=stds, label=arm, capsize=2)
    for j, m in enumerate(metrics):
        span = [j - width / 2, j + (len(INITS) - 0.5) * width]
        if floors_:
            ax.plot(span, [floors_["majority"]["mean"]] * 2, "k:", lw=1, label="majority class" if j == 0 else None)
            pixel = (
                "pixels_knn1"
                if m == "test_top1"
                else "pixels_knn20"
                if m.startswith("knn20")
                else f"pixels_{'_'.join(m.split('_')[:2])}"
            )
            if pixel in floors_:
                ax.plot(span, [floors_[pixel]["mean"]] * 2, "r--", lw=1, label="raw pixels" if j == 0 else None)
    ax.set_xticks(np.arange(len(metrics)) + width, metrics, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (test split)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("mean ± sample std over seeds; scratch's probes are the random-init encoder's", fontsize=9)
    fig.savefig(path, dpi=120)
