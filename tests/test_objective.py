"""The public objective, mpp.MPP: the caller's encoder left as it was, the input contract checked
(against timm's own create_transform and targets computed here by hand), one name per setting, and
save_pretrained / from_pretrained as the same timm hub folder a pretraining run writes."""

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from mpp import MPP
from mpp.models.masking import sample_corruption
from mpp.models.model import create_encoder
from mpp.models.weights import read_metadata, save_weights


def vit_with_unused_parts(**kw):
    """A timm ViT as a user makes it: average pooling with fc_norm and a 10-class head, neither used by MPP."""
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=28, patch_size=7, depth=1, global_pool="avg", num_classes=10, **kw
    )


def digits_u8(n: int = 6) -> torch.Tensor:
    """(n, 3, 28, 28) uint8: random colours per 7x7 patch plus noise, so that patch means are spread out."""
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (n, 3, 4, 4), generator=g).repeat_interleave(7, 2).repeat_interleave(7, 3)
    return (base + torch.randint(-20, 21, (n, 3, 28, 28), generator=g)).clamp(0, 255).to(torch.uint8)


def hand_targets(images_u8: torch.Tensor, ids: torch.Tensor, patch: int = 7) -> torch.Tensor:
    """The paper's target computed here: each corrupted patch's mean colour, 3 bits per channel, r*64 + g*8 + b."""
    x = images_u8.numpy().astype(np.float64) / 255
    grid = x.shape[-1] // patch
    out = np.zeros(ids.shape, dtype=np.int64)
    for b in range(ids.shape[0]):
        for k, i in enumerate(ids[b].tolist()):
            r, c = divmod(i, grid)
            mean = x[b, :, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch].mean(axis=(1, 2))
            level = np.minimum(np.floor(mean * 8), 7).astype(int)
            out[b, k] = level[0] * 64 + level[1] * 8 + level[2]
    return torch.from_numpy(out)


# ---- the caller's encoder ----


def test_the_callers_encoder_is_left_as_it_was():
    encoder = vit_with_unused_parts()
    flags = {n: p.requires_grad for n, p in encoder.named_parameters()}
    MPP(encoder)(digits_u8()).loss.backward()
    assert {n: p.requires_grad for n, p in encoder.named_parameters()} == flags and all(flags.values())
    encoder.zero_grad()
    encoder(torch.randn(2, 3, 28, 28)).sum().backward()  # fine-tuning the same object trains its head and fc_norm
    assert encoder.head.weight.grad is not None and encoder.fc_norm.weight.grad is not None


UNUSED_CASES = {
    "avg_pool_fc_norm_head": lambda: vit_with_unused_parts(),
    "attention_pool": lambda: timm.create_model(
        "vit_tiny_patch16_224", img_size=28, patch_size=7, depth=1, global_pool="map", num_classes=4
    ),
    "distilled_two_heads": lambda: timm.create_model(
        "deit_tiny_distilled_patch16_224", img_size=28, patch_size=7, depth=1, num_classes=4
    ),
}


@pytest.mark.parametrize("case", list(UNUSED_CASES))
def test_unused_parameters_are_exactly_those_mpp_gives_no_gradient(case):
    mpp = MPP(UNUSED_CASES[case]())
    mpp(digits_u8()).loss.backward()
    no_gradient = {n for n, p in mpp.named_parameters() if p.grad is None}
    assert no_gradient == set(mpp.unused_parameter_names()) and no_gradient


def test_an_encoder_mpp_builds_has_its_unused_parts_frozen_and_nothing_else():
    mpp = MPP("vit_tiny_patch16_224", img_size=28, patch_size=7, depth=1, global_pool="avg", num_classes=10)
    frozen = {n for n, p in mpp.named_parameters() if not p.requires_grad}
    assert (
        frozen
        == set(mpp.unused_parameter_names())
        == {"encoder.fc_norm.weight", "encoder.fc_norm.bias", "encoder.head.weight", "encoder.head.bias"}
    )


def test_ddp_around_mpp_needs_no_find_unused_parameters(tmp_path):
    """DDP's reducer waits for a gradient of every parameter it syncs: without the ignore list MPP hands it,
    the second step fails (checked on a copy without it); with it, steps run."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if dist.is_initialized():
        pytest.skip("a process group is already running in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        images = digits_u8(4)

        def two_steps(module):
            ddp = DistributedDataParallel(module)  # find_unused_parameters=False, the default
            for _ in range(2):
                ddp(images).loss.backward()

        two_steps(MPP(vit_with_unused_parts()))
        without = MPP(vit_with_unused_parts())
        del without._ddp_params_and_buffers_to_ignore
        with pytest.raises(RuntimeError, match="finished reduction|unused"):
            two_steps(without)
    finally:
        dist.destroy_process_group()


# ---- the input contract ----


def timm_eval_transform(encoder):
    """timm's own preprocessing for this encoder (resize, centre crop at 1.0, ToTensor, Normalize with its mean/std)."""
    config = timm.data.resolve_data_config({}, model=encoder)
    return timm.data.create_transform(**{**config, "input_size": (3, 28, 28), "crop_pct": 1.0})


def pil_images(u8: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in u8]


def test_normalised_input_from_timms_transform_trains_on_the_targets_of_its_pixels():
    encoder = create_encoder("deit_tiny_patch16_224", 28, 7, depth=1)  # ImageNet's mean and std
    u8 = digits_u8()
    normalised = torch.stack([timm_eval_transform(encoder)(im) for im in pil_images(u8)])
    c = sample_corruption(len(u8), 16, 0.5, (0.8, 0.1, 0.1))
    from_pixels = MPP(encoder)
    from_normalised = MPP(encoder, inputs="normalised")
    from_normalised.load_state_dict(from_pixels.state_dict())
    out_p, out_n = from_pixels(u8, c), from_normalised(normalised, c)
    assert torch.equal(out_n.target.squeeze(-1), hand_targets(u8, c.ids))
    assert torch.equal(out_p.target, out_n.target)
    torch.testing.assert_close(out_n.loss, out_p.loss)


def test_normalised_images_fed_as_pixels_are_refused_not_clamped():
    encoder = create_encoder("deit_tiny_patch16_224", 28, 7, depth=1)
    normalised = torch.stack([timm_eval_transform(encoder)(im) for im in pil_images(digits_u8())])
    with pytest.raises(ValueError, match=r"pixels in \[0, 1\] \(inputs='pixels'\).*inputs='normalised'") as refusal:
        MPP(encoder)(normalised)
    assert len(str(refusal.value).splitlines()) == 1


def test_images_normalised_with_other_statistics_are_un_normalised_with_them():
    encoder = create_encoder("test_vit", 28, 7)  # mean and std 0.5
    imagenet = dict(input_mean=(0.485, 0.456, 0.406), input_std=(0.229, 0.224, 0.225))
    u8 = digits_u8()
    x = (u8 / 255 - torch.tensor(imagenet["input_mean"]).view(3, 1, 1)) / torch.tensor(imagenet["input_std"]).view(
        3, 1, 1
    )
    c = sample_corruption(len(u8), 16, 0.5, (0.8, 0.1, 0.1))
    from_pixels = MPP(encoder)
    declared = MPP(encoder, inputs="normalised", **imagenet)
    declared.load_state_dict(from_pixels.state_dict())
    out = declared(x, c)
    assert torch.equal(out.target.squeeze(-1), hand_targets(u8, c.ids))
    torch.testing.assert_close(out.loss, from_pixels(u8, c).loss)  # the encoder still sees its own normalisation
    with pytest.raises(ValueError, match=r"un-normalise to \[.*\], not \[0, 1\]: pass the input_mean and input_std"):
        MPP(encoder, inputs="normalised")(x)  # declared with the encoder's 0.5 / 0.5: out of range


@pytest.mark.parametrize(
    "images,inputs,message",
    [
        (torch.full((2, 3, 28, 28), float("nan")), "pixels", r"spans \[nan, nan\]"),
        (torch.zeros(2, 3, 28, 28, dtype=torch.uint8), "normalised", "uint8 images are pixels"),
        (torch.zeros(2, 3, 28, 28, dtype=torch.int64), "pixels", "must be uint8 or float, got torch.int64"),
    ],
)
def test_other_bad_batches_are_one_clear_error(images, inputs, message):
    with pytest.raises(ValueError, match=message):
        MPP(create_encoder("test_vit", 28, 7), inputs=inputs)(images)


def test_off_the_cpu_only_the_first_batch_is_read_back():
    """On the meta device every read of a value to the host fails, as an accelerator would have to wait for it:
    the first float batch is checked (and fails here), later ones run without a host read; 'always' reads each."""
    x = torch.rand(4, 3, 28, 28, device="meta")
    auto = MPP("test_vit", img_size=28, patch_size=7).to("meta")
    with pytest.raises(RuntimeError, match="meta"):
        auto(x)
    assert auto(x).loss.device.type == "meta" and auto(x).loss.shape == ()
    always = MPP("test_vit", img_size=28, patch_size=7, check_inputs="always").to("meta")
    for _ in range(2):
        with pytest.raises(RuntimeError, match="meta"):
            always(x)


def test_a_float_batch_compiles_without_graph_breaks():
    mpp = MPP(create_encoder("test_vit", 28, 7))
    explanation = torch._dynamo.explain(lambda images: mpp(images).loss)(torch.rand(4, 3, 28, 28))
    torch._dynamo.reset()
    assert explanation.break_reasons == [], explanation.break_reasons


# ---- one name per setting ----


def test_random_from_image_draws_replacements_from_the_same_image():
    images = digits_u8(8)
    for random_from, same in (("image", 1.0), ("batch", None)):
        out = MPP(create_encoder("test_vit", 28, 7), mask_probs=(0.0, 1.0, 0.0), random_from=random_from)(images)
        share = (out.corruption.source // 16 == torch.arange(8).unsqueeze(1)).float().mean().item()
        assert share == same if same else share < 0.5


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(mask_ratio=1.0), r"mask_ratio must be in \(0, 1\), got 1.0"),
        (dict(mask_probs=(0.5, 0.5, 0.5)), "mask_probs must be three non-negative numbers .* summing to 1"),
        (dict(random_from="same"), "random_from must be one of 'batch', 'image', got 'same'"),
        (dict(inputs="normalized"), "inputs must be one of 'pixels', 'normalised', got 'normalized'"),
        (dict(check_inputs="sometimes"), "check_inputs must be one of 'auto', 'always', 'never'"),
        (dict(input_mean=(0.5, 0.5, 0.5)), "give them with inputs='normalised'"),
        (dict(inputs="normalised", input_std=(0.5, 0.0, 0.5)), r"std > 0"),
        (dict(corrupt_at="middle"), "corrupt_at must be auto, embedding or pixels"),
        (dict(target="mean4bit"), "unknown target 'mean4bit'"),
    ],
)
def test_bad_settings_are_one_clear_error(settings, message):
    with pytest.raises(ValueError, match=message):
        MPP(create_encoder("test_vit", 28, 7), **settings)


def test_timm_arguments_go_with_a_name_only():
    with pytest.raises(TypeError, match="those are for a model name"):
        MPP(create_encoder("test_vit", 28, 7), depth=2)


# ---- save_pretrained / from_pretrained ----


def perturbed(mpp: MPP) -> MPP:
    with torch.no_grad():
        for p in mpp.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # not timm's init: a load that silently re-initialises would show
    return mpp


def test_save_pretrained_writes_a_folder_timm_loads(tmp_path):
    mpp = perturbed(
        MPP(
            "vit_tiny_patch16_224",
            img_size=32,
            patch_size=8,
            depth=2,
            reg_tokens=2,
            class_token=False,
            global_pool="avg",
        )
    )
    mpp.save_pretrained(tmp_path / "out")
    encoder = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(encoder(x), mpp.encoder.eval()(x)) and torch.equal(
            encoder.forward_features(x), mpp.encoder.forward_features(x)
        )
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_args"]["depth"] == 2


def test_from_pretrained_gives_back_the_whole_objective(tmp_path):
    settings = dict(target="mean3bit_4x4", mask_ratio=0.4, mask_probs=(0.6, 0.3, 0.1), random_from="image")
    mpp = perturbed(
        MPP("vit_tiny_patch16_224", img_size=28, patch_size=7, depth=1, global_pool="avg", **settings)
    ).eval()
    mpp.save_pretrained(tmp_path)
    loaded = MPP.from_pretrained(tmp_path)
    assert not loaded.training and loaded.settings == {
        **settings,
        "mask_probs": [0.6, 0.3, 0.1],
        "corrupt_at": "embedding",
    }
    assert loaded.state_dict().keys() == mpp.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in mpp.state_dict().items())
    c = sample_corruption(6, 16, 0.4, (0.6, 0.3, 0.1), "image")
    with torch.no_grad():
        assert torch.equal(loaded(digits_u8(), c).loss, mpp(digits_u8(), c).loss)
    assert {n for n, p in loaded.named_parameters() if not p.requires_grad} == set(loaded.unused_parameter_names())
    assert MPP.from_pretrained(tmp_path, inputs="normalised").inputs == "normalised"  # the caller's choices on top


def test_a_run_export_and_save_pretrained_write_the_same_folder(tmp_path):
    from mpp.training.pretrain import export_weights
    from mpp.training.pretrain_config import PretrainConfig

    mpp = perturbed(MPP(create_encoder("test_vit", 28, 7), mask_ratio=0.4, random_from="image"))
    export_weights(
        mpp,
        PretrainConfig(model="test_vit", img_size=28, patch_size=7, mask_ratio=0.4, random_from="image"),
        tmp_path / "run",
        step=3,
    )
    mpp.save_pretrained(tmp_path / "library")
    for name in ("model.safetensors", "mpp_head.safetensors"):
        run, library = load_file(tmp_path / "run" / name), load_file(tmp_path / "library" / name)
        assert run.keys() == library.keys() and all(torch.equal(run[k], library[k]) for k in run)
        run_meta, library_meta = read_metadata(tmp_path / "run" / name), read_metadata(tmp_path / "library" / name)
        assert run_meta.pop("steps") == 3 and run_meta == library_meta
        assert library_meta["mpp_mask_ratio"] == 0.4 and library_meta["mpp_random_from"] == "image"
    assert (tmp_path / "run" / "config.json").read_text() == (tmp_path / "library" / "config.json").read_text()


def test_folders_from_before_read_their_settings_from_run_config(tmp_path):
    """A run folder from before: no timm config.json, no objective settings in the metadata, run_config.json beside."""
    mpp = perturbed(
        MPP(create_encoder("test_vit", 28, 7), mask_ratio=0.4, mask_probs=(0.6, 0.3, 0.1), random_from="image")
    )
    mpp.save_pretrained(tmp_path)
    for name in ("model.safetensors", "mpp_head.safetensors"):
        with safe_open(str(tmp_path / name), framework="pt") as f:
            old = {
                k: v
                for k, v in f.metadata().items()
                if k not in ("format", "mpp_mask_ratio", "mpp_mask_probs", "mpp_random_from")
            }
        save_weights(tmp_path / name, load_file(tmp_path / name), old)
    (tmp_path / "config.json").unlink()
    (tmp_path / "run_config.json").write_text(
        json.dumps({"mask_ratio": 0.4, "mask_probs": [0.6, 0.3, 0.1], "random_from": "image"})
    )
    loaded = MPP.from_pretrained(tmp_path)
    assert (loaded.mask_ratio, loaded.mask_probs, loaded.random_from) == (0.4, (0.6, 0.3, 0.1), "image")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in mpp.state_dict().items())


def test_from_pretrained_needs_the_head(tmp_path):
    MPP(create_encoder("test_vit", 28, 7)).save_pretrained(tmp_path)
    (tmp_path / "mpp_head.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no mpp_head.safetensors"):
        MPP.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing: no such folder"):
        MPP.from_pretrained(tmp_path / "missing")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors there"):
        MPP.from_pretrained(tmp_path)


def test_save_refuses_an_encoder_timm_would_rebuild_differently(tmp_path):
    encoder = create_encoder("vit_tiny_patch16_224", 32, 8, depth=1)
    del encoder._model_args  # as if built without timm recording its arguments: config.json would say depth 12
    with pytest.raises(ValueError, match="timm would rebuild this encoder from config.json with other weights"):
        MPP(encoder).save_pretrained(tmp_path)
    assert list(tmp_path.iterdir()) == []
