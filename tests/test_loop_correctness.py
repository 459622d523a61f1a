"""Silent loop defects (issue 13): weight decay groups, optimiser step counting under gradient
accumulation, which examples a resumed streaming run reads, and RandAugment under per-batch seeding."""
import numpy as np
import pytest
import torch

from mpp import train
from mpp.config import PretrainConfig
from mpp.model import MPPModel, create_encoder


def tiny_images(path, n: int, size: int = 28):
    """n small RGB images saved with save_to_disk; image i is filled with colour (i, i // 256, 7)."""
    from datasets import Dataset, Image
    from PIL import Image as PILImage

    images = [PILImage.new("RGB", (size, size), (i % 256, i // 256, 7)) for i in range(n)]
    Dataset.from_dict({"image": images, "index": list(range(n))}).cast_column("image", Image()).save_to_disk(str(path))
    return path


# --- no weight decay on embeddings (#2) ---


def decay_of(optimizer, model) -> dict[str, float]:
    """parameter name -> the weight decay of the optimiser group that holds it."""
    group_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    return {name: group_of[id(p)] for name, p in model.named_parameters() if p.requires_grad}


def expected_decay(model: MPPModel, weight_decay: float) -> dict[str, float]:
    """timm's rule, stated independently: no decay on 1-d tensors (biases, norms, mask token) and on
    the encoder's own no_weight_decay() names (position embedding, class and register tokens)."""
    embeddings = {f"encoder.{n}" for n in model.encoder.no_weight_decay()} | {"mask_token"}
    return {name: 0.0 if p.ndim <= 1 or name in embeddings else weight_decay
            for name, p in model.named_parameters() if p.requires_grad}


def test_optimiser_decays_no_embeddings():
    model = MPPModel(create_encoder("test_vit", 28, 7, reg_tokens=2))
    cfg = PretrainConfig(weight_decay=0.05)
    got = decay_of(train.build_optimizer(model, cfg, 1e-3, torch.device("cpu")), model)
    assert got == expected_decay(model, 0.05)
    for name in ("encoder.pos_embed", "encoder.cls_token", "encoder.reg_token", "mask_token"):
        assert got[name] == 0.0, name
    assert got["encoder.blocks.0.attn.qkv.weight"] == 0.05 and got["head.1.weight"] == 0.05


def test_pretraining_builds_its_optimiser_without_decay_on_embeddings(tmp_path, monkeypatch):
    """The wiring: the optimiser pretrain() actually trains with."""
    built = []

    def recording(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    real = train.build_optimizer
    monkeypatch.setattr(train, "build_optimizer", recording)
    cfg = PretrainConfig(dataset=str(tiny_images(tmp_path / "data", 16)), model="test_vit", img_size=28, patch_size=7,
                         batch_size=8, max_steps=1, warmup_steps=0, progress=False, output_dir=str(tmp_path / "run"), workers=0)
    result = train.pretrain(cfg)
    assert len(built) == 1
    got = decay_of(built[0], result.model)
    assert got == expected_decay(result.model, cfg.weight_decay)
    assert got["encoder.pos_embed"] == got["encoder.cls_token"] == got["mask_token"] == 0.0
