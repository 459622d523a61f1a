"""Appendix B.1.2 in miniature: MPP's design choices, one axis at a time, judged by frozen features.

Every setting is the default with one axis changed, so the default is pretrained once per seed and
shared by all axes. Each pretraining is the real recipe's main() called in this process (a process
per run would spend ~5 s of every short run importing torch); the frozen encoder is
probed (few-shot linear 5/10-shot, k-NN; cls and mean readouts) on the colour downstream set's
validation split (which chooses the best setting) and test split (which is reported). The default
and the best setting are then fine-tuned under gap.py's rules (lr from one grid chosen on validation,
test scored once). Each paper finding gets a verdict from paired per-seed differences.
"""
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from mpp.errors import UsageError
from mpp.experiments.harness import (check_fresh_output_dir, check_seeds, reusing, finetune_at, finetune_over_grid, pm, provenance, provenance_lines, recipe,
                         run_in_process, summary_over_seeds, table, write_json)
from mpp.evaluation.stats import paired_difference, verdict

# The paper's setting (App. B.1.2): 50% of patches, 80% [mask] / 10% random patch / 10% unchanged,
# 3-bit mean colour, corruption of the patch embeddings.
DEFAULT = {"target": "mean3bit", "mask_ratio": 0.5, "mask_probs": (0.8, 0.1, 0.1), "corrupt_at": "embedding", "length": 1.0}
AXES = {
    "target": [("target", "mean3bit_4x4"), ("target", "pixels_l2")],
    "corruption rate": [("mask_ratio", 0.15), ("mask_ratio", 0.75)],
    "corruption mix": [("mask_probs", (1.0, 0.0, 0.0))],
    "corrupt at": [("corrupt_at", "pixels")],
    "pretraining length": [("length", 0.25), ("length", 0.5), ("length", 2.0)],
}


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
    Finding("a1", "3-bit mean colour beats the 4×4 3-bit target in few-shot", "App. B.1.2: option 1 'has shown best few-shot performance'",
            [(1, "default")], [(1, setting_name("target", "mean3bit_4x4"))]),
    Finding("a2", "3-bit mean colour beats L2 regression on the pixels", "App. B.1.2: 'all worked quite well, though L2 was slightly worse'",
            [(1, "default")], [(1, setting_name("target", "pixels_l2"))]),
    Finding("b", "50% corruption beats BERT's 15%", "App. B.1.2: 15% 'results were also slightly worse on our few-shot metrics'",
            [(1, "default")], [(1, setting_name("mask_ratio", 0.15))]),
    Finding("c", "the 80/10/10 mix beats all-[mask] (100/0/0)", "the paper's choice, taken from BERT; the paper reports no ablation of it",
            [(1, "default")], [(1, setting_name("mask_probs", (1.0, 0.0, 0.0)))]),
    Finding("d", "diminishing returns: doubling 25%→50% of the steps gains more than doubling 100%→200%",
            "App. B.1.2: 'diminishing returns on downstream performance after 100k pretraining steps'",
            [(1, setting_name("length", 0.5)), (-1, setting_name("length", 0.25))], [(1, setting_name("length", 2.0)), (-1, "default")]),
]
# compared and reported, without a paper finding to judge
OBSERVATIONS = [
    ("75% corruption vs 50%", [(1, setting_name("mask_ratio", 0.75))], [(1, "default")]),
    ("pixel-space vs embedding-space corruption", [(1, setting_name("corrupt_at", "pixels"))], [(1, "default")]),
    ("200% vs 100% of the steps", [(1, setting_name("length", 2.0))], [(1, "default")]),
]


@dataclass
class AblateConfig:
    pretrain_dataset: str = "colour-mix"  # unlabelled colour images (clip art of every folder, train split, + photo crops)
    downstream: str = "clipart-downstream"
    model: str = "test_vit"
    img_size: int = 32
    patch_size: int = 8  # 16 patches: 15% corrupts 2 of them, 75% 12; a 4x4 target cell is 2x2 pixels
    # the default length; the length axis scales it. Measured on 2 cores: ~0.21 s a step of 128 at 32 px /
    # patch 8 (about 600-750 img/s, 45% of it waiting for the per-image crops), so the 3 x 9.75 default
    # lengths of pretraining take ~40 min and the whole grid ~50 min
    steps: int = 400
    batch: int = 128
    lr: float = 1e-3
    metric: str = "linear_10shot_mean"  # decides the verdicts and the best setting (on validation)
    shots: tuple[int, ...] = (5, 10)
    finetune_epochs: float = 100  # 400 steps of 64 on the 293 training images
    finetune_batch: int = 64
    eval_every: int = 5
    lr_grid: tuple[float, ...] = (0.01, 0.03, 0.1)
    lr_selection: str = "first-seed"  # per-seed would add 8 fine-tunings (~6 min) to the 60-minute budget
    seeds: tuple[int, ...] = (0, 1, 2)
    output_dir: str = "benchmarks/results"
    runs_dir: str = "runs/ablate"
    finetune: bool = True
    resume: bool = False  # continue in runs_dir: finished stages are kept (experiment.reusing)
    settings: dict = field(default_factory=all_settings)


def quick(cfg: AblateConfig) -> AblateConfig:
    """Every setting for a few steps, one seed, one fine-tuning lr (tests: under 2 minutes). The
    pretraining images are the clip art alone (colour-mix's photo crops take ~10 s to make)."""
    cfg.steps, cfg.batch, cfg.seeds, cfg.finetune_epochs, cfg.eval_every, cfg.lr_grid = 4, 32, (0,), 1, 1, (0.1,)
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
    if cfg.lr_selection not in ("per-seed", "first-seed"):
        raise UsageError(f"--lr-selection must be per-seed or first-seed, got {cfg.lr_selection!r}")
    if not cfg.resume:
        check_fresh_output_dir(Path(cfg.runs_dir))  # the results files in --output-dir are replaced, the runs never mixed


def materialise(cfg: AblateConfig, folder: Path) -> Path:
    """The pretraining images saved once (save_to_disk), so that each of the many pretraining
    processes memory-maps them instead of rebuilding the built-in set (colour-mix makes its photo
    crops anew on every load)."""
    from mpp.data.dataset import load_images

    load_images(cfg.pretrain_dataset, "train").save_to_disk(str(folder))
    return folder


def pretrain_command(cfg: AblateConfig, setting: dict, seed: int, out: Path, dataset: str | Path | None = None) -> list[str]:
    steps = max(1, round(cfg.steps * setting["length"]))
    return recipe("pretrain_mpp.py", "--dataset", dataset or cfg.pretrain_dataset, "--split", "train", "--model", cfg.model,
                  "--img-size", cfg.img_size, "--patch-size", cfg.patch_size, "--target", setting["target"],
                  "--mask-ratio", setting["mask_ratio"], "--mask-probs", *setting["mask_probs"], "--corrupt-at", setting["corrupt_at"],
                  "--max-steps", steps, "--batch-size", cfg.batch, "--lr", cfg.lr, "--warmup-steps", max(1, steps // 15),
                  "--log-every", max(1, steps // 20), "--checkpoint-every", steps, "--seed", seed, "--no-progress", "--output-dir", out)


def finetune_command(cfg: AblateConfig, seed: int, init: Path) -> list[str]:
    return recipe("finetune.py", "--dataset", cfg.downstream, "--train-split", "train", "--eval-split", "validation", "--test-split", "test",
                  "--init", init, "--img-size", cfg.img_size, "--preset", "paper", "--epochs", cfg.finetune_epochs,
                  "--batch-size", cfg.finetune_batch, "--eval-every", cfg.eval_every, "--log-every", 10, "--checkpoint-every", 1_000_000,
                  "--seed", seed, "--no-progress")


def load_probe_data(cfg: AblateConfig, seed: int) -> dict:
    from mpp.data.dataset import labelled_images

    train = labelled_images(cfg.downstream, "train", cfg.img_size, seed=seed)
    return {split: (*train, *labelled_images(cfg.downstream, split, cfg.img_size, seed=seed)) for split in ("validation", "test")}


def probe(cfg: AblateConfig, weights: Path, data: dict, seed: int) -> dict:
    """{split: frozen-feature report} of the encoder in `weights`."""
    from mpp.evaluation.probes import frozen_feature_report
    from mpp.models.weights import load_backbone

    encoder = load_backbone(weights)
    mean, std = encoder.pretrained_cfg["mean"], encoder.pretrained_cfg["std"]
    return {split: {k: v for k, v in frozen_feature_report(encoder, *d, mean, std, cfg.shots, draws=5, seed=seed).items()
                    if not k.endswith("_std")} for split, d in data.items()}


def combine(terms: list, values: dict, metric: str) -> float:
    return sum(coef * values[name][metric] for coef, name in terms)


def judge(per_seed: dict, metric: str, split: str = "test") -> dict:
    """Each finding's paired per-seed difference (better − worse) and verdict; observations likewise, unjudged."""
    seeds = list(per_seed)

    def diff(better, worse):
        return paired_difference([combine(better, {n: per_seed[s][n][split] for n in per_seed[s]}, metric) for s in seeds],
                                 [combine(worse, {n: per_seed[s][n][split] for n in per_seed[s]}, metric) for s in seeds])

    findings = {}
    for f in FINDINGS:
        d = diff(f.better, f.worse)
        findings[f.key] = {"claim": f.claim, "source": f.source, "difference": d.to_dict(), "verdict": verdict(d)}
    observations = {name: diff(b, w).to_dict() for name, b, w in OBSERVATIONS}
    return {"findings": findings, "observations": observations}


SCRIPT = "recipes/ablate.py"


def run_ablation(cfg: AblateConfig, argv: list[str] | None = None) -> dict:
    validate(cfg)
    start = time.time()
    origin = provenance(SCRIPT, argv or [])  # the code as it was at the start: a commit made mid-run must not be recorded
    runs = Path(cfg.runs_dir)
    per_seed, timings, reused = {}, {}, []
    run = reusing(run_in_process, reused) if cfg.resume else run_in_process
    images = runs / "pretrain_images"
    if not (cfg.resume and (images / "state.json").is_file()):
        materialise(cfg, images)
    for seed in cfg.seeds:
        data = load_probe_data(cfg, seed)
        per_seed[seed] = {}
        for name, setting in cfg.settings.items():
            out = runs / f"seed{seed}" / folder_of(name)
            print(f"[seed {seed}] pretrain {name} ...", flush=True)
            timings[f"{seed}/{name}"] = run(pretrain_command(cfg, setting, seed, out, images), out.parent / "logs" / f"{out.name}.log")
            per_seed[seed][name] = probe(cfg, out / "model.safetensors", data, seed)
    metrics = list(next(iter(per_seed.values()))["default"]["test"])
    summary = {name: {split: summary_over_seeds([per_seed[s][name][split] for s in cfg.seeds]) for split in ("validation", "test")}
               for name in cfg.settings}
    best = max(cfg.settings, key=lambda n: summary[n]["validation"][cfg.metric]["mean"])
    report = {"config": {**asdict(cfg), "settings": cfg.settings}, "metrics": metrics, "per_seed": per_seed, "summary": summary,
              "best_setting": best, **judge(per_seed, cfg.metric),
              "verdicts_by_metric": {m: {k: v["verdict"] for k, v in judge(per_seed, m)["findings"].items()} for m in metrics},
              "pretrain_seconds": timings}
    if cfg.finetune:
        report["finetune"] = finetune_rows(cfg, runs, best, run)
    report.update(wall_time_s=time.time() - start, **origin, reused_stages=reused)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "ablation.json", report)
    (out / "ablation.md").write_text(markdown(report))
    figure(report, out / "ablation.png")
    return report


def finetune_rows(cfg: AblateConfig, runs: Path, best: str, run=None) -> dict:
    """Fine-tune top-1 of the default and of the best setting (by validation), gap.py's rules."""
    arms = ["default"] + ([best] if best != "default" else [])
    per_seed, first = {arm: {} for arm in arms}, {}
    for i, seed in enumerate(cfg.seeds):
        for arm in arms:
            pretrained = runs / f"seed{seed}" / folder_of(arm)
            base = finetune_command(cfg, seed, pretrained / "model.safetensors")
            logs, name = runs / f"seed{seed}" / "logs", f"finetune_{pretrained.name}"
            print(f"[seed {seed}] fine-tune {arm} ...", flush=True)
            if cfg.lr_selection == "per-seed" or i == 0:
                per_seed[arm][seed] = finetune_over_grid(base, cfg.lr_grid, runs / f"seed{seed}", logs, name, run)
                first.setdefault(arm, per_seed[arm][seed]["chosen_lr"])
            else:
                per_seed[arm][seed] = finetune_at(base, first[arm], runs / f"seed{seed}", logs, name, run)
    summary = {arm: summary_over_seeds([{k: r[k] for k in ("test_top1", "best_val_top1")} for r in per_seed[arm].values()]) for arm in arms}
    rows = {"arms": arms, "per_seed": per_seed, "summary": summary}
    if len(arms) == 2:
        seeds = list(cfg.seeds)
        rows["best_minus_default"] = paired_difference([per_seed[best][s]["test_top1"] for s in seeds],
                                                       [per_seed["default"][s]["test_top1"] for s in seeds]).to_dict()
    return rows


def markdown(report: dict) -> str:
    cfg, summary, metrics = report["config"], report["summary"], report["metrics"]
    primary = cfg["metric"]
    default = cfg["settings"]["default"]
    lines = [
        "# MPP ablations in miniature (ViT paper, Appendix B.1.2)", "", *provenance_lines(report), "",
        f"Pretraining: `{cfg['pretrain_dataset']}` (train split, no labels), {cfg['model']} at {cfg['img_size']} px / patch "
        f"{cfg['patch_size']}, {cfg['steps']} steps of batch {cfg['batch']} at the default length, AdamW lr {cfg['lr']:g}. "
        f"Default: target {default['target']}, {round(100 * default['mask_ratio'])}% of patches corrupted, mix "
        f"{'/'.join(str(round(100 * p)) for p in default['mask_probs'])} ([mask]/random/unchanged), at the {default['corrupt_at']}; "
        "every other row changes one thing.", "",
        f"Probes of the frozen encoder on `{cfg['downstream']}` (fit on its train split, scored on its test split): few-shot "
        f"linear (closed form, mean of 5 draws) and k-NN (k=20); `cls` = class-token readout, `mean` = mean of the patch tokens. "
        f"Seeds {list(cfg['seeds'])}; mean ± sample std (ddof=1). Verdicts use `{primary}`; the best setting is chosen on the "
        "validation split by the same metric.", "",
        *table(["setting", *metrics], [[name + (" (best)" if name == report["best_setting"] else ""),
                                        *(pm(summary[name]["test"][m]) for m in metrics)] for name in cfg["settings"]]), "",
        "## The paper's findings", "",
        f"Paired per-seed difference of `{primary}` (better − worse as the paper has it), 95% t-interval: agrees when the "
        "interval lies above 0, disagrees when below, inconclusive when it covers 0.", "",
        *table(["", "finding", "difference", "verdict", "source"],
               [[k, f["claim"], f["difference"]["phrase"], f"**{f['verdict']}**", f["source"]] for k, f in report["findings"].items()]), "",
        "The same verdicts under every probe metric (a = agrees, d = disagrees, i = inconclusive):", "",
        *table(["metric", *report["findings"]], [[m, *(report["verdicts_by_metric"][m][k][0] for k in report["findings"])] for m in metrics]), "",
        "Compared without a paper finding to judge:", "",
        *table(["comparison", "difference"], [[n, d["phrase"]] for n, d in report["observations"].items()]), "",
    ]
    if "finetune" in report:
        ft = report["finetune"]
        lines += ["## Fine-tuning", "",
                  f"`{cfg['downstream']}`, preset paper, at most {cfg['finetune_epochs']:g} epochs, validation every {cfg['eval_every']}; "
                  f"lr from {list(cfg['lr_grid'])} chosen on validation ({cfg['lr_selection']}); the test split scored once with the best "
                  "validation epoch's weights.", "",
                  *table(["setting", "test top-1", "best validation top-1", "chosen lr per seed"],
                         [[arm, pm(ft["summary"][arm]["test_top1"]), pm(ft["summary"][arm]["best_val_top1"]),
                           ", ".join(f"{r['chosen_lr']:g}" for r in ft["per_seed"][arm].values())] for arm in ft["arms"]]), ""]
        if "best_minus_default" in ft:
            lines += [f"Best − default, test top-1: {ft['best_minus_default']['phrase']}.", ""]
        else:
            lines += ["The default is the best setting on validation, so it is fine-tuned alone.", ""]
    lines += [f"Wall time {report['wall_time_s'] / 60:.1f} min.", "", "![ablation](ablation.png)", ""]
    return "\n".join(lines)


def figure(report: dict, path: Path) -> None:
    """One panel per axis: the primary metric (test split) of each of its settings, default included."""
    from matplotlib.figure import Figure

    cfg, summary, metric = report["config"], report["summary"], report["config"]["metric"]
    fig = Figure(figsize=(3 * len(AXES), 3.2), layout="constrained")
    axes = fig.subplots(1, len(AXES), sharey=True)
    for ax, (axis, changes) in zip(axes, AXES.items()):
        names = ["default"] + [setting_name(k, v) for k, v in changes]
        if axis == "pretraining length":
            names = sorted(names, key=lambda n: cfg["settings"][n]["length"])
        means = [summary[n]["test"][metric]["mean"] for n in names]
        stds = [summary[n]["test"][metric]["std"] or 0 for n in names]
        ax.bar(range(len(names)), means, yerr=stds, capsize=3, color=["C1" if n == "default" else "C0" for n in names])
        ax.set_xticks(range(len(names)), [n.replace("default", "default") for n in names], rotation=30, ha="right", fontsize=7)
        ax.set_title(axis, fontsize=9)
    axes[0].set_ylabel(f"{metric} (test)")
    fig.savefig(path, dpi=120)
