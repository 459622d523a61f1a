"""The paper's gap experiment (§4.6) as a transfer: scratch vs MPP vs supervised pretraining.

Upstream, MPP (no labels) and supervised pretraining see the same images for the same steps,
batch and optimiser; the supervised arm learns a label space disjoint from the downstream one.
Downstream, each arm is fine-tuned at every lr of one grid; the lr with the best validation top-1
is kept and its best-by-validation weights are scored once on the test split. The frozen encoders
are probed (few-shot linear, k-NN; class-token and mean-patch readouts) on the downstream train/test
splits. Every stage is a real recipe's main(), called in this process with its output in a log
(a process per stage would spend seconds of each short stage importing torch).
"""
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from mpp.errors import UsageError
from mpp.experiments.harness import (check_fresh_output_dir, check_seeds, finetune_at, finetune_over_grid, pm, provenance, provenance_lines, recipe,
                         run_in_process, summary_over_seeds, table, write_json)
from mpp.evaluation.stats import paired_difference

INITS = ("scratch", "mpp", "supervised")
COMPARISONS = {"MPP − scratch": ("mpp", "scratch"), "supervised − MPP": ("supervised", "mpp")}
LR_SELECTIONS = ("per-seed", "first-seed")

# Per setting: the data and the sizes that fit it. colour (the headline): clip-art classes split in
# two disjoint halves; grey: Fashion-MNIST classes 0-4 upstream, 5-9 downstream.
SETTINGS = {
    "colour": dict(upstream="clipart-upstream", downstream="clipart-downstream", train_per_class=None, img_size=32, patch_size=8,
                   pretrain_steps=1000, pretrain_batch=128, finetune_epochs=200, finetune_batch=64, eval_every=5),
    "grey": dict(upstream="fashion-mnist-upstream", downstream="fashion-mnist-downstream", train_per_class=100, img_size=28,
                 patch_size=7, pretrain_steps=1200, pretrain_batch=256, finetune_epochs=200, finetune_batch=100, eval_every=5),
}


@dataclass
class GapConfig:
    setting: str = "colour"
    upstream: str = "clipart-upstream"
    downstream: str = "clipart-downstream"
    train_per_class: int | None = None  # None: every downstream training image
    model: str = "test_vit"
    img_size: int = 32
    patch_size: int = 8
    pretrain_steps: int = 1000
    pretrain_batch: int = 128
    pretrain_lr: float = 1e-3
    finetune_epochs: float = 200  # the most; the epoch with the best validation top-1 is kept
    finetune_batch: int = 64
    eval_every: int = 5  # epochs between validation evaluations
    preset: str = "paper"
    lr_grid: tuple[float, ...] = (0.01, 0.03, 0.1)
    lr_selection: str = "per-seed"  # or first-seed: the first seed's validation chooses for all seeds
    shots: tuple[int, ...] = (1, 5, 10)
    seeds: tuple[int, ...] = (0, 1, 2)
    output_dir: str = "runs/gap"
    eval_limit: int | None = None  # probes on a stratified part of the test split (quick mode)


def make_config(setting: str = "colour", **overrides) -> GapConfig:
    """The setting's defaults, then every override that is not None."""
    if setting not in SETTINGS:
        raise UsageError(f"--setting {setting!r} is not one of: {', '.join(SETTINGS)}")
    known = {f.name for f in fields(GapConfig)}
    values = {**SETTINGS[setting], **{k: v for k, v in overrides.items() if v is not None and k in known}}
    return GapConfig(setting=setting, **values)


def quick(cfg: GapConfig) -> GapConfig:
    """A few steps of everything, one seed, a two-value grid (for the tests; about a minute on 2 cores)."""
    cfg.pretrain_steps, cfg.pretrain_batch, cfg.finetune_epochs, cfg.eval_every = 4, 32, 2, 1
    cfg.finetune_batch, cfg.lr_grid, cfg.shots, cfg.seeds, cfg.eval_limit = 32, (0.01, 0.1), (1, 5), (0,), 200
    if cfg.train_per_class is not None:
        cfg.train_per_class = 10
    return cfg


def validate(cfg: GapConfig) -> None:
    """Every check that needs no training, before any run starts."""
    check_seeds(cfg.seeds)
    if cfg.lr_selection not in LR_SELECTIONS:
        raise UsageError(f"--lr-selection {cfg.lr_selection!r} is not one of: {', '.join(LR_SELECTIONS)}")
    if not cfg.lr_grid or any(not lr > 0 for lr in cfg.lr_grid) or len(set(cfg.lr_grid)) != len(cfg.lr_grid):
        raise UsageError(f"--lr-grid needs distinct positive learning rates, got {list(cfg.lr_grid)}")
    if cfg.train_per_class is not None and max(cfg.shots) > cfg.train_per_class:
        raise UsageError(f"--shots {max(cfg.shots)} is more than the {cfg.train_per_class} labelled images per class (--train-per-class)")
    if cfg.pretrain_steps < 1 or cfg.finetune_epochs <= 0 or cfg.eval_every < 1:
        raise UsageError("--pretrain-steps, --finetune-epochs and --eval-every must be positive")
    check_fresh_output_dir(Path(cfg.output_dir))


def pretrain_commands(cfg: GapConfig, seed: int, root: Path) -> dict[str, list[str]]:
    """MPP and supervised pretraining on the same upstream training images, with the same steps,
    batch, lr schedule, AdamW settings, clipping and augmentation."""
    arch = ["--model", cfg.model, "--img-size", cfg.img_size, "--patch-size", cfg.patch_size, "--seed", seed, "--no-progress"]
    shared = ["--max-steps", cfg.pretrain_steps, "--batch-size", cfg.pretrain_batch, "--lr", cfg.pretrain_lr,
              "--warmup-steps", max(1, cfg.pretrain_steps // 15), "--min-lr", 0, "--weight-decay", 0.05, "--clip-grad", 1,
              "--crop-scale", 0.35, 1.0, "--hflip", 0.5, "--log-every", max(1, cfg.pretrain_steps // 30),
              "--checkpoint-every", cfg.pretrain_steps]
    return {
        "mpp": recipe("pretrain_mpp.py", "--dataset", cfg.upstream, "--split", "train", *arch, *shared, "--output-dir", root / "mpp"),
        # the fine-tuning recipe on the upstream labels; validation is never looked at (--eval-every
        # beyond the run), the final weights are the init
        "supervised": recipe("finetune.py", "--dataset", cfg.upstream, "--train-split", "train", "--eval-split", "validation",
                             "--init", "scratch", *arch, *shared, "--opt", "adamw", "--no-zero-head", "--eval-every", 1_000_000,
                             "--output-dir", root / "supervised"),
    }


def init_of(arm: str, root: Path) -> str:
    return "scratch" if arm == "scratch" else str(root / arm / "model.safetensors")


def finetune_command(cfg: GapConfig, seed: int, init: str) -> list[str]:
    """The downstream fine-tuning of one arm, without --lr and --output-dir (the grid adds them):
    identical for the three arms but for --init."""
    subset = ["--train-per-class", cfg.train_per_class] if cfg.train_per_class else []
    return recipe("finetune.py", "--dataset", cfg.downstream, "--train-split", "train", "--eval-split", "validation",
                  "--test-split", "test", *subset, "--subset-seed", seed, "--init", init, "--model", cfg.model,
                  "--img-size", cfg.img_size, "--patch-size", cfg.patch_size, "--preset", cfg.preset,
                  "--epochs", cfg.finetune_epochs, "--batch-size", cfg.finetune_batch, "--eval-every", cfg.eval_every,
                  "--log-every", 10, "--checkpoint-every", 1_000_000, "--seed", seed, "--no-progress")


def probe_encoders(cfg: GapConfig, seed: int, root: Path, data) -> dict[str, dict]:
    """Few-shot linear and k-NN accuracy of each arm's frozen encoder (scratch: the seed's random init)."""
    from mpp.evaluation.probes import describe_readouts, frozen_feature_report
    from mpp.models.model import create_encoder
    from mpp.models.weights import load_backbone

    torch.manual_seed(seed)
    encoders = {"scratch": create_encoder(cfg.model, cfg.img_size, cfg.patch_size),
                "mpp": load_backbone(root / "mpp" / "model.safetensors"),
                "supervised": load_backbone(root / "supervised" / "model.safetensors")}
    reports = {}
    for name, encoder in encoders.items():
        mean, std = encoder.pretrained_cfg["mean"], encoder.pretrained_cfg["std"]
        reports[name] = frozen_feature_report(encoder, *data, mean, std, cfg.shots, draws=5, seed=seed)
    reports["readouts"] = describe_readouts(encoders["mpp"])
    return reports


def probe_data(cfg: GapConfig, seed: int):
    from mpp.data.dataset import labelled_images

    train = labelled_images(cfg.downstream, "train", cfg.img_size, per_class=cfg.train_per_class, seed=seed)
    test = labelled_images(cfg.downstream, "test", cfg.img_size, limit=cfg.eval_limit, seed=seed)
    return (*train, *test)


def label_spaces(cfg: GapConfig) -> dict:
    from mpp.data.dataset import class_names_of, find_label_column, load_images

    names = {}
    for side in ("upstream", "downstream"):
        ds = load_images(getattr(cfg, side), "train")
        names[side] = class_names_of(ds, find_label_column(ds, None))
    return {**names, "disjoint": not set(names["upstream"]) & set(names["downstream"])}


def check_shots(cfg: GapConfig, train_labels: torch.Tensor) -> None:
    smallest = int(torch.bincount(train_labels.long()).min())
    if max(cfg.shots) > smallest:
        raise UsageError(f"--shots {max(cfg.shots)} is more than the {smallest} training images of the smallest downstream class")


SCRIPT = "recipes/gap.py"


def run_gap(cfg: GapConfig, argv: list[str] | None = None) -> dict:
    validate(cfg)
    import time

    start = time.time()
    origin = provenance(SCRIPT, argv or [])  # the code as it was at the start: a commit made mid-run must not be recorded
    out = Path(cfg.output_dir)
    spaces = label_spaces(cfg)
    per_seed, chosen_first = {}, {}
    for i, seed in enumerate(cfg.seeds):
        root, logs = out / f"seed{seed}", out / f"seed{seed}" / "logs"
        data = probe_data(cfg, seed)
        check_shots(cfg, data[1])  # before any training
        for name, cmd in pretrain_commands(cfg, seed, root).items():
            print(f"[seed {seed}] pretrain {name} ...", flush=True)
            run_in_process(cmd, logs / f"pretrain_{name}.log")
        finetuned = {}
        for arm in INITS:
            base = finetune_command(cfg, seed, init_of(arm, root))
            if cfg.lr_selection == "per-seed" or i == 0:
                print(f"[seed {seed}] fine-tune {arm} at lr {', '.join(map(str, cfg.lr_grid))} ...", flush=True)
                finetuned[arm] = finetune_over_grid(base, cfg.lr_grid, root, logs, f"finetune_{arm}")
                chosen_first.setdefault(arm, finetuned[arm]["chosen_lr"])
            else:
                print(f"[seed {seed}] fine-tune {arm} at the first seed's lr {chosen_first[arm]} ...", flush=True)
                finetuned[arm] = finetune_at(base, chosen_first[arm], root, logs, f"finetune_{arm}")
        probes = probe_encoders(cfg, seed, root, data)
        per_seed[seed] = {arm: {"test_top1": finetuned[arm]["test_top1"], "best_val_top1": finetuned[arm]["best_val_top1"],
                                "chosen_lr": finetuned[arm]["chosen_lr"], "best_epoch": finetuned[arm]["best_epoch"],
                                "train_acc_last": finetuned[arm]["train_acc_last"], **probes[arm]} for arm in INITS}
        per_seed[seed]["finetune_runs"] = {arm: finetuned[arm]["by_lr"] for arm in INITS}
        readouts = probes["readouts"]
        print(f"[seed {seed}] test top-1: " + ", ".join(f"{a} {per_seed[seed][a]['test_top1']:.4f}" for a in INITS), flush=True)
    report = {"config": asdict(cfg), "label_spaces": spaces, "readouts": readouts, "per_seed": per_seed,
              **summarise(per_seed), "wall_time_s": time.time() - start, **origin}
    write_json(out / "results.json", report)
    (out / "results.md").write_text(markdown(report))
    bar_chart(report["summary"], out / "gap.png")
    return report


def metric_names(per_seed: dict) -> list[str]:
    """The numbers compared across arms: fine-tune top-1, then the probes (no _std of the draws)."""
    first = next(iter(per_seed.values()))["scratch"]
    probes = [k for k in first if k.startswith(("knn", "linear_")) and not k.endswith("_std")]
    return ["test_top1", "best_val_top1", *probes]


def summarise(per_seed: dict) -> dict:
    """{"summary": {arm: {metric: mean_std}}, "differences": {comparison: {metric: paired difference}}}:
    the differences pair the arms seed by seed."""
    seeds = list(per_seed)
    metrics = metric_names(per_seed)
    summary = {arm: {m: v for m, v in summary_over_seeds([per_seed[s][arm] for s in seeds]).items() if m in metrics + ["best_epoch"]}
               for arm in INITS}
    differences = {name: {m: paired_difference([per_seed[s][a][m] for s in seeds], [per_seed[s][b][m] for s in seeds]).to_dict()
                          for m in metrics} for name, (a, b) in COMPARISONS.items()}
    return {"summary": summary, "differences": differences}


def markdown(report: dict) -> str:
    cfg, s, per_seed = report["config"], report["summary"], report["per_seed"]
    metrics = [m for m in s["scratch"] if m != "best_epoch"]
    seeds = list(per_seed)
    spaces = report["label_spaces"]
    subset = f"{cfg['train_per_class']} labelled images per class" if cfg["train_per_class"] else "all its labelled training images"
    selection = ("each seed's own validation split" if cfg["lr_selection"] == "per-seed"
                 else f"seed {cfg['seeds'][0]}'s validation split, kept for the other seeds")
    lines = [
        f"# Gap experiment ({cfg['setting']}): fine-tuning from scratch vs MPP vs supervised pretraining", "",
        *provenance_lines(report), "",
        f"Upstream `{cfg['upstream']}` (train split): MPP without labels and supervised pretraining on its labels, "
        f"{cfg['pretrain_steps']} steps of {cfg['pretrain_batch']} each, AdamW lr {cfg['pretrain_lr']:g}. "
        f"Label spaces {'disjoint' if spaces['disjoint'] else 'SHARED (not a transfer)'}: upstream {', '.join(spaces['upstream'])}; "
        f"downstream {', '.join(spaces['downstream'])}.", "",
        f"Downstream `{cfg['downstream']}` with {subset}: model {cfg['model']} at {cfg['img_size']} px / patch {cfg['patch_size']}, "
        f"preset {cfg['preset']}, at most {cfg['finetune_epochs']:g} epochs of batch {cfg['finetune_batch']}, validation top-1 every "
        f"{cfg['eval_every']} epochs. Each arm's lr is chosen from the same grid {list(cfg['lr_grid'])} on {selection}; the test "
        "split is scored once, with the weights of the best validation epoch of the chosen lr. Nothing else was searched.", "",
        f"Seeds {list(cfg['seeds'])}; mean ± sample std (ddof=1) over seeds. Probes: frozen encoders (scratch = its random init) on the "
        f"downstream train split (k-NN, k=20, cosine; few-shot linear, closed form, mean of 5 draws) scored on the test split; "
        f"readouts `cls` = {report['readouts']['cls']}, `mean` = {report['readouts']['mean']}.", "",
        *table(["init", *metrics], [[arm, *(pm(s[arm][m]) for m in metrics)] for arm in INITS]), "",
        "Paired per-seed differences (mean ± sample std, 95% t-interval):", "",
        *table(["metric", *report["differences"]], [[m, *(report["differences"][c][m]["phrase"] for c in report["differences"])]
                                                      for m in metrics]), "",
        "Paper (ViT-B/16, JFT -> ImageNet): MPP about +2 points over scratch, supervised about +4 over MPP.", "",
        "Fine-tuning per seed (chosen lr; best validation epoch of at most the budget; last logged training accuracy):", "",
        *table(["seed", *INITS], [[seed, *(f"lr {per_seed[seed][a]['chosen_lr']:g}, epoch {per_seed[seed][a]['best_epoch']}, "
                                           f"train acc {_num(per_seed[seed][a]['train_acc_last'])}" for a in INITS)] for seed in seeds]), "",
        f"Wall time {report['wall_time_s'] / 60:.1f} min.", "", "![gap](gap.png)", "",
    ]
    return "\n".join(lines)


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def bar_chart(summary: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    metrics = [m for m in summary["scratch"] if m not in ("best_epoch", "best_val_top1")]
    fig = Figure(figsize=(max(6, 1.1 * len(metrics)), 3.6), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(INITS)
    for i, arm in enumerate(INITS):
        means = [summary[arm][m]["mean"] for m in metrics]
        stds = [summary[arm][m]["std"] or 0 for m in metrics]
        ax.bar(np.arange(len(metrics)) + i * width, means, width, yerr=stds, label=arm, capsize=2)
    ax.set_xticks(np.arange(len(metrics)) + width, metrics, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (test split)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("mean ± sample std over seeds", fontsize=9)
    fig.savefig(path, dpi=120)
