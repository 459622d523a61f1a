"""Run folders under simultaneous launches: each launch makes and holds its own."""

import multiprocessing

import pytest

from mpp.errors import UsageError
from mpp.training.run_dir import claim_run_dir

LAUNCHES = 8


def claim_at_once(start, done, results, output_dir, runs_root):
    """One launch: wait for the others, claim at the same instant, keep the folder until all have tried."""
    start.wait()
    try:
        results.put(("ok", str(claim_run_dir(output_dir, None, runs_root))))
    except UsageError as e:
        results.put(("refused", str(e)))
    done.wait()


def launch_at_once(output_dir, runs_root) -> list[tuple[str, str]]:
    ctx = multiprocessing.get_context("fork")  # the launches only make folders; no torch in them
    start, done, results = ctx.Barrier(LAUNCHES), ctx.Barrier(LAUNCHES), ctx.Queue()
    procs = [
        ctx.Process(target=claim_at_once, args=(start, done, results, output_dir, runs_root)) for _ in range(LAUNCHES)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return outcomes


def test_launches_started_at_the_same_instant_each_get_their_own_folder(tmp_path):
    """Without --output-dir every launch names runs/<date-time>: all in the same second, each still gets a
    folder of its own (runs/<date-time>, then -2, -3, ...)."""
    outcomes = launch_at_once(None, tmp_path / "runs")
    assert [kind for kind, _ in outcomes] == ["ok"] * LAUNCHES, outcomes
    folders = {path for _, path in outcomes}
    assert len(folders) == LAUNCHES and {p.name for p in (tmp_path / "runs").iterdir()} == {
        p.rsplit("/", 1)[1] for p in folders
    }


def test_one_output_dir_for_launches_at_once_goes_to_one_of_them(tmp_path):
    """The same --output-dir for launches started at the same instant: one takes it, each other one is
    refused with one line (the folder is in use), instead of all of them writing into it."""
    outcomes = launch_at_once(str(tmp_path / "sweep"), None)
    assert sorted(kind for kind, _ in outcomes) == ["ok"] + ["refused"] * (LAUNCHES - 1), outcomes
    refusals = [message for kind, message in outcomes if kind == "refused"]
    assert all("is in use by another launch" in m and "\n" not in m for m in refusals), refusals


def test_a_folder_is_refused_when_it_is_a_file_or_not_empty(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="exists and is not a folder"):
        claim_run_dir(str(tmp_path / "file"), None)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(UsageError, match="is not empty; pass --resume auto"):
        claim_run_dir(str(tmp_path / "used"), None)
    assert claim_run_dir(str(tmp_path / "used"), "auto") == tmp_path / "used"
