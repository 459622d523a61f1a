"""Choosing each arm's fine-tuning recipe on the validation split, with the same effort for every arm.

Every arm is fine-tuned with every preset at every learning rate of that preset's grid. A grid grows
by one step on a side while any arm's best rate within it sits on that side's edge (a best rate on
the edge says the grid was cut off, not that it found the best), up to `max_extensions` steps a side;
a new rate is run for every arm. Each arm keeps its best (preset, lr) by validation top-1. Then the
chosen runs' validation curves are checked for convergence (stats.converged); while one is not flat
at its end, the epoch budget doubles and the chosen runs are repeated at it, up to `max_doublings`.
The test split is never looked at: each run's test top-1 is the one score of its best-validation
weights, carried along for the report.
"""

from dataclasses import dataclass, field
from pathlib import Path

from mpp.evaluation.stats import converged
from mpp.flags import argv_for
from mpp.training.finetune_config import FinetuneConfig


@dataclass
class TuningRules:
    presets: tuple[str, ...]
    grids: dict  # preset -> learning rates
    epochs: float  # the starting budget
    max_extensions: int = 2  # grid steps a side
    max_doublings: int = 1  # of the epoch budget
    tail: float = 0.2  # convergence: the last 20% of the budget ...
    window: float = 0.1  # ... smoothed over 10% of it ...
    tolerance: float = 0.005  # ... may not beat the best earlier window by more than this


@dataclass
class Tuned:
    """Per arm: the chosen (preset, lr) and its run's summary; the final epoch budget; every run tried."""

    chosen: dict  # arm -> {"preset", "lr", **summary}
    epochs: float
    grids: dict  # preset -> the grid as it finally was
    trials: list = field(default_factory=list)  # {"arm", "preset", "lr", "epochs", **summary}
    convergence: list = field(default_factory=list)  # per budget tried: {"epochs", arm: stats.converged(...)}


def run_name(arm: str, preset: str, lr: float, epochs: float) -> str:
    return f"finetune_{arm}_{preset}_lr{lr:g}_e{epochs:g}"


def extended(grid: list[float], side: str) -> float:
    """The next rate beyond an edge, one grid ratio away."""
    if side == "high":
        return grid[-1] * grid[-1] / grid[-2] if len(grid) > 1 else grid[-1] * 3
    return grid[0] * grid[0] / grid[1] if len(grid) > 1 else grid[0] / 3


def tune(arms: list[str], run_one, rules: TuningRules) -> Tuned:
    """`run_one(arm, preset, lr, epochs)` fine-tunes once and returns its summary (at least 'best_val_top1'
    and 'val_curve', as harness.summarise_finetune gives)."""
    grids = {p: sorted(rules.grids[p]) for p in rules.presets}
    grown = {p: {"low": 0, "high": 0} for p in rules.presets}
    results: dict[tuple, dict] = {}
    trials = []

    def ensure(arm, preset, lr, epochs):
        key = (arm, preset, lr, epochs)
        if key not in results:
            results[key] = run_one(arm, preset, lr, epochs)
            trials.append({"arm": arm, "preset": preset, "lr": lr, "epochs": epochs, **results[key]})
        return results[key]

    while True:
        for preset in rules.presets:
            for lr in grids[preset]:
                for arm in arms:
                    ensure(arm, preset, lr, rules.epochs)
        additions = []
        for preset in rules.presets:
            grid = grids[preset]
            best = [max(grid, key=lambda lr: results[(arm, preset, lr, rules.epochs)]["best_val_top1"]) for arm in arms]
            for side, edge in (("high", grid[-1]), ("low", grid[0])):
                if edge in best and grown[preset][side] < rules.max_extensions:
                    additions.append((preset, side))
        if not additions:
            break
        for preset, side in additions:
            grids[preset] = sorted(grids[preset] + [extended(grids[preset], side)])
            grown[preset][side] += 1

    def score(arm, preset, lr):
        return results[(arm, preset, lr, rules.epochs)]["best_val_top1"]

    order = [(p, lr) for p in rules.presets for lr in grids[p]]
    chosen = {arm: max(order, key=lambda c: score(arm, *c)) for arm in arms}  # max keeps the first of equals
    epochs, checks = rules.epochs, []
    for doubling in range(rules.max_doublings + 1):
        summaries = {arm: ensure(arm, *chosen[arm], epochs) for arm in arms}
        check = {
            arm: converged(summaries[arm]["val_curve"], epochs, rules.tail, rules.window, rules.tolerance)
            for arm in arms
        }
        checks.append({"epochs": epochs, **check})
        if all(c["converged"] for c in check.values()) or doubling == rules.max_doublings:
            break
        epochs *= 2
    final = {
        arm: {"preset": chosen[arm][0], "lr": chosen[arm][1], **results[(arm, *chosen[arm], epochs)]} for arm in arms
    }
    return Tuned(final, epochs, grids, trials, checks)


def finetune_runner(base_cmds: dict, root: Path, log_dir: Path, run, summarise):
    """A run_one for tune(): base_cmds[arm] is the arm's fine-tuning command without --preset, --lr, --epochs
    and --output-dir; `run(cmd, log)` runs it and `summarise(run_dir)` reads its results."""

    def run_one(arm, preset, lr, epochs):
        name = run_name(arm, preset, lr, epochs)
        out = root / name
        run(
            base_cmds[arm] + argv_for(FinetuneConfig, preset=preset, lr=lr, epochs=epochs, output_dir=out),
            log_dir / f"{name}.log",
        )
        return {**summarise(out), "run_dir": str(out)}

    return run_one
