"""The benchmarks run on a tiny configuration and write well-formed results (no timing is asserted)."""

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks"


def load(name):
    if str(BENCH) not in sys.path:  # as when a benchmark runs as a script: its folder first on the path
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_step_tiny(tmp_path, monkeypatch):
    bench = load("bench_step")
    out = tmp_path / "step"
    # GEMM readings with a known best, in the middle round (the real readings are taken in the bf16 test below)
    round_rates = iter([5e9, 9e9, 1e9])

    def gemm_round(shapes, device, dtype, seconds):
        rate = next(round_rates)
        return [{"shape": list(s), "flops_per_sec": rate + i} for i, s in enumerate(shapes)]

    monkeypatch.setattr(bench, "gemm_round", gemm_round)
    report = bench.main(
        [
            "--model",
            "test_vit",
            "--img-size",
            "28",
            "--patch-size",
            "7",
            "--batch-size",
            "4",
            "--peers",
            "--steps",
            "1",
            "--repeats",
            "3",
            "--warmup",
            "1",
            "--peak-n",
            "64",
            "128",
            "--gemm-seconds",
            "0.01",
            "--out",
            str(out),
        ]
    )
    saved = json.loads(out.with_suffix(".json").read_text())
    md = out.with_suffix(".md").read_text()
    assert saved["rows"] == report["rows"] and {r["arm"] for r in saved["rows"]} >= {"bare_timm", "mpp"}
    # the stated FLOP formula agrees with torch's own count of the forward pass (which on CPU leaves
    # out the fused attention kernel: then it must equal the formula's linear part)
    formula, counted = saved["forward_flops_formula"], saved["forward_flops_counted"]
    assert counted in (pytest.approx(formula["linear"], rel=1e-6), pytest.approx(formula["total"], rel=1e-6))
    assert "| mpp |" in md and "Command: `" in md

    # the GEMM peak: one round per repeat, each the squares and the model's own linears (test_vit: width 64,
    # MLP 192, 4 x 17 tokens: qkv and fc1 share a shape), and MFU divides by the best reading of them all
    rounds = saved["best_measured_gemm"]["rounds"]
    rows_of_tokens = 4 * ((28 // 7) ** 2 + 1)
    assert len(rounds) == 3 and all(
        sorted(map(tuple, (g["shape"] for g in rnd)))
        == sorted(
            [
                (64, 64, 64),
                (128, 128, 128),
                (rows_of_tokens, 64, 192),
                (rows_of_tokens, 64, 64),
                (rows_of_tokens, 192, 64),
            ]
        )
        for rnd in rounds
    )
    best = 9e9 + 4  # the middle round's last shape
    assert saved["best_measured_gemm"]["flops_per_sec"] == best and saved["best_measured_gemm"]["shape"] == list(
        rounds[1][4]["shape"]
    )
    for row in saved["rows"]:
        assert row["images_per_sec"] > 0 and row["mfu_vs_best_measured_gemm"] == pytest.approx(
            row["images_per_sec"] * 3 * formula["total"] / best, rel=1e-9
        )
        assert row["mfu_vs_spec_peak"] is None  # a CPU has no spec peak in the table
    assert (
        saved["spec_peak"] is None
        and "| n/a |" in md
        and "MFU vs spec peak" in md
        and "MFU vs best measured GEMM" in md
    )

    # the order changes between repeats, the GEMM round sits between the arms, and every arm takes every place once
    orders = saved["arm_orders"]
    names = sorted([r["arm"] for r in saved["rows"]] + ["gemm"])
    assert len(orders) == 3 and all(sorted(o) == names for o in orders) and len({tuple(o) for o in orders}) == 3
    if len(names) == 3:
        assert all(len({o[place] for o in orders}) == 3 for place in range(3))

    # the ratio to the bare step: per repeat, from the rates timed in that repeat
    bare = next(r for r in saved["rows"] if r["arm"] == "bare_timm")
    for row in saved["rows"]:
        expected = [a / b for a, b in zip(row["per_repeat"], bare["per_repeat"])]
        assert row["vs_bare"]["per_repeat"] == pytest.approx(expected) and row["vs_bare"]["n"] == 3
        assert row["vs_bare"]["low"] <= row["vs_bare"]["mean"] <= row["vs_bare"]["high"]

    # the machine's load and the peers' versions are recorded
    for key in ("load_average_before", "load_average_after"):
        assert saved[key]["1min"] >= 0 and saved[key]["cpus"] >= 1
    assert "Load average (1/5/15 min) before" in md
    from importlib.metadata import PackageNotFoundError, version

    for package in ("transformers", "vit-pytorch"):
        try:
            installed = version(package)
        except PackageNotFoundError:
            installed = None
        assert saved["peer_versions"][package] == installed


def test_bench_step_gpu_settings_on_cpu(tmp_path, capsys, monkeypatch):
    # the GPU invocation's autocast path, runnable here in bf16, with the spec peak of an H100 looked up as
    # on that card; --device cuda without CUDA is refused up front
    bench = load("bench_step")
    table = bench.spec_peak
    monkeypatch.setattr(bench, "spec_peak", lambda name, dtype: table("NVIDIA H100 80GB HBM3", dtype))
    out = tmp_path / "bf16"
    report = bench.main(
        [
            "--model",
            "test_vit",
            "--img-size",
            "28",
            "--patch-size",
            "7",
            "--batch-size",
            "4",
            "--dtype",
            "bf16",
            "--steps",
            "1",
            "--repeats",
            "1",
            "--warmup",
            "1",
            "--peak-n",
            "128",
            "--gemm-seconds",
            "0.01",
            "--out",
            str(out),
        ]
    )  # a 2048^3 bf16 matmul takes ~1 min on this CPU
    assert report["config"]["dtype"] == "bf16" and all(r["images_per_sec"] > 0 for r in report["rows"])
    readings = [g["flops_per_sec"] for rnd in report["best_measured_gemm"]["rounds"] for g in rnd]
    assert all(rate > 0 for rate in readings) and report["best_measured_gemm"]["flops_per_sec"] == max(readings)
    assert report["spec_peak"]["flops_per_sec"] == 989e12 and report["spec_peak"]["precision"] == "bf16"
    train_flops = 3 * report["forward_flops_formula"]["total"]
    for row in report["rows"]:
        assert row["mfu_vs_spec_peak"] == pytest.approx(row["images_per_sec"] * train_flops / 989e12, rel=1e-9)
        assert row["vs_bare"]["low"] is None  # one repeat: no interval
    assert "NVIDIA H100 SXM bf16 dense 989.0 TFLOP/s" in out.with_suffix(".md").read_text()
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as refused:
            bench.main(["--device", "cuda", "--out", str(tmp_path / "cuda")])
        assert refused.value.code == 2 and "--device cuda: torch sees no CUDA device" in capsys.readouterr().err
        assert not (tmp_path / "cuda.json").exists()


def test_bench_step_refuses_compiled_arms_against_eager_peers(tmp_path, capsys, monkeypatch):
    bench = load("bench_step")

    def built(*args, **kwargs):
        raise AssertionError("a model was built: --compile --peers must be refused before any heavy work")

    monkeypatch.setattr(bench, "create_encoder", built)
    with pytest.raises(SystemExit) as refused:
        bench.main(["--compile", "--peers", "--model", "test_vit", "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "--compile --peers" in err and "without --compile" in err
    assert not (tmp_path / "c.json").exists()


TINY_STEP_ARGS = ["--model", "test_vit", "--img-size", "28", "--patch-size", "7", "--batch-size", "4"]
TINY_TIMING = ["--steps", "1", "--warmup", "1", "--peak-n", "64", "--gemm-seconds", "0.01"]


def test_a_lever_that_fails_is_reported_and_the_others_are_timed(tmp_path, monkeypatch):
    # on a lent GPU one lever that a card or torch version cannot run must not cost the other arms' numbers:
    # cuDNN attention has no CPU kernel (fails at its first step), and an FP8 conversion that raises fails at build
    bench = load("bench_step")

    def no_torchao(*args, **kwargs):
        raise ImportError("No module named 'torchao'\nsecond line of the message")

    monkeypatch.setattr(bench, "convert_to_fp8", no_torchao)
    out = tmp_path / "levers"
    argv = [*TINY_STEP_ARGS, *TINY_TIMING, "--repeats", "2", "--out", str(out)]
    report = bench.main([*argv, "--levers", "sdpa-math", "sdpa-cudnn", "fp8-tensorwise"])
    assert [r["arm"] for r in report["rows"]] == ["bare_timm", "mpp", "sdpa-math"]
    assert all(len(r["per_repeat"]) == 2 and r["warmup_seconds"] > 0 for r in report["rows"])
    failed = report["failed_arms"]
    assert set(failed) == {"sdpa-cudnn", "fp8-tensorwise"}
    assert failed["sdpa-cudnn"].startswith("RuntimeError: ") and "\n" not in failed["sdpa-cudnn"]
    assert failed["fp8-tensorwise"] == "ImportError: No module named 'torchao'"
    assert all(o.count("sdpa-cudnn") == 0 for o in report["arm_orders"])
    md = out.with_suffix(".md").read_text()
    assert "sdpa-cudnn: **failed**, not timed: RuntimeError" in md and "| sdpa-math |" in md
    assert "Partial" not in md and report["repeats_done"] == 2
    # a lever against the MPP step without it, per repeat: does it pay
    rows = {r["arm"]: r for r in report["rows"]}
    expected = [a / b for a, b in zip(rows["sdpa-math"]["per_repeat"], rows["mpp"]["per_repeat"])]
    assert rows["sdpa-math"]["vs_mpp"]["per_repeat"] == pytest.approx(expected) and "vs_mpp" not in rows["mpp"]
    assert f"sdpa-math against the MPP step without it: {rows['sdpa-math']['vs_mpp']['mean']:.3f}×" in md


def test_each_arms_rate_counts_its_own_images(monkeypatch):
    # batch-x2 takes twice the images per step: at the same step time its images/s must be twice the others'
    bench = load("bench_step")
    now = [0.0]

    def step():  # every step takes one second on the fake clock
        now[0] += 1.0

    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])
    arms = {"bare_timm": step, "mpp": step, "batch-x2": step}
    timed = bench.time_arms(arms, lambda: [], 2, 3, "cpu", {"bare_timm": 4, "mpp": 4, "batch-x2": 8}, 0)
    assert timed["rates"] == {"bare_timm": [4.0] * 3, "mpp": [4.0] * 3, "batch-x2": [8.0] * 3}


def test_memory_and_batch_levers_change_what_they_say(tmp_path):
    # grad-checkpointing: each block's forward runs again in the backward (what saves its activations);
    # batch-x2: the step takes 2B images and the table says so
    import torch

    from mpp.models.model import MPP, create_encoder

    bench = load("bench_step")
    images = torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8)
    for lever, block_runs, batch in [("batch-x2", 1, 8), ("grad-checkpointing", 2, 4)]:
        runs = []

        def build_mpp(runs=runs):
            model = MPP(create_encoder("test_vit", 28, 7))
            # a pre-hook: the recomputation in the backward stops once it has what it needs, before a forward hook
            model.encoder.blocks[0].register_forward_pre_hook(lambda *args: runs.append(1))
            return model

        step, changed = bench.lever_arm(lever, build_mpp, "cpu", images, compile=False)
        step()
        assert len(runs) == block_runs and changed["batch_size"] == batch, lever
    out = tmp_path / "memory"
    argv = [*TINY_STEP_ARGS, *TINY_TIMING, "--repeats", "1", "--out", str(out)]
    report = bench.main([*argv, "--levers", "batch-x2", "grad-checkpointing"])
    rows = {r["arm"]: r for r in report["rows"]}
    assert rows["batch-x2"]["lever"]["batch_size"] == 8 and rows["grad-checkpointing"]["lever"]["batch_size"] == 4
    md = out.with_suffix(".md").read_text()
    assert "batch-x2: batch 8 (the other arms 4)" in md and "grad-checkpointing: batch" not in md


def test_a_spent_warm_up_budget_leaves_the_later_arms_out():
    # under a hard time limit the run must reach its timed repeats: arms past the budget are not warmed or timed
    bench = load("bench_step")
    now = [0.0]

    def arm(seconds):  # an arm whose warm-up (compile) takes this long on the fake clock
        def step():
            now[0] += seconds

        return step

    arms = {"bare_timm": arm(10), "mpp": arm(10), "sdpa-math": arm(10), "sdpa-flash": arm(1)}
    warmed = bench.warm_up(arms, 1, "cpu", budget=15, clock=lambda: now[0])
    # bare 0-10 (+10 for its profiled step), mpp starts at 20 > 15: it and every later arm are left out
    assert list(arms) == ["bare_timm"] and warmed["seconds"] == {"bare_timm": 10}
    assert set(warmed["failed"]) == {"mpp", "sdpa-math", "sdpa-flash"}
    assert all("warm-up budget (--warmup-budget 15 s)" in e for e in warmed["failed"].values())
    arms = {"bare_timm": arm(10), "mpp": arm(10), "sdpa-math": arm(10)}
    assert not bench.warm_up(arms, 1, "cpu", budget=None, clock=lambda: now[0])["failed"] and len(arms) == 3


def test_each_arms_peak_memory_is_its_own_above_what_was_resident(monkeypatch):
    # the CUDA path of the warm-up, on a fake allocator: every arm's weights stay resident, so an arm's number
    # is its warm-up's peak above what was allocated before it, not the raw peak
    import torch

    bench = load("bench_step")
    memory = {"now": 1000, "peak": 1000}

    def arm(keeps, transient):  # a warm-up step that leaves `keeps` bytes allocated, peaking `transient` above
        def step():
            memory["peak"] = max(memory["peak"], memory["now"] + transient)
            memory["now"] += keeps

        return step

    def reset_peak():
        memory["peak"] = memory["now"]

    monkeypatch.setattr(bench, "sync", lambda device: None)
    monkeypatch.setattr(bench, "attention_ops", lambda step: [])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset_peak)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: memory["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: memory["peak"])
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    arms = {"bare_timm": arm(keeps=300, transient=500), "mpp": arm(keeps=0, transient=200)}
    warmed = bench.warm_up(arms, 1, "cuda")
    # bare: resident 1000, peak 1500 -> 500; mpp: resident 1300 (bare's optimiser state stayed), peak 1500 -> 200
    assert warmed["peak_bytes"] == {"bare_timm": 500, "mpp": 200}


@pytest.mark.slow
def test_each_compiled_attention_arm_runs_its_own_kernel(tmp_path):
    # torch.compile does not guard on a kernel chosen around the compiled call: a second compiled MPP model would
    # reuse the first one's graph and its kernel. Each arm's profiled step shows which attention operator it ran.
    bench = load("bench_step")
    out = tmp_path / "kernels"
    argv = [*TINY_STEP_ARGS, *TINY_TIMING, "--repeats", "1", "--compile", "--out", str(out)]
    report = bench.main([*argv, "--levers", "sdpa-math"])
    ops = {row["arm"]: row["attention_ops"] for row in report["rows"]}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops["mpp"]  # torch's own choice on a CPU: flash
    assert ops["sdpa-math"] == []  # matmuls and softmax, no fused attention operator
    assert "sdpa-math none" in out.with_suffix(".md").read_text()


def test_a_run_killed_mid_way_keeps_the_repeats_already_measured(tmp_path, monkeypatch):
    # a timeout on a lent GPU: the files hold every finished repeat, marked partial
    bench = load("bench_step")
    rounds = []

    class Killed(BaseException):
        pass

    def gemm_round(shapes, device, dtype, seconds):
        if rounds:
            raise Killed  # the second repeat's GEMM round: killed there
        rounds.append(1)
        return [{"shape": list(s), "flops_per_sec": 1e9} for s in shapes]

    monkeypatch.setattr(bench, "gemm_round", gemm_round)
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        bench.main([*TINY_STEP_ARGS, *TINY_TIMING, "--repeats", "3", "--out", str(out)])
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["repeats_done"] == 1 and len(saved["arm_orders"]) == 1
    assert [len(r["per_repeat"]) for r in saved["rows"]] == [1, 1]
    assert "**Partial: 1 of 3 repeats measured**" in out.with_suffix(".md").read_text()


def fake_pretrain(curves: dict, calls: list, stop_after: int | None = None, signal_at: int | None = None):
    """mpp.pretrain as fp8_curve calls it: writes the run's metrics.jsonl with the loss curve the test chose for
    (arm, seed); raises instead of the run numbered stop_after (a session cut short); the run numbered signal_at
    returns as a run stopped by SIGTERM does (a timeout's signal, caught by the training loop)."""
    from types import SimpleNamespace

    def pretrain(seed, max_steps, output_dir, progress, **settings):
        arm = "lever" if settings.get("fp8") else "plain"
        if stop_after is not None and len(calls) == stop_after:
            raise KeyboardInterrupt
        stopped_by = "SIGTERM" if signal_at is not None and len(calls) == signal_at else None
        calls.append((arm, seed))
        run_dir = Path(output_dir)
        run_dir.mkdir(parents=True)
        lines = [json.dumps({"step": step, "loss": loss}) for step, loss in curves[arm, seed].items()]
        lines.insert(1, json.dumps({"step": 10, "eval_accuracy": 0.5}))  # an evaluation record has no loss
        (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        return SimpleNamespace(run_dir=run_dir, summary={"images_per_sec": 100.0}, stopped_by=stopped_by)

    return pretrain


def curve(losses: list[float]) -> dict[int, float]:
    return {10 * (i + 1): loss for i, loss in enumerate(losses)}


def test_fp8_curve_judges_the_lever_against_the_plain_seeds_band(tmp_path, monkeypatch):
    fp8_curve = load("fp8_curve")
    plain0, plain1 = curve([5.0, 4.0, 3.0, 2.0]), curve([5.2, 4.2, 3.2, 2.2])
    argv = ["--lever", "fp8=tensorwise", "--steps", "40", "--smooth", "1", "--runs-dir", str(tmp_path / "runs")]
    argv += ["--settings", "warmup_steps=10"]
    # inside the band: between the two plain seeds at every step past warm-up (step 10 is warm-up: ignored)
    calls = []
    curves = {("plain", 0): plain0, ("plain", 1): plain1, ("lever", 0): curve([9.0, 4.1, 3.1, 2.1])}
    monkeypatch.setattr(fp8_curve.mpp, "pretrain", fake_pretrain(curves, calls))
    report = fp8_curve.main([*argv, "--out", str(tmp_path / "within")])
    assert calls == [("plain", 0), ("lever", 0), ("plain", 1)]  # alternated: a cut session still has a pair
    v = report["verdict"]
    assert v["within"] and v["steps_compared"] == 3 and v["margin"] == pytest.approx(0.1)  # half the 0.2 spread
    assert report["runs"]["lever-seed0"]["final_loss"] == pytest.approx((9.0 + 4.1 + 3.1 + 2.1) / 4)
    assert "**within**" in (tmp_path / "within.md").read_text()
    # past the widened band (2.2 + 0.1) at the last step only
    calls.clear()
    curves["lever", 0] = curve([5.1, 4.1, 3.1, 2.31])
    report = fp8_curve.main([*argv, "--runs-dir", str(tmp_path / "runs2"), "--out", str(tmp_path / "outside")])
    v = report["verdict"]
    assert not v["within"] and v["outside_count"] == 1 and v["outside"][0]["step"] == 40
    assert v["outside"][0]["band"] == [pytest.approx(1.9), pytest.approx(2.3)]
    # nothing logged past warm-up: no verdict, rather than "outside at 0 steps"
    report = fp8_curve.main(
        [*argv, "warmup_steps=40", "--runs-dir", str(tmp_path / "r3"), "--out", str(tmp_path / "w")]
    )
    assert report["verdict"]["steps_compared"] == 0 and not report["verdict"]["within"]
    md = (tmp_path / "w.md").read_text()
    assert "No step past warm-up (step 40) logged by every run: no verdict." in md and "outside" not in md


def test_fp8_curve_stops_at_a_signal_instead_of_starting_the_next_run(tmp_path, monkeypatch):
    # a timeout's SIGTERM is caught by the training loop, which checkpoints and returns: the benchmark must end
    # there, its stopped run left out, not go on with the next run past the time limit
    fp8_curve = load("fp8_curve")
    calls = []
    curves = {("plain", 0): curve([5.0, 4.0]), ("lever", 0): curve([5.0]), ("plain", 1): curve([5.1, 4.1])}
    monkeypatch.setattr(fp8_curve.mpp, "pretrain", fake_pretrain(curves, calls, signal_at=1))
    out = tmp_path / "signal"
    with pytest.raises(SystemExit, match="lever-seed0 was stopped by SIGTERM"):
        fp8_curve.main(
            ["--lever", "fp8=tensorwise", "--steps", "20", "--runs-dir", str(tmp_path / "r"), "--out", str(out)]
        )
    assert calls == [("plain", 0), ("lever", 0)]  # the second plain seed never started
    saved = json.loads(out.with_suffix(".json").read_text())
    assert list(saved["runs"]) == ["plain-seed0"] and saved["verdict"] is None
    assert (
        "**Partial: 1 of 3 runs**, no verdict. lever-seed0 was stopped by SIGTERM" in out.with_suffix(".md").read_text()
    )


def test_fp8_curve_cut_short_keeps_the_runs_already_made(tmp_path, monkeypatch):
    fp8_curve = load("fp8_curve")
    curves = {("plain", 0): curve([5.0, 4.0]), ("lever", 0): curve([5.0, 4.1]), ("plain", 1): curve([5.1, 4.1])}
    monkeypatch.setattr(fp8_curve.mpp, "pretrain", fake_pretrain(curves, [], stop_after=2))
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        fp8_curve.main(
            ["--lever", "fp8=tensorwise", "--steps", "20", "--runs-dir", str(tmp_path / "r"), "--out", str(out)]
        )
    saved = json.loads(out.with_suffix(".json").read_text())
    assert list(saved["runs"]) == ["plain-seed0", "lever-seed0"] and saved["verdict"] is None
    assert "**Partial: 2 of 3 runs**" in out.with_suffix(".md").read_text()


def test_spec_peak_table():
    import torch

    peaks = load("peaks")
    bf16, fp32 = torch.bfloat16, torch.float32
    assert peaks.spec_peak("NVIDIA H100 80GB HBM3", bf16)["flops_per_sec"] == 989e12  # H100 SXM, as torch names it
    assert peaks.spec_peak("NVIDIA H200", bf16)["flops_per_sec"] == 989e12
    assert peaks.spec_peak("NVIDIA H100 PCIe", bf16)["flops_per_sec"] == 756e12
    assert peaks.spec_peak("NVIDIA A100-SXM4-80GB", bf16)["flops_per_sec"] == 312e12
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")  # plain fp32 matmuls: the fp32 peak, not TF32's
        assert peaks.spec_peak("NVIDIA A100 80GB PCIe", fp32)["flops_per_sec"] == 19.5e12
        torch.set_float32_matmul_precision("high")  # TF32 allowed
        assert peaks.spec_peak("NVIDIA H100 80GB HBM3", fp32)["flops_per_sec"] == pytest.approx(494.7e12)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert peaks.spec_peak("NVIDIA GeForce RTX 4090", bf16) is None and peaks.spec_peak(None, bf16) is None


def test_arm_orders_rotate_and_reshuffle():
    bench = load("bench_step")
    names = ["a", "b", "c", "gemm"]
    orders = bench.arm_orders(names, 8, seed=0)
    assert all(sorted(o) == names for o in orders)
    for cycle in (orders[:4], orders[4:]):  # every name in every place once per cycle
        assert all(len({o[place] for o in cycle}) == 4 for place in range(4))
    assert all(a != b for a, b in zip(orders, orders[1:]))
    assert bench.arm_orders(names, 8, seed=0) == orders and bench.arm_orders(names, 8, seed=1) != orders


def test_paired_ratio_t_interval():
    bench = load("bench_step")
    r = bench.paired_ratio([1.0, 2.2, 2.7], [1.0, 2.0, 3.0])  # per-repeat ratios 1.0, 1.1, 0.9
    half = 4.302652729911275 * 0.1 / 3**0.5  # t(0.975, 2 dof) x sample std / sqrt(n), by hand
    assert r["per_repeat"] == pytest.approx([1.0, 1.1, 0.9]) and r["mean"] == pytest.approx(1.0)
    assert (r["low"], r["high"]) == (pytest.approx(1.0 - half), pytest.approx(1.0 + half))


def test_peer_configs_match_the_encoder():
    from argparse import Namespace

    bench = load("bench_step")
    args = Namespace(
        img_size=28, patch_size=7, dim=96, depth=2, heads=3, mlp_ratio=4.0
    )  # head width 32, not vit-pytorch's default 64
    vit_kwargs, mpp_kwargs = bench.vit_pytorch_config(args)
    assert vit_kwargs["dim_head"] * vit_kwargs["heads"] == 96 and vit_kwargs["mlp_dim"] == 384
    assert (mpp_kwargs["mask_prob"], mpp_kwargs["replace_prob"], mpp_kwargs["random_patch_prob"]) == (0.5, 0.8, 0.1)
    hf = bench.hf_vit_config(args)
    assert (hf["hidden_size"], hf["num_attention_heads"], hf["intermediate_size"], hf["num_hidden_layers"]) == (
        96,
        3,
        384,
        2,
    )
    try:
        from vit_pytorch import ViT
    except ImportError:
        return
    attention = ViT(**vit_kwargs).transformer.layers[0][0]
    assert attention.to_qkv.out_features == 3 * 96  # q, k, v each as wide as the encoder, as in timm


@pytest.mark.slow
def test_bench_loop_tiny(tmp_path):
    bench = load("bench_loop")
    out = tmp_path / "loop"
    bench.main(
        [
            "--steps",
            "4",
            "--window",
            "2",
            "--bare-windows",
            "2",
            "--repeats",
            "1",
            "--jpegs",
            "40",
            "--decodes",
            "cpu",
            "pil",
            "--out",
            str(out),
            "--recipe-args",
            "--model test_vit --img-size 28 --patch-size 7 --batch-size 8",
        ]
    )
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [r["dataset"] for r in saved["rows"]] == [
        "mnist5k",
        "ImageNet-like JPEGs, --decode cpu",
        "ImageNet-like JPEGs, --decode pil",
    ]
    for r in saved["rows"]:
        assert (
            r["loop_images_per_sec"] > 0
            and len(r["bare_runs"]) == 2
            and r["loop_vs_bare_min"] <= r["loop_vs_bare"] <= r["loop_vs_bare_max"]
        )
        assert 0 <= r["data_wait_share"] <= r["data_wait_share_max"] < 1 and 0 < r["slowest_window_vs_median"] <= 1
        run = r["runs"][0]
        # one estimator: the loop's rate is the median of its windows after the first, as the bare step's
        assert run["steps"] == 4 and len(run["windows"]) == 1  # 2 windows of 2 steps; the first holds the start-up
        assert run["images_per_sec"] == statistics.median(run["windows"])
        # end to end: all images over the whole launch's wall time
        assert run["end_to_end_images_per_sec"] == pytest.approx(4 * 8 / run["wall_s"])
    assert "| mnist5k |" in out.with_suffix(".md").read_text()


def test_bench_scaling_tiny(tmp_path):
    bench = load("bench_scaling")
    out = tmp_path / "scaling"
    bench.main(
        [
            "--model",
            "test_vit",
            "--patch-size",
            "7",
            "--batch-sizes",
            "2",
            "4",
            "--img-size",
            "28",
            "--img-sizes",
            "14",
            "28",
            "--batch-size",
            "2",
            "--steps",
            "1",
            "--out",
            str(out),
        ]
    )
    saved = json.loads(out.with_suffix(".json").read_text())
    rows = saved["rows"]
    assert [r["sweep"] for r in rows] == [
        "batch",
        "batch",
        "sequence",
        "sequence",
        "grad_checkpointing",
        "grad_checkpointing",
    ]
    # one definition per memory column: host peak-RSS growth always, CUDA's max allocated only on CUDA
    assert all(
        r["images_per_sec"] > 0
        and r["rss_peak_growth_mb"] >= 0
        and r["cuda_max_allocated_mb"] is None
        and "peak_mb" not in r
        for r in rows
    )
    md = out.with_suffix(".md").read_text()
    assert "| peak RSS growth MB | CUDA max allocated MB |" in md and md.count(" | n/a |") == len(rows)
    assert saved["load_average_before"]["1min"] >= 0 and "Load average (1/5/15 min) before" in md
    # the attention share of the FLOPs grows with the number of tokens
    assert rows[2]["tokens"] < rows[3]["tokens"] and rows[2]["attention_flop_share"] < rows[3]["attention_flop_share"]
    # a CUDA row shows both numbers, each in its own column
    cuda_row = dict(rows[0], rss_peak_growth_mb=12.0, cuda_max_allocated_mb=345.0)
    assert "| 12 | 345 |" in bench.markdown(dict(saved, rows=[cuda_row]))
