"""The benchmarks run on a tiny configuration and write well-formed results (no timing is asserted)."""
import importlib.util
import json
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


def test_bench_step_tiny(tmp_path):
    bench = load("bench_step")
    out = tmp_path / "step"
    report = bench.main(["--model", "test_vit", "--img-size", "28", "--patch-size", "7", "--batch-size", "4",
                         "--steps", "1", "--repeats", "2", "--warmup", "1", "--out", str(out)])
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["rows"] == report["rows"] and {r["arm"] for r in saved["rows"]} >= {"bare_timm", "mpp"}
    assert all(r["images_per_sec"] > 0 and 0 < r["mfu"] < 1 for r in saved["rows"])
    # the stated FLOP formula agrees with torch's own count of the forward pass (which on CPU leaves
    # out the fused attention kernel: then it must equal the formula's linear part)
    formula, counted = saved["forward_flops_formula"], saved["forward_flops_counted"]
    assert counted in (pytest.approx(formula["linear"], rel=1e-6), pytest.approx(formula["total"], rel=1e-6))
    assert "| mpp |" in out.with_suffix(".md").read_text() and "Command: `" in out.with_suffix(".md").read_text()


def test_bench_step_gpu_settings_on_cpu(tmp_path, capsys):
    # the GPU invocation's autocast path, runnable here in bf16; --device cuda without CUDA is refused up front
    bench = load("bench_step")
    report = bench.main(["--model", "test_vit", "--img-size", "28", "--patch-size", "7", "--batch-size", "4", "--dtype", "bf16",
                         "--steps", "1", "--repeats", "1", "--warmup", "1", "--peak-n", "256",
                         "--out", str(tmp_path / "bf16")])  # a 2048^3 bf16 matmul takes ~1 min on this CPU
    assert report["config"]["dtype"] == "bf16" and all(r["images_per_sec"] > 0 for r in report["rows"])
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as refused:
            bench.main(["--device", "cuda", "--out", str(tmp_path / "cuda")])
        assert refused.value.code == 2 and "--device cuda: torch sees no CUDA device" in capsys.readouterr().err
        assert not (tmp_path / "cuda.json").exists()


@pytest.mark.slow
def test_bench_loop_tiny(tmp_path):
    bench = load("bench_loop")
    out = tmp_path / "loop"
    bench.main(["--steps", "3", "--bare-steps", "1", "--repeats", "1", "--jpegs", "40", "--out", str(out),
                "--recipe-args", "--model test_vit --img-size 28 --patch-size 7 --batch-size 8"])
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [r["dataset"] for r in saved["rows"]] == ["mnist5k", "imagefolder of JPEGs"]
    assert all(r["loop_images_per_sec"] > 0 and r["bare_images_per_sec"] > 0 and r["data_only_images_per_sec"] > 0 for r in saved["rows"])
    assert all(len(r["bare_runs"]) == 2 and r["loop_vs_bare_min"] <= r["loop_vs_bare"] <= r["loop_vs_bare_max"]
               and 0 <= r["data_wait_share"] < 1 and r["bare_cpu_cores"] > 0 for r in saved["rows"])
    assert "| mnist5k |" in out.with_suffix(".md").read_text()


def test_bench_scaling_tiny(tmp_path):
    bench = load("bench_scaling")
    out = tmp_path / "scaling"
    bench.main(["--model", "test_vit", "--patch-size", "7", "--batch-sizes", "2", "4", "--img-size", "28", "--img-sizes", "14", "28",
                "--batch-size", "2", "--steps", "1", "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["sweep"] for r in rows] == ["batch", "batch", "sequence", "sequence", "grad_checkpointing", "grad_checkpointing"]
    assert all(r["images_per_sec"] > 0 and r["peak_mb"] >= 0 for r in rows)
    # the attention share of the FLOPs grows with the number of tokens
    assert rows[2]["tokens"] < rows[3]["tokens"] and rows[2]["attention_flop_share"] < rows[3]["attention_flop_share"]
