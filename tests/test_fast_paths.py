"""The GPU speed levers, as far as a CPU can check them: the refusals come before any work and name what is
missing, FP8 converts the layers torchao's size rule picks, and a converted model trains, exports the same
weights and loads strictly into plain timm."""

import importlib.util

import pytest
import timm
import torch

from mpp.errors import UsageError
from mpp.models.attention_kernel import attention_kernel
from mpp.models.model import MPP, create_encoder
from mpp.training import fast_paths
from mpp.training.fast_paths import check_fp8, convert_to_fp8, fp8_filter


@pytest.fixture
def torchao():
    """torchao (the fp8 extra, part of the test extra), imported only by the tests that use it: collecting this
    file imports nothing of it, so a tier with another torch (the XLA venv) never loads it."""
    return pytest.importorskip("torchao", reason="the fp8 extra (torchao) is part of the test extra")


def test_unknown_values_are_refused_in_one_line():
    for call, named in [
        (lambda: check_fp8("e4m3"), "--fp8 e4m3: one of none, tensorwise, rowwise"),
        (lambda: check_fp8("rowwise", "most"), "--fp8-layers most: one of auto, all"),
        (lambda: attention_kernel("fast"), "--sdpa-backend fast: one of auto, flash, cudnn, efficient, math"),
    ]:
        with pytest.raises(UsageError, match="^" + named.replace("(", r"\(") + "$"):
            call()


def test_fp8_is_refused_without_a_gpu_that_has_fp8_tensor_cores(monkeypatch, torchao):
    monkeypatch.delenv(fast_paths.EMULATE_ON_CPU, raising=False)
    check_fp8("none", cuda=False)  # the default asks for nothing
    with pytest.raises(UsageError, match="needs a CUDA GPU with FP8 tensor cores.*has none"):
        check_fp8("tensorwise", cuda=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100")
    with pytest.raises(UsageError, match=r"NVIDIA A100\) has compute capability 8.0; FP8 tensor cores need 8.9"):
        check_fp8("rowwise", cuda=True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    check_fp8("rowwise", cuda=True)  # an H100 with torchao: accepted
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else object())
    with pytest.raises(UsageError, match=r"needs torchao \(pip install 'vit-mpp\[fp8\]'\)"):
        check_fp8("rowwise", cuda=True)


# (out_features, in_features) of the four Linear layers of a block: qkv, proj, fc1, fc2
BLOCKS = {"ViT-B/16": (768, 3072), "ViT-L/16": (1024, 4096), "ViT-H/14": (1280, 5120)}
# hand-applied from torchao's thresholds (tensorwise: not when in <= 4096 and out <= 1024; rowwise: not when
# out <= 2048, in <= 1024, or both out <= 4096 and in <= 2048)
CONVERTED = {
    ("ViT-B/16", "tensorwise"): {"qkv", "fc1"},
    ("ViT-B/16", "rowwise"): set(),
    ("ViT-L/16", "tensorwise"): {"qkv", "fc1"},
    ("ViT-L/16", "rowwise"): set(),
    ("ViT-H/14", "tensorwise"): {"qkv", "proj", "fc1", "fc2"},
    ("ViT-H/14", "rowwise"): {"fc1"},
}


@pytest.mark.parametrize("model,recipe", CONVERTED)
def test_the_auto_filter_keeps_small_gemms_in_bf16(model, recipe, torchao):
    dim, hidden = BLOCKS[model]
    shapes = {"qkv": (3 * dim, dim), "proj": (dim, dim), "fc1": (hidden, dim), "fc2": (dim, hidden)}
    keep = fp8_filter(recipe)
    assert {name for name, shape in shapes.items() if keep(torch.nn.Linear(shape[1], shape[0]), name)} == CONVERTED[
        (model, recipe)
    ]
    every = fp8_filter(recipe, "all", skip=("head",))
    assert all(every(torch.nn.Linear(s[1], s[0]), n) for n, s in shapes.items())
    assert not every(torch.nn.Linear(dim, 3 * dim + 8), "qkv")  # not a multiple of 16: never
    assert not every(torch.nn.Linear(dim, 512), "head")  # skipped by name


def test_a_converted_model_trains_and_exports_the_same_weights_for_timm(tmp_path, torchao):
    """FP8 swaps modules, not parameters: the state dict has the same keys and tensors, training steps run, and
    the folder save_pretrained writes loads strictly into plain timm with exactly the trained weights."""
    from torchao.float8.float8_linear import Float8Linear

    torch.manual_seed(0)
    objective = MPP(create_encoder("test_vit", 32, 8))
    before = {k: v.clone() for k, v in objective.state_dict().items()}
    of_16 = {  # "all": every Linear whose dimensions are multiples of 16
        n
        for n, m in objective.encoder.named_modules()
        if isinstance(m, torch.nn.Linear) and m.in_features % 16 == 0 and m.out_features % 16 == 0
    }
    converted = convert_to_fp8(objective.encoder, "tensorwise", "all")
    assert set(converted) == of_16 == {n for n, m in objective.encoder.named_modules() if isinstance(m, Float8Linear)}
    assert len(of_16) == 4 * len(objective.encoder.blocks)
    after = objective.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)

    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-3)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    for _ in range(2):
        objective(images).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = objective.encoder.state_dict()
    assert not torch.equal(trained["blocks.0.attn.qkv.weight"], before["encoder.blocks.0.attn.qkv.weight"])

    objective.save_pretrained(tmp_path / "out")
    plain = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)  # strict: every key must match
    loaded = plain.state_dict()
    assert all(torch.equal(loaded[k], trained[k]) for k in loaded)
    assert not any(type(m).__module__.startswith("torchao") for m in plain.modules())


def test_the_math_backend_runs_timm_attention_and_auto_changes_nothing():
    encoder = create_encoder("test_vit", 32, 8).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = encoder.forward_features(x)
        with attention_kernel("math"):
            math = encoder.forward_features(x)
        with attention_kernel("auto"):
            auto = encoder.forward_features(x)
    torch.testing.assert_close(math, reference, rtol=1e-4, atol=1e-5)
    assert torch.equal(auto, reference)


def test_mpp_holds_its_attention_kernel_inside_forward():
    # cuDNN attention has no CPU kernel: an MPP held to it fails in forward, the default runs; math computes the
    # same loss as torch's own choice on the same corruption
    torch.manual_seed(0)
    objective = MPP("test_vit", img_size=32, patch_size=8)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        reference = objective(images)
        objective.sdpa_backend = "math"
        math = objective(images, reference.corruption)
        objective.sdpa_backend = "cudnn"
        with pytest.raises(RuntimeError):
            objective(images, reference.corruption)
    torch.testing.assert_close(math.loss, reference.loss, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="sdpa_backend must be one of 'auto', 'flash', 'cudnn', 'efficient', 'math'"):
        MPP("test_vit", img_size=32, patch_size=8, sdpa_backend="fast")


def attention_ops(step) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sorted({e.name for e in prof.events() if e.name.startswith("aten::") and "attention" in e.name})


@pytest.mark.slow
def test_a_second_compiled_mpp_runs_its_own_kernel():
    # a kernel chosen around a compiled call is not guarded by dynamo: the second model of the class would reuse
    # the first one's graph. Chosen inside forward, each compiled MPP runs its own (another run in a notebook)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    first = torch.compile(MPP("test_vit", img_size=32, patch_size=8))
    second = torch.compile(MPP("test_vit", img_size=32, patch_size=8, sdpa_backend="math"))
    ran = {}
    for name, model in (("first", first), ("second", second)):
        model(images).loss.backward()  # compiles
        ran[name] = attention_ops(lambda m=model: m(images).loss.backward())
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ran["first"]  # torch's choice on a CPU
    assert ran["second"] == []  # the math path: matmuls and softmax


def test_the_module_docstring_states_the_filter_as_tested():
    """The layer list the docs give is the one the tests check."""
    doc = fast_paths.__doc__
    assert "ViT-B/16's qkv (768 -> 2304) and\n              fc1 (768 -> 3072)" in doc and "ViT-H/14's fc1" in doc


def test_emulation_on_cpu_is_asked_for_by_name(monkeypatch, torchao):
    monkeypatch.setenv(fast_paths.EMULATE_ON_CPU, "1")
    check_fp8("tensorwise", cuda=False)
    monkeypatch.setenv(fast_paths.EMULATE_ON_CPU, "0")
    with pytest.raises(UsageError, match="needs a CUDA GPU"):
        check_fp8("tensorwise", cuda=False)


def test_an_fp8_run_writes_a_folder_plain_timm_loads_strictly(tmp_path, monkeypatch, torchao):
    """The whole recipe with --fp8 (emulated on this CPU): the layers the filter picks are converted before
    training, the run trains, and its folder loads into timm with no torchao module and the trained weights."""
    import json

    import mpp
    from mpp.models.weights import read_metadata

    monkeypatch.setenv(fast_paths.EMULATE_ON_CPU, "1")
    run = mpp.pretrain(
        model="test_vit",
        img_size=32,
        patch_size=8,
        batch_size=8,
        max_steps=2,
        fp8="tensorwise",
        fp8_layers="all",
        sdpa_backend="math",
        workers=0,
        output_dir=str(tmp_path / "run"),
        progress=False,
    )
    derived = json.loads((run.run_dir / "run_config.json").read_text())["derived"]
    blocks = len(timm.create_model("test_vit").blocks)
    assert len(derived["fp8_layers_converted"]) == 4 * blocks
    plain = timm.create_model(f"local-dir:{run.run_dir}", pretrained=True)
    assert not any(type(m).__module__.startswith("torchao") for m in plain.modules())
    fresh = timm.create_model("test_vit", img_size=32, patch_size=8, num_classes=0)
    assert plain.state_dict().keys() == fresh.state_dict().keys()
    assert read_metadata(run.run_dir / "model.safetensors")["steps"] == 2
