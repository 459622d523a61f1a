"""The XLA (TPU) path on XLA's CPU backend: train, checkpoint, resume, export, fine-tune, bf16.

A tier of its own (marker `xla`), in a venv with torch_xla: `bash .ci/xla` (docs/tpus.md).
Without torch_xla every test here is skipped. The runs are in this process, so XLA's graph cache
is shared between them and torch_xla's metrics count the compilations of each run.
"""

import json
import os

import numpy as np
import pytest
import torch

xla = pytest.importorskip("torch_xla", reason="the XLA tier needs torch_xla (bash .ci/xla)")
import torch_xla.debug.metrics as met  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import mpp.training.pretrain as pretrain_module  # noqa: E402
from mpp.commands.finetune import parse_config as parse_finetune_config  # noqa: E402
from mpp.commands.pretrain import parse_config  # noqa: E402
from mpp.training.finetune import finetune  # noqa: E402

pytestmark = pytest.mark.xla
if os.environ.get("PJRT_DEVICE") != "CPU":
    pytest.skip(
        "set PJRT_DEVICE=CPU (XLA's CPU backend); a real TPU is not what this tier tests", allow_module_level=True
    )

TINY = [
    "--dataset",
    "mnist5k",
    "--model",
    "test_vit",
    "--img-size",
    "28",
    "--patch-size",
    "7",
    "--batch-size",
    "16",
    "--no-progress",
    "--workers",
    "0",
]
STEPS, LOG_EVERY, CHECKPOINT_EVERY = 20, 4, 8


def compilations() -> int:
    data = met.metric_data("CompileTime")
    return data[0] if data else 0


def host_reads() -> int:
    """Tensor values read by the host (.item(), .tolist()): each one waits for the device."""
    return met.counter_value("aten::_local_scalar_dense") or 0


def pretrain_counting(argv: list[str], monkeypatch) -> list[tuple[int, int, int]]:
    """Runs pretraining; (step, compilations so far, host reads so far) after each optimiser step."""
    rows = []
    real_fit = pretrain_module.fit

    def fit(*args, on_step=None, **kwargs):
        def count(step):
            if on_step:
                on_step(step)
            rows.append((step, compilations(), host_reads()))

        return real_fit(*args, on_step=count, **kwargs)

    monkeypatch.setattr(pretrain_module, "fit", fit)
    pretrain_module.pretrain(parse_config(argv))
    return rows


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 20-step run with checkpoints at 8 and 16: (run folder, per-step counts)."""
    run = tmp_path_factory.mktemp("xla") / "a"
    with pytest.MonkeyPatch.context() as mp:
        rows = pretrain_counting(
            [
                *TINY,
                "--max-steps",
                str(STEPS),
                "--log-every",
                str(LOG_EVERY),
                "--checkpoint-every",
                str(CHECKPOINT_EVERY),
                "--output-dir",
                str(run),
            ],
            mp,
        )
    return run, rows


def test_runs_on_the_xla_device(uninterrupted):
    run, _ = uninterrupted
    config = json.loads((run / "run_config.json").read_text())
    assert config["derived"]["device"].startswith("xla")
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == STEPS // LOG_EVERY and all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_no_recompilation_or_host_wait_after_warm_up(uninterrupted):
    """After the first checkpoint (step 8; its step 9 runs the first graphs after a save), the
    compile count stays the same through logging steps 12, 16, 20 and the checkpoint at 16, and the
    host reads values only at logging and checkpoint steps."""
    _, rows = uninterrupted
    by_step = {step: (compiled, reads) for step, compiled, reads in rows}
    warm = CHECKPOINT_EVERY + 1
    assert len({by_step[s][0] for s in range(warm, STEPS + 1)}) == 1, by_step
    # between logging steps nothing is read back: steps 13, 14, 15 add no reads
    assert by_step[13][1] == by_step[14][1] == by_step[15][1], by_step


def test_resume_is_bit_identical(uninterrupted, tmp_path, monkeypatch):
    run, _ = uninterrupted
    resumed = tmp_path / "b"
    pretrain_counting(
        [
            *TINY,
            "--max-steps",
            str(STEPS),
            "--log-every",
            str(LOG_EVERY),
            "--checkpoint-every",
            str(CHECKPOINT_EVERY),
            "--output-dir",
            str(resumed),
            "--resume",
            str(run / "checkpoints" / f"step_{CHECKPOINT_EVERY:06d}"),
        ],
        monkeypatch,
    )
    a, b = load_file(run / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # tolerance 0: same batches, corruptions, optimiser state
    records = lambda d: [
        r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if r["step"] > CHECKPOINT_EVERY
    ]
    assert [r["loss"] for r in records(run)] == [r["loss"] for r in records(resumed)]


def test_exported_weights_load_strictly_into_timm(uninterrupted):
    import timm

    run, _ = uninterrupted
    weights = load_file(run / "model.safetensors")
    model = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=28, patch_size=7)
    model.load_state_dict(weights, strict=True)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in weights.values())


@pytest.fixture()
def fresh_accelerator_state():
    """accelerate keeps one process-wide state: a run with other precision settings needs a fresh one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_as_accelerate_offers_it(tmp_path, monkeypatch, fresh_accelerator_state):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    run = tmp_path / "bf16"
    rows = pretrain_counting(
        [*TINY, "--max-steps", "12", "--log-every", "4", "--checkpoint-every", "4", "--output-dir", str(run)],
        monkeypatch,
    )
    config = json.loads((run / "run_config.json").read_text())
    assert config["derived"]["mixed_precision"] == "bf16"
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert all(np.isfinite(losses))
    by_step = dict((s, c) for s, c, _ in rows)
    assert by_step[6] == by_step[12], by_step  # warm after the first checkpoint (step 4), as in fp32
    assert all(v.dtype == torch.float32 for v in load_file(run / "model.safetensors").values())  # master weights


def test_compile_is_refused_on_xla(refused):
    from mpp.commands.pretrain import main

    line = refused(main, [*TINY, "--max-steps", "2", "--compile"])
    assert "--compile" in line and "XLA" in line


@pytest.fixture(scope="module")
def digits(make_digit_folder):
    """MNIST digits 0-2: 8 per class to train on, 4 to evaluate."""
    return make_digit_folder(["0", "1", "2"], train=8, test=4)


def test_fine_tuning_from_mpp_weights_and_its_resume(uninterrupted, digits, tmp_path):
    run, _ = uninterrupted
    # the checkpoint (step 3) is at the end of epoch 0, which is evaluated while torch_xla's loader
    # thread augments epoch 1 (workers 0): the case that needed data.dataset.seeded's lock
    common = [
        "--dataset",
        str(digits),
        "--init",
        str(run / "model.safetensors"),
        "--batch-size",
        "8",
        "--max-steps",
        "6",
        "--checkpoint-every",
        "3",
        "--no-progress",
        "--workers",
        "0",
    ]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    result = finetune(parse_finetune_config([*common, "--output-dir", str(whole)]))
    assert result is not None
    results = json.loads((whole / "results.json").read_text())
    assert results["steps"] == 6 and results["eval_images"] == 12 and 0.0 <= results["final_top1"] <= 1.0
    finetune(
        parse_finetune_config(
            [*common, "--output-dir", str(resumed), "--resume", str(whole / "checkpoints" / "step_000003")]
        )
    )
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sync_free_adamw_matches_torch_and_skips_on_the_device():
    """The optimiser the recipes use on XLA against torch's AdamW on the CPU (the reference), and a
    step with found_inf = 1 leaves weights and moments alone."""
    from mpp.training.xla import sync_free_on_xla

    device = xla.device()
    torch.manual_seed(0)
    reference = torch.nn.Linear(4, 3)
    model = torch.nn.Linear(4, 3).to(device)
    model.load_state_dict(reference.state_dict())
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.05)
    opt = sync_free_on_xla(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05), device)
    assert type(opt).__name__ == "SyncFreeAdamW"
    x = torch.randn(5, 4)
    for found_inf in (0.0, 0.0, 1.0, 0.0):
        for m, o, inp in ((reference, ref_opt, x), (model, opt, x.to(device))):
            o.zero_grad()
            m(inp).pow(2).sum().backward()
        opt.found_inf = torch.tensor(found_inf, device=device)
        if not found_inf:
            ref_opt.step()
        opt.step()
        xla.sync()
        for p_ref, p in zip(reference.parameters(), model.parameters()):
            torch.testing.assert_close(p.cpu(), p_ref.detach(), rtol=1e-5, atol=1e-6)
