"""experiments/tuning.py with a fake fine-tuning whose validation and test scores are set by hand: the
same effort for every arm, grids that grow at an edge, the choice on validation only, the budget
doubled until the chosen runs converge."""

import pytest

from mpp.experiments.tuning import TuningRules, extended, tune


def curve(flat_at: float, budget: float, top: float) -> list:
    """A validation curve every 5 epochs that rises until `flat_at` of the budget, then stays at `top`."""
    return [[e, top * min(1.0, (e + 1) / (flat_at * budget))] for e in range(4, int(budget), 5)]


def fake(val: dict, test: dict | None = None, flat_at: dict | None = None):
    """run_one stand-in: val[(arm, preset, lr)] -> best validation top-1; runs logged in `calls`."""
    calls = []

    def run_one(arm, preset, lr, epochs):
        calls.append((arm, preset, round(lr, 6), epochs))
        v = val.get((arm, preset, round(lr, 6)), 0.1)
        # a curve that is flat from half the budget, unless flat_at says when (a share of 100 epochs)
        share = (flat_at or {}).get(arm, 0.5) * 100 / epochs
        return {
            "best_val_top1": v,
            "test_top1": (test or {}).get((arm, preset, round(lr, 6)), 0.5),
            "best_epoch": 1,
            "val_curve": curve(min(share, 1.0), epochs, v),
        }

    return run_one, calls


RULES = TuningRules(
    presets=("paper", "modern"),
    grids={"paper": (0.01, 0.03, 0.1), "modern": (3e-4, 1e-3)},
    epochs=100,
    max_extensions=2,
    max_doublings=1,
)


def test_every_arm_gets_every_preset_and_lr_and_the_choice_is_on_validation_never_test():
    val = {("a", "paper", 0.03): 0.7, ("b", "modern", 0.001): 0.6, ("b", "paper", 0.03): 0.59}
    test = {("a", "paper", 0.01): 0.99, ("b", "paper", 0.03): 0.99}  # the test split would choose otherwise
    run_one, calls = fake(val, test)
    tuned = tune(["a", "b"], run_one, RULES)
    assert {(c["preset"], c["lr"]) for c in tuned.chosen.values()} == {("paper", 0.03), ("modern", 0.001)}
    assert (tuned.chosen["a"]["preset"], tuned.chosen["a"]["lr"]) == ("paper", 0.03)
    assert (tuned.chosen["b"]["preset"], tuned.chosen["b"]["lr"]) == ("modern", 0.001)
    runs_a = {c[1:] for c in calls if c[0] == "a"}
    runs_b = {c[1:] for c in calls if c[0] == "b"}
    assert runs_a == runs_b  # the same effort for both arms


def test_a_grid_grows_for_every_arm_while_an_arm_picks_its_edge_up_to_the_limit():
    # arm a keeps improving upwards on paper: the grid grows twice (the limit) on the high side, for both arms
    val = {("a", "paper", lr): lr for lr in (0.01, 0.03, 0.1)}
    val.update(
        {("a", "paper", round(0.1 * (0.1 / 0.03), 6)): 0.4, ("a", "paper", round(0.1 * (0.1 / 0.03) ** 2, 6)): 0.5}
    )
    val.update(
        {
            ("b", "paper", 0.03): 0.3,
            ("b", "modern", 3e-4): 0.2,
            ("b", "modern", 1e-3): 0.25,
            ("a", "modern", 1e-3): 0.15,
        }
    )
    run_one, calls = fake(val)
    tuned = tune(["a", "b"], run_one, RULES)
    paper = tuned.grids["paper"]
    assert len(paper) == 5 and paper[:3] == [0.01, 0.03, 0.1] and paper[-1] == pytest.approx(0.1 * (0.1 / 0.03) ** 2)
    assert tuned.chosen["a"]["lr"] == pytest.approx(paper[-1])  # still on the edge, but the limit is reached
    assert {round(lr, 6) for arm, preset, lr, _ in calls if arm == "b" and preset == "paper"} == {
        round(x, 6) for x in paper
    }
    # both arms' best modern rate is its top edge: modern grows upwards once (the new rate scores lower), never
    # downwards
    assert len(tuned.grids["modern"]) == 3 and tuned.grids["modern"][0] == 3e-4


def test_the_budget_doubles_while_a_chosen_run_has_not_converged():
    val = {("a", "paper", 0.03): 0.7, ("b", "paper", 0.03): 0.6}
    # b's curve keeps rising to the end of a 100-epoch budget (flat only at 100% of 100 epochs), and is
    # flat from half of a 200-epoch one
    run_one, calls = fake(val, flat_at={"b": 1.0, "a": 0.3})
    tuned = tune(["a", "b"], run_one, RULES)
    assert [c["epochs"] for c in tuned.convergence] == [100, 200]
    assert not tuned.convergence[0]["b"]["converged"] and tuned.convergence[0]["a"]["converged"]
    assert tuned.convergence[1]["b"]["converged"] and tuned.epochs == 200
    assert sorted(c for c in calls if c[3] == 200) == [
        ("a", "paper", 0.03, 200),
        ("b", "paper", 0.03, 200),
    ]  # the chosen runs only


def test_the_budget_stops_doubling_at_the_limit():
    run_one, calls = fake({("a", "paper", 0.03): 0.7}, flat_at={"a": 10.0})  # never flat
    tuned = tune(["a"], run_one, TuningRules(("paper",), {"paper": (0.01, 0.03, 0.1)}, epochs=50, max_doublings=2))
    assert [c["epochs"] for c in tuned.convergence] == [50, 100, 200] and tuned.epochs == 200
    assert not tuned.convergence[-1]["a"]["converged"]


def test_extended_steps_by_the_grid_ratio():
    assert extended([0.01, 0.03, 0.1], "high") == pytest.approx(0.1 * 0.1 / 0.03)
    assert extended([0.01, 0.03, 0.1], "low") == pytest.approx(0.01 / 3)
    assert extended([0.001], "high") == pytest.approx(0.003)
