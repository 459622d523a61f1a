import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed

from mpp import load_backbone, read_metadata


def test_files_and_metadata(exported):
    run_dir, model = exported
    meta = read_metadata(run_dir / "model.safetensors")
    assert meta["timm_model"] == "test_vit" and meta["img_size"] == 28 and meta["patch_size"] == 7
    assert meta["mpp_target"] == "mean3bit" and meta["steps"] == 5 and "mpp_version" in meta
    assert len(meta["mean"]) == 3 and len(meta["std"]) == 3
    encoder_keys = set(load_file(run_dir / "model.safetensors"))
    assert encoder_keys == set(model.encoder.state_dict())
    assert not any("mask_token" in k or k.startswith("head") for k in encoder_keys)
    assert set(load_file(run_dir / "mpp_head.safetensors")) == {"mask_token", "head.1.weight", "head.1.bias"}


PLAIN_TIMM = r"""
import json, sys
import timm, torch
from safetensors import safe_open
path = sys.argv[1]
with safe_open(path, framework="pt") as f:
    meta = f.metadata()
    tensors = {k: f.get_tensor(k) for k in f.keys()}
model = timm.create_model(
    meta["timm_model"], pretrained=True, num_classes=0,
    img_size=json.loads(meta["img_size"]), patch_size=json.loads(meta["patch_size"]),
    pretrained_cfg_overlay=dict(file=path, num_classes=0, custom_load=False,
                                mean=tuple(json.loads(meta["mean"])), std=tuple(json.loads(meta["std"]))),
)
state = model.state_dict()
assert set(state) == set(tensors), set(state) ^ set(tensors)
assert all(torch.equal(state[k], tensors[k]) for k in tensors)
assert "mpp" not in sys.modules
torch.manual_seed(0)
x = torch.randn(2, 3, 28, 28)
torch.save(model.eval()(x), sys.argv[2])
print("OK")
"""


def test_strict_round_trip_in_plain_timm(exported, tmp_path):
    run_dir, model = exported
    out = tmp_path / "features.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_TIMM, str(run_dir / "model.safetensors"), str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]
    torch.manual_seed(0)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.allclose(torch.load(out), model.encoder.eval()(x), atol=1e-6)


def test_load_backbone_same_size(exported):
    run_dir, model = exported
    backbone = load_backbone(run_dir / "model.safetensors")
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(backbone.state_dict()[k], v), k


def test_load_backbone_at_another_img_size(exported):
    run_dir, model = exported
    backbone = load_backbone(run_dir / "model.safetensors", img_size=56)  # 4x4 -> 8x8 grid
    expected = resample_abs_pos_embed(
        model.encoder.pos_embed.detach(), new_size=(8, 8), old_size=(4, 4), num_prefix_tokens=1
    )
    assert backbone.pos_embed.shape == (1, 65, 64)
    assert torch.allclose(backbone.pos_embed, expected, atol=1e-6)
    assert torch.equal(backbone.patch_embed.proj.weight, model.encoder.patch_embed.proj.weight)
    assert backbone(torch.randn(1, 3, 56, 56)).shape == (1, 64)


def test_load_backbone_with_a_new_head(exported):
    run_dir, _ = exported
    backbone = load_backbone(run_dir / "model.safetensors", num_classes=10)
    assert backbone(torch.randn(2, 3, 28, 28)).shape == (2, 10)


def test_load_backbone_rejects_other_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_backbone(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="timm_model"):
        load_backbone(tmp_path / "other.safetensors")
