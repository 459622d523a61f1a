"""Appendix B.1.2 in miniature: MPP's design choices, one axis at a time, judged by frozen features.

Every setting is the default with one axis changed, so the default is pretrained once per seed and
shared by all axes. Each pretraining is the real recipe's main() called in this process; the frozen
encoder is probed (few-shot linear 5/10-shot, k-NN; cls and mean readouts) on the colour downstream
set's validation split (which chooses the budget and the best setting) and test split (which is
reported), beside the floors: the random-init encoder, the majority class and the raw pixels.

A gate comes before any verdict: a metric on which the default cannot beat a random encoder cannot
tell two settings apart either. The default is pretrained for every seed and must beat the random-init
encoder on the verdict metric, on validation, with a paired interval above 0; while it does not, the
budget doubles (up to --gate-doublings times). Without a passed gate, every finding is 'not judged'.
The default, the best setting and scratch are then fine-tuned with experiments/tuning.py's rules. The
protocol is written before the first run.
"""

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mpp.errors import UsageError
from mpp.evaluation.stats import paired_difference, verdict
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

# The paper's setting (App. B.1.2): 50% of patches, 80% [mask] / 10% random patch / 10% unchanged,
# 3-bit mean colour, corruption of the patch embeddings.
DEFAULT = {
    "target": "mean3bit",
    "mask_ratio": 0.5,
    "mask_probs": (0.8, 0.1, 0.1),
    "corrupt_at": "embedding",
    "length": 1.0,
}
AXES = {
    "target": [("target", "mean3bit_4x4"), ("target", "pixels_l2")],
    "corruption rate": [("mask_ratio", 0.15), ("mask_ratio", 0.75)],
    "corruption mix": [("mask_probs", (1.0, 0.0, 0.0))],
    "corrupt at": [("corrupt_at", "pixels")],
    "pretraining length": [("length", 0.25), ("length", 0.5), ("length", 2.0)],
}
RANDOM = "random-init encoder"


def folder_of(name: str) -> str:
    """A setting's run folder name: 'rate 15%' -> 'rate_15pc'."""
    return name.replace(" ", "_").replace("/", "-").replace("%", "pc")


def setting_name(key: str | None = None, value=None) -> str:
    if key is None:
        return "default"
    if key == "mask_probs":
        return "mix " + "/".join(f"{round(100 * p)}" for p in value)
    if key == "mask_ratio":
        return f"rate {round(100 * value)}%"
    if key == "length":
        return f"length {round(100 * value)}%"
    return f"{key.replace('_', ' ')} {value}"


def all_settings() -> dict[str, dict]:
    """{name: full setting}: the default once, then each axis's other values."""
    settings = {"default": dict(DEFAULT)}
    for changes in AXES.values():
        for key, value in changes:
            settings[setting_name(key, value)] = {**DEFAULT, key: value}
    return settings


@dataclass
class Finding:
    key: str
    claim: str  # what the paper says (or chose), as 'a beats b'
    source: str
    better: list  # per-seed value = sum of coef * metric(setting) over (coef, setting); the claim is better > worse
    worse: list


DEFAULT_NAME = "default"
FINDINGS = [
    Finding(
        "a1",
        "3-bit mean colour beats the 4×4 3-bit target in few-shot",
        "App. B.1.2: option 1 'has shown best few-shot performance'",
        [(1, "default")],
        [(1, setting_name("target", "mean3bit_4x4"))],
    ),
    Finding(
        "a2",
        "3-bit mean colour beats L2 regression on the pixels",
        "App. B.1.2: 'all worked quite well, though L2 was slightly worse'",
        [(1, "default")],
        [(1, setting_name("target", "pixels_l2"))],
    ),
    Finding(
        "b",
        "50% corruption beats BERT's 15%",
        "App. B.1.2: 15% 'results were also slightly worse on our few-shot metrics'",
        [(1, "default")],
        [(1, setting_name("mask_ratio", 0.15))],
    ),
    Finding(
        "c",
        "the 80/10/10 mix beats all-[mask] (100/0/0)",
        "the paper's choice, taken from BERT; the paper reports no ablation of it",
        [(1, "default")],
        [(1, setting_name("mask_probs", (1.0, 0.0, 0.0)))],
    ),
    Finding(
        "d",
        "diminishing returns: doubling 25%→50% of the steps gains more than doubling 100%→200%",
        "App. B.1.2: 'diminishing returns on downstream performance after 100k pretraining steps'",
        [(1, setting_name("length", 0.5)), (-1, setting_name("length", 0.25))],
        [(1, setting_name("length", 2.0)), (-1, "default")],
    ),
]
# compared and reported, without a paper finding to judge; each doubling of the length with its own sign
OBSERVATIONS = [
    ("75% corruption vs 50%", [(1, setting_name("mask_ratio", 0.75))], [(1, "default")]),
    ("pixel-space vs embedding-space corruption", [(1, setting_name("corrupt_at", "pixels"))], [(1, "default")]),
    ("length 25% → 50%", [(1, setting_name("length", 0.5))], [(1, setting_name("length", 0.25))]),
    ("length 50% → 100%", [(1, "default")], [(1, setting_name("length", 0.5))]),
    ("length 100% → 200%", [(1, setting_name("length", 2.0))], [(1, "default")]),
]


def shown(default, *, help: str, **argparse_options):
    """A flag of the ablation whose help ends with its default."""
    return flag(default, help=help, show_default=True, **argparse_options)


@dataclass
class AblateConfig:
    pretrain_dataset: str = shown(  # clip art of every folder (train split) and photo crops
        "colour-mix", help="unlabelled pretraining set"
    )
    downstream: str = shown(
        "clipart-downstream",
        help="labelled set (train / validation / test) the frozen encoders are probed and fine-tuned on",
    )
    model: str = shown("test_vit", help="timm ViT")
    img_size: int = shown(32, help="resolution of pretraining, probes and fine-tuning")
    patch_size: int = shown(  # 16 patches: 15% corrupts 2 of them, 75% 12; a 4x4 target cell is 2x2 pixels
        8, help="patch size"
    )
    steps: int = shown(
        400,
        help="pretraining steps of the default setting before the gate (the length axis takes 25/50/100/200%% of the "
        "budget the gate settles on)",
    )
    batch: int = shown(128, help="pretraining batch")
    lr: float = shown(1e-3, help="peak AdamW lr of every pretraining")
    metric: str = shown(
        "linear_10shot_mean",
        help="probe metric that decides the gate and the best setting (on validation) and the verdicts (on test)",
    )
    gate_doublings: int = shown(
        1,
        help="times the budget may double while the default does not beat a random-init encoder on --metric "
        "(validation)",
    )
    shots: tuple[int, ...] = shown((5, 10), help="few-shot linear probes: examples per class")
    finetune_epochs: float = shown(  # the flag has always taken whole epochs (a float only from quick or code)
        100,
        help="starting fine-tuning budget in epochs (doubled once if a chosen run has not converged)",
        type=int,
    )
    finetune_batch: int = shown(64, help="fine-tuning batch")
    eval_every: int = shown(5, help="epochs between validation evaluations while fine-tuning")
    lr_grid: tuple[float, ...] = shown(
        (0.01, 0.03, 0.1),
        help="fine-tuning learning rates (paper preset), grown once at an edge; the first seed's validation chooses "
        "one per arm",
    )
    grid_extensions: int = shown(
        1, help="fine-tuning lr grid steps added on a side while an arm's best lr is on that edge"
    )
    budget_doublings: int = shown(
        1, help="times the fine-tuning budget may double while a chosen run has not converged"
    )
    seeds: tuple[int, ...] = shown((0, 1, 2, 3, 4), help="one full repetition per seed")
    output_dir: str = shown(
        "benchmarks/results", help="folder for ablation.md, ablation.json, ablation.png and ablation_protocol.json"
    )
    runs_dir: str = shown(
        "runs/ablate", help="folder for the runs and their logs (must be empty or new, unless --resume)"
    )
    finetune: bool = flag(
        True,
        help="probes only: skip fine-tuning the default and best settings",
        action="store_false",
        flag_name="--no-finetune",
    )
    resume: bool = flag(  # finished stages are kept (experiment.reusing)
        False,
        help="continue a stopped ablation in --runs-dir: finished runs are kept, an unfinished one is run again",
        action="store_true",
    )
    protocol_note: str | None = flag(
        None, help="with --resume: why the protocol differs from the one already in --output-dir (kept beside it)"
    )
    settings: dict = flag(  # the parser gives names (None: all), the command turns them into settings
        default_factory=all_settings,
        help="run only these settings besides the default (run-folder names such "
        "as target_pixels_l2 or rate_15pc); findings that need another are 'not run' (default: all)",
        parser_default=None,
        nargs="+",
        metavar="SETTING",
        type=str,
    )


def choose_settings(names: list[str]) -> dict:
    """{name: setting} for the default and the named ones (as in the tables, e.g. 'rate 15%', or as their run
    folders, e.g. 'rate_15pc'), in the order of all_settings."""
    every = all_settings()
    by_any = {**{n: n for n in every}, **{folder_of(n): n for n in every}}
    unknown = [n for n in names if n not in by_any]
    if unknown:
        raise UsageError(
            f"--settings {unknown[0]!r} is not a setting; choose from: {', '.join(folder_of(n) for n in every)}"
        )
    chosen = {"default", *(by_any[n] for n in names)}
    return {n: s for n, s in every.items() if n in chosen}


def quick(cfg: AblateConfig) -> AblateConfig:
    """Every setting for a few steps, one seed, one fine-tuning lr (tests: a few minutes). The pretraining
    images are the clip art alone (colour-mix's photo crops take ~10 s to make)."""
    cfg.steps, cfg.batch, cfg.seeds, cfg.finetune_epochs, cfg.eval_every, cfg.lr_grid, cfg.gate_doublings = (
        4,
        32,
        (0,),
        1,
        1,
        (0.1,),
        0,
    )
    cfg.grid_extensions, cfg.budget_doublings = 0, 0
    if cfg.pretrain_dataset == AblateConfig.pretrain_dataset:
        cfg.pretrain_dataset = "clipart"
    return cfg


def validate(cfg: AblateConfig) -> None:
    check_seeds(cfg.seeds)
    readouts = ("cls", "mean")
    metrics = [f"knn20_{r}" for r in readouts] + [f"linear_{n}shot_{r}" for n in cfg.shots for r in readouts]
    if cfg.metric not in metrics:
        raise UsageError(f"--metric {cfg.metric!r} is not one of: {', '.join(metrics)}")
    if cfg.steps < 4:
        raise UsageError(f"--steps must be at least 4 (the 25% setting needs a step), got {cfg.steps}")
    if cfg.gate_doublings < 0:
        raise UsageError(f"--gate-doublings must not be negative, got {cfg.gate_doublings}")
    if not cfg.lr_grid or any(not lr > 0 for lr in cfg.lr_grid) or len(set(cfg.lr_grid)) != len(cfg.lr_grid):
        raise UsageError(f"--lr-grid needs distinct positive learning rates, got {list(cfg.lr_grid)}")
    if cfg.protocol_note and not cfg.resume:
        raise UsageError("--protocol-note says why a resumed ablation's protocol changed: give it with --resume")
    if not cfg.resume:
        check_fresh_output_dir(
            Path(cfg.runs_dir)
        )  # the results files in --output-dir are replaced, the runs never mixed


def materialise(cfg: AblateConfig, folder: Path) -> Path:
    """The pretraining images saved once (save_to_disk), so that each of the many pretraining
    processes memory-maps them instead of rebuilding the built-in set (colour-mix makes its photo
    crops anew on every load)."""
    from mpp.data.sources import load_images

    load_images(cfg.pretrain_dataset, "train").save_to_disk(str(folder))
    return folder


def pretrain_command(
    cfg: AblateConfig, setting: dict, seed: int, out: Path, dataset: str | Path | None = None, steps: int | None = None
) -> list[str]:
    steps = max(1, round((steps or cfg.steps) * setting["length"]))
    return command(
        "pretrain",
        *argv_for(
            PretrainConfig,
            dataset=dataset or cfg.pretrain_dataset,
            split="train",
            model=cfg.model,
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            target=setting["target"],
            mask_ratio=setting["mask_ratio"],
            mask_probs=setting["mask_probs"],
            corrupt_at=setting["corrupt_at"],
            max_steps=steps,
            batch_size=cfg.batch,
            lr=cfg.lr,
            warmup_steps=max(1, steps // 15),
            log_every=max(1, steps // 20),
            checkpoint_every=steps,
            seed=seed,
            progress=False,
            output_dir=out,
        ),
    )


def finetune_command(cfg: AblateConfig, seed: int, init: Path | str) -> list[str]:
    """Without --preset, --lr, --epochs and --output-dir (tuning.py adds them); a scratch init takes the
    pretrainings' architecture."""
    arch = dict(model=cfg.model, patch_size=cfg.patch_size) if str(init) == "scratch" else {}
    return command(
        "finetune",
        *argv_for(
            FinetuneConfig,
            dataset=cfg.downstream,
            train_split="train",
            eval_split="validation",
            test_split="test",
            init=init,
            **arch,
            img_size=cfg.img_size,
            batch_size=cfg.finetune_batch,
            eval_every=cfg.eval_every,
            log_every=10,
            checkpoint_every=1_000_000,
            seed=seed,
            progress=False,
        ),
    )


def load_probe_data(cfg: AblateConfig, seed: int) -> dict:
    from mpp.data.heldout import labelled_images

    train = labelled_images(cfg.downstream, "train", cfg.img_size, seed=seed)
    return {
        split: (*train, *labelled_images(cfg.downstream, split, cfg.img_size, seed=seed))
        for split in ("validation", "test")
    }


def probe_encoder(cfg: AblateConfig, encoder, data: dict, seed: int) -> dict:
    """{split: frozen-feature report} of an encoder."""
    from mpp.evaluation.probes import frozen_feature_report

    mean, std = encoder.pretrained_cfg["mean"], encoder.pretrained_cfg["std"]
    return {
        split: {
            k: v
            for k, v in frozen_feature_report(encoder, *d, mean, std, cfg.shots, draws=5, seed=seed).items()
            if not k.endswith("_std")
        }
        for split, d in data.items()
    }


def probe(cfg: AblateConfig, weights: Path, data: dict, seed: int) -> dict:
    from mpp.models.weights import load_backbone

    return probe_encoder(cfg, load_backbone(weights), data, seed)


def probe_random_init(cfg: AblateConfig, data: dict, seed: int) -> dict:
    """The seed's random-init encoder (what scratch fine-tuning starts from), probed like the others."""
    from mpp.models.model import create_encoder

    torch.manual_seed(seed)
    return probe_encoder(cfg, create_encoder(cfg.model, cfg.img_size, cfg.patch_size), data, seed)


def combine(terms: list, values: dict, metric: str) -> float:
    return sum(coef * values[name][metric] for coef, name in terms)


def paired(per_seed: dict, better: list, worse: list, metric: str, split: str):
    seeds = list(per_seed)
    return paired_difference(
        [combine(better, {n: per_seed[s][n][split] for n in per_seed[s]}, metric) for s in seeds],
        [combine(worse, {n: per_seed[s][n][split] for n in per_seed[s]}, metric) for s in seeds],
    )


def gate_check(per_seed: dict, metric: str, split: str = "validation") -> dict:
    """Does the default beat the random-init encoder on `metric`? Passed when the paired interval lies above 0."""
    d = paired(per_seed, [(1, "default")], [(1, RANDOM)], metric, split)
    return {"split": split, "difference": d.to_dict(), "passed": d.low is not None and d.low > 0}


def judge(per_seed: dict, metric: str, split: str = "test", gate: dict | None = None) -> dict:
    """Each finding's paired per-seed difference (better − worse) and verdict, or 'not judged' when a gate is
    given and did not pass; observations likewise, never judged."""
    ran = set.intersection(*(set(v) for v in per_seed.values()))
    needs_run = lambda terms: {name for _, name in terms} <= ran  # noqa: E731
    findings = {}
    for f in FINDINGS:
        if not needs_run(f.better + f.worse):  # a setting left out with --settings
            findings[f.key] = {"claim": f.claim, "source": f.source, "difference": None, "verdict": "not run"}
            continue
        d = paired(per_seed, f.better, f.worse, metric, split)
        judged = gate is None or gate["passed"]
        findings[f.key] = {
            "claim": f.claim,
            "source": f.source,
            "difference": d.to_dict(),
            "verdict": verdict(d) if judged else "not judged",
        }
    observations = {
        name: paired(per_seed, b, w, metric, split).to_dict() for name, b, w in OBSERVATIONS if needs_run(b + w)
    }
    return {"findings": findings, "observations": observations}


def floors(cfg: AblateConfig, data: dict, seed: int) -> dict:
    """{split: majority class, raw-pixel k-NN and few-shot linear} on the probes' own images."""
    from mpp.experiments.baselines import pixel_baselines

    return {split: pixel_baselines(*d, shots=cfg.shots, seed=seed) for split, d in data.items()}


def protocol(cfg: AblateConfig, test_images: int, classes: int) -> dict:
    return {
        "pretraining": f"{cfg.pretrain_dataset}, {cfg.model} at {cfg.img_size} px / patch {cfg.patch_size}, batch "
        f"{cfg.batch}, AdamW lr "
        f"{cfg.lr:g}, {cfg.steps} steps at the default length before the gate",
        "settings": {
            name: {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()} for name, s in cfg.settings.items()
        },
        "seeds": list(cfg.seeds),
        "metric": cfg.metric,
        "downstream": cfg.downstream,
        "classes": classes,
        "gate": (
            f"the default must beat the {RANDOM} on {cfg.metric} on the validation split with a paired 95% t-interval "
            "above 0; "
            f"else the budget doubles (up to {cfg.gate_doublings} times); without a passed gate no finding is judged"
        ),
        "verdicts": "on the test split: agrees when the paired interval lies above 0, disagrees when below, "
        "inconclusive when it covers 0",
        "best_setting": f"the highest mean {cfg.metric} on the validation split",
        "fine_tuning": (
            f"default, the best setting and scratch; paper preset, lr grid {list(cfg.lr_grid)} grown at an edge up to "
            f"{cfg.grid_extensions} times a side, {cfg.finetune_epochs:g} epochs doubled up to {cfg.budget_doublings} "
            "times while a "
            f"chosen run has not converged, chosen on seed {cfg.seeds[0]}'s validation split"
        ),
        "floors": ["chance (1 / classes)", "majority class", "raw-pixel k-NN and few-shot linear", RANDOM],
        "power": power_table(len(cfg.seeds), test_images),
    }


SCRIPT = "recipes/ablate.py"


def run_ablation(cfg: AblateConfig, argv: list[str] | None = None) -> dict:
    validate(cfg)
    start = time.time()
    origin = provenance(
        SCRIPT, argv or []
    )  # the code as it was at the start: a commit made mid-run must not be recorded
    runs = Path(cfg.runs_dir)
    run = reusing(run_in_process, reused := []) if cfg.resume else run_in_process
    data = {seed: load_probe_data(cfg, seed) for seed in cfg.seeds}
    first_test = data[cfg.seeds[0]]["test"]
    plan = protocol(cfg, len(first_test[2]), int(first_test[1].max()) + 1)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = record_protocol(
        out / "ablation_protocol.json", plan, origin, cfg.resume, cfg.protocol_note
    )  # before the first run
    images = runs / "pretrain_images"
    if not (cfg.resume and (images / "state.json").is_file()):
        materialise(cfg, images)
    per_seed = {seed: {RANDOM: probe_random_init(cfg, data[seed], seed)} for seed in cfg.seeds}
    timings: dict[str, float] = {}

    def pretrain_and_probe(name: str, steps: int) -> None:
        for seed in cfg.seeds:
            folder = runs / f"seed{seed}" / f"{folder_of(name)}_s{steps}"
            print(f"[seed {seed}] pretrain {name} ({steps} steps at 100%) ...", flush=True)
            timings[f"{seed}/{name}/{steps}"] = run(
                pretrain_command(cfg, cfg.settings[name], seed, folder, images, steps),
                folder.parent / "logs" / f"{folder.name}.log",
            )
            per_seed[seed][name] = probe(cfg, folder / "model.safetensors", data[seed], seed)

    steps, gates = cfg.steps, []
    for attempt in range(cfg.gate_doublings + 1):
        pretrain_and_probe("default", steps)
        gates.append({"steps": steps, **gate_check(per_seed, cfg.metric)})
        if gates[-1]["passed"] or attempt == cfg.gate_doublings:
            break
        steps *= 2
    gate = {
        "passed": gates[-1]["passed"],
        "steps": steps,
        "trials": gates,
        "on_test": gate_check(per_seed, cfg.metric, "test"),
    }
    for name in cfg.settings:
        if name != "default":
            pretrain_and_probe(name, steps)
    names = [*cfg.settings, RANDOM]
    metrics = list(per_seed[cfg.seeds[0]]["default"]["test"])
    summary = {
        name: {
            split: summary_over_seeds([per_seed[s][name][split] for s in cfg.seeds]) for split in ("validation", "test")
        }
        for name in names
    }
    best = max(cfg.settings, key=lambda n: summary[n]["validation"][cfg.metric]["mean"])
    floor_values = {seed: floors(cfg, data[seed], seed) for seed in cfg.seeds}
    floor_summary = {
        split: summary_over_seeds([floor_values[s][split] for s in cfg.seeds]) for split in ("validation", "test")
    }
    report = {
        "protocol": plan,
        "config": {**asdict(cfg), "settings": cfg.settings},
        "metrics": metrics,
        "per_seed": per_seed,
        "summary": summary,
        "floors": floor_summary,
        "chance": 1 / plan["classes"],
        "gate": gate,
        "budget_steps": steps,
        "best_setting": best,
        **judge(per_seed, cfg.metric, gate=gate),
        "verdicts_by_metric": {
            m: {k: v["verdict"] for k, v in judge(per_seed, m, gate=gate)["findings"].items()} for m in metrics
        },
        "versus_default": {
            n: paired(per_seed, [(1, n)], [(1, "default")], cfg.metric, "test").to_dict()
            for n in names
            if n != "default"
        },
        "pretrain_seconds": timings,
    }
    if cfg.finetune:
        report["finetune"] = finetune_rows(cfg, runs, best, steps, run)
    report.update(wall_time_s=time.time() - start, **origin, reused_stages=reused if cfg.resume else [])
    write_json(out / "ablation.json", report)
    (out / "ablation.md").write_text(markdown(report))
    figure(report, out / "ablation.png")
    return report


def finetune_rows(cfg: AblateConfig, runs: Path, best: str, steps: int, run=None) -> dict:
    """Fine-tune top-1 of the default, the best setting (by validation) and scratch, tuned as in the gap
    experiment: the first seed chooses each arm's lr (the paper preset) on validation."""
    arms = ["default"] + ([best] if best != "default" else []) + ["scratch"]
    per_seed, tuned = {arm: {} for arm in arms}, None
    for seed in cfg.seeds:
        root, logs = runs / f"seed{seed}", runs / f"seed{seed}" / "logs"
        inits = {
            arm: "scratch" if arm == "scratch" else root / f"{folder_of(arm)}_s{steps}" / "model.safetensors"
            for arm in arms
        }
        runner = finetune_runner(
            {arm: finetune_command(cfg, seed, inits[arm]) for arm in arms},
            root,
            logs,
            run or run_in_process,
            summarise_finetune,
        )
        named = {arm: folder_of(arm) for arm in arms}
        if tuned is None:
            print(f"[seed {seed}] tune the fine-tuning of {', '.join(arms)} ...", flush=True)
            rules = TuningRules(
                ("paper",), {"paper": cfg.lr_grid}, cfg.finetune_epochs, cfg.grid_extensions, cfg.budget_doublings
            )
            tuned = tune([named[a] for a in arms], runner_for(runner, named), rules)
            results = {arm: tuned.chosen[named[arm]] for arm in arms}
        else:
            print(f"[seed {seed}] fine-tune {', '.join(arms)} ...", flush=True)
            results = {
                arm: {
                    "preset": "paper",
                    "lr": tuned.chosen[named[arm]]["lr"],
                    **runner_for(runner, named)(named[arm], "paper", tuned.chosen[named[arm]]["lr"], tuned.epochs),
                }
                for arm in arms
            }
        for arm in arms:
            per_seed[arm][seed] = {
                k: results[arm][k] for k in ("test_top1", "best_val_top1", "lr", "best_epoch", "train_acc_last")
            }
    summary = {
        arm: summary_over_seeds([{k: r[k] for k in ("test_top1", "best_val_top1")} for r in per_seed[arm].values()])
        for arm in arms
    }
    seeds = list(cfg.seeds)
    differences = {
        f"{arm} − scratch": paired_difference(
            [per_seed[arm][s]["test_top1"] for s in seeds], [per_seed["scratch"][s]["test_top1"] for s in seeds]
        ).to_dict()
        for arm in arms
        if arm != "scratch"
    }
    if best != "default":
        differences[f"{best} − default"] = paired_difference(
            [per_seed[best][s]["test_top1"] for s in seeds], [per_seed["default"][s]["test_top1"] for s in seeds]
        ).to_dict()
    return {
        "arms": arms,
        "per_seed": per_seed,
        "summary": summary,
        "differences": differences,
        "epochs": tuned.epochs,
        "convergence": tuned.convergence,
        "grid": tuned.grids["paper"],
    }


def runner_for(runner, named: dict):
    """tune() passes run folder names (no spaces); the runner's commands are keyed by arm."""
    arm_of = {v: k for k, v in named.items()}
    return lambda name, preset, lr, epochs: runner(arm_of[name], preset, lr, epochs)


def protocol_changes(plan: dict) -> list[str]:
    """The protocols this one replaced, with the reason given, for the record."""
    if not plan.get("earlier_protocols"):
        return []
    earlier = "; ".join(
        f"{old.get('date', '?')[:16]}: settings {', '.join(old['settings'])}, seeds {old['seeds']}"
        for old in plan["earlier_protocols"]
    )
    return [
        f"**The protocol changed after it started**: {plan.get('protocol_note') or '(no reason given)'}. Earlier: "
        f"{earlier}.",
        "",
    ]


VERDICT_LETTERS = {"agrees": "a", "disagrees": "d", "inconclusive": "i", "not judged": "n", "not run": "−"}


def markdown(report: dict) -> str:
    cfg, summary, metrics, floors_ = report["config"], report["summary"], report["metrics"], report["floors"]
    primary = cfg["metric"]
    default = cfg["settings"]["default"]
    gate = report["gate"]
    g = gate["trials"][-1]["difference"]
    pixel_floor = lambda m: "pixels_knn20" if m.startswith("knn20") else f"pixels_{'_'.join(m.split('_')[:2])}"
    rows = [[name, *(pm(summary[name]["test"][m]) for m in metrics)] for name in [*cfg["settings"], RANDOM]]
    rows += [
        ["majority class", *(pm(floors_["test"]["majority"]) for _ in metrics)],
        ["raw pixels", *(pm(floors_["test"][pixel_floor(m)]) for m in metrics)],
        ["chance", *(f"{report['chance']:.3f}" for _ in metrics)],
    ]
    gate_line = (
        f"**Gate {'passed' if gate['passed'] else 'NOT passed'}** at {gate['steps']} steps: default − {RANDOM} on "
        f"`{primary}` "
        f"(validation) {g['phrase']}"
        + "".join(f"; at {t['steps']} steps {t['difference']['phrase']}" for t in gate["trials"][:-1])
        + f". On the test split: {gate['on_test']['difference']['phrase']}."
    )
    if not gate["passed"]:
        gate_line += (
            " The verdict metric could not show that pretraining beats a random encoder at the largest budget allowed, "
            "so it "
            "cannot tell two pretrainings apart either: no finding is judged."
        )
    lines = [
        "# MPP ablations in miniature (ViT paper, Appendix B.1.2)",
        "",
        *provenance_lines(report),
        "",
        "## Protocol (written to ablation_protocol.json before the first run)",
        "",
        f"Pretraining: `{cfg['pretrain_dataset']}` (train split, no labels), {cfg['model']} at {cfg['img_size']} px / "
        "patch "
        f"{cfg['patch_size']}, batch {cfg['batch']}, AdamW lr {cfg['lr']:g}; {report['budget_steps']} steps at the "
        "default length (the gate "
        f"settled on it). Default: target {default['target']}, {round(100 * default['mask_ratio'])}% of patches "
        "corrupted, mix "
        f"{'/'.join(str(round(100 * p)) for p in default['mask_probs'])} ([mask]/random/unchanged), at the "
        f"{default['corrupt_at']}; "
        "every other row changes one thing.",
        "",
        f"Probes of the frozen encoder on `{cfg['downstream']}` (fit on its train split, scored on validation and "
        "test): few-shot "
        "linear (closed form, mean of 5 draws) and k-NN (k=20); `cls` = class-token readout, `mean` = mean of the "
        "patch tokens. "
        f"Seeds {list(cfg['seeds'])}; mean ± sample std (ddof=1). "
        f"{report['protocol']['gate'][0].upper() + report['protocol']['gate'][1:]}. "
        f"Verdicts: {report['protocol']['verdicts']}. Power: with {len(cfg['seeds'])} seeds a paired t-test detects "
        "with 80% power "
        + ", ".join(
            f"{v:.3f} at a per-seed spread of {k}"
            for k, v in report["protocol"]["power"]["detectable_by_spread"].items()
            if v
        )
        + f"; the {report['protocol']['power']['test_images']} test images alone spread a per-seed difference by about "
        f"{report['protocol']['power']['test_image_spread_by_disagreement']['0.2']:.3f} (20% of images disagreeing).",
        "",
        *protocol_changes(report["protocol"]),
        "## The gate",
        "",
        gate_line,
        "",
        "## Test split",
        "",
        f"The setting with the best validation `{primary}`: {report['best_setting']}.",
        "",
        *table(["setting", *metrics], rows),
        "",
        f"Each setting − the default on `{primary}` (test), paired per seed:",
        "",
        *table(["setting", "difference"], [[n, d["phrase"]] for n, d in report["versus_default"].items()]),
        "",
        "## The paper's findings",
        "",
        f"Paired per-seed difference of `{primary}` on the test split (better − worse as the paper has it), 95% "
        "t-interval.",
        "",
        *table(
            ["", "finding", "difference", "verdict", "source"],
            [
                [
                    k,
                    f["claim"],
                    f["difference"]["phrase"] if f["difference"] else "—",
                    f"**{f['verdict']}**",
                    f["source"],
                ]
                for k, f in report["findings"].items()
            ],
        ),
        "",
        "The same verdicts under every probe metric (a = agrees, d = disagrees, i = inconclusive, n = not judged, − = "
        "not run):",
        "",
        *table(
            ["metric", *report["findings"]],
            [[m, *(VERDICT_LETTERS[report["verdicts_by_metric"][m][k]] for k in report["findings"])] for m in metrics],
        ),
        "",
    ]
    if report["observations"]:  # --settings may leave out every setting they need
        lines += [
            "Compared without a paper finding to judge (each doubling of the length with its own sign):",
            "",
            *table(["comparison", "difference"], [[n, d["phrase"]] for n, d in report["observations"].items()]),
            "",
        ]
    if "finetune" in report:
        ft = report["finetune"]
        lines += [
            "## Fine-tuning",
            "",
            f"`{cfg['downstream']}`, preset paper, lr from {[float(f'{x:.3g}') for x in ft['grid']]} chosen on seed "
            f"{cfg['seeds'][0]}'s "
            f"validation split, {ft['epochs']:g} epochs (validation every {cfg['eval_every']}); the test split scored "
            "once with the best "
            "validation epoch's weights.",
            "",
            *table(
                ["init", "test top-1", "best validation top-1", "lr"],
                [
                    [
                        arm,
                        pm(ft["summary"][arm]["test_top1"]),
                        pm(ft["summary"][arm]["best_val_top1"]),
                        f"{next(iter(ft['per_seed'][arm].values()))['lr']:.3g}",
                    ]
                    for arm in ft["arms"]
                ],
            ),
            "",
            *table(["comparison (test top-1)", "difference"], [[n, d["phrase"]] for n, d in ft["differences"].items()]),
            "",
        ]
    lines += [f"Wall time {report['wall_time_s'] / 60:.1f} min.", "", "![ablation](ablation.png)", ""]
    return "\n".join(lines)


def figure(report: dict, path: Path) -> None:
    """One panel per axis: the verdict metric (test) of each setting, with the 95% paired interval of its
    difference to the default drawn around it; lines for chance, the majority class, the random-init
    encoder and the raw pixels."""
    from matplotlib.figure import Figure

    cfg, summary, metric = report["config"], report["summary"], report["config"]["metric"]
    floors_ = report["floors"]["test"]
    pixel = "pixels_knn20" if metric.startswith("knn20") else f"pixels_{'_'.join(metric.split('_')[:2])}"
    fig = Figure(figsize=(3 * len(AXES), 3.4), layout="constrained")
    axes = fig.subplots(1, len(AXES), sharey=True)
    for ax, (axis, changes) in zip(axes, AXES.items()):
        names = ["default"] + [
            n for n in (setting_name(k, v) for k, v in changes) if n in summary
        ]  # --settings may leave some out
        if axis == "pretraining length":
            names = sorted(names, key=lambda n: cfg["settings"][n]["length"])
        means = [summary[n]["test"][metric]["mean"] for n in names]
        errors = np.zeros((2, len(names)))
        for i, n in enumerate(names):
            d = report["versus_default"].get(n)
            if d and d["low"] is not None:  # the paired interval of (setting − default), placed on the setting's bar
                errors[:, i] = [d["mean"] - d["low"], d["high"] - d["mean"]]
        ax.bar(
            range(len(names)), means, yerr=errors, capsize=3, color=["C1" if n == "default" else "C0" for n in names]
        )
        for value, style, label in (
            (report["chance"], "k:", "chance"),
            (floors_["majority"]["mean"], "k-.", "majority class"),
            (summary[RANDOM]["test"][metric]["mean"], "g--", RANDOM),
            (floors_[pixel]["mean"], "r--", "raw pixels"),
        ):
            ax.axhline(value, linestyle=style[1:], color=style[0], lw=1, label=label)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(axis, fontsize=9)
    axes[0].set_ylabel(f"{metric} (test)")
    axes[-1].legend(fontsize=6, loc="lower right")
    fig.suptitle(
        "bars: mean over seeds; error bars: 95% paired interval of setting − default; "
        f"{'gate passed' if report['gate']['passed'] else 'gate NOT passed: not judged'}",
        fontsize=8,
    )
    fig.savefig(path, dpi=120)
