"""The two frozen-feature readouts (`cls`, `mean`) against timm's own pooling, for ViTs with a class
token, without one (register token only) and Eva; and frozen_feature_report's keys."""

import copy

import pytest
import timm
import torch

from mpp.evaluation.probes import describe_readouts, extract_features, frozen_feature_report

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def images(n=6, size=28):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)


def normalised(x):
    return (x.float() / 255 - 0.5) / 0.5


def timm_pooled(model, x, pool):
    """timm's own pre-logits of a copy of the model re-pooled with global_pool=pool."""
    other = copy.deepcopy(model).eval()
    other.reset_classifier(0, global_pool=pool)
    with torch.no_grad():
        return other(normalised(x))


def test_class_token_model():
    # class token, pool 'token'; left in training mode with drop path: the features must come from eval mode
    model = timm.create_model("test_vit", num_classes=0, img_size=28, patch_size=7, drop_path_rate=0.5)
    x = images()
    feats = extract_features(model, x, MEAN, STD, batch_size=4)  # two batches
    assert model.training  # restored
    assert torch.allclose(feats["cls"], timm_pooled(model, x, "token"), atol=1e-5)
    # timm's 'avg' pool averages the patch tokens only (prefix excluded); the norm is on the tokens here
    assert torch.allclose(feats["mean"], timm_pooled(model, x, "avg"), atol=1e-5)
    assert not torch.allclose(feats["cls"], feats["mean"], atol=1e-3)
    assert describe_readouts(model)["cls"].startswith("class token")


def test_register_token_model_without_class_token():
    model = timm.create_model(
        "test_vit2", num_classes=0, img_size=28, patch_size=7
    ).eval()  # 1 register token, avg + fc_norm
    assert model.num_prefix_tokens == 1 and model.cls_token is None
    x = images()
    feats = extract_features(model, x, MEAN, STD)
    with torch.no_grad():
        assert torch.allclose(feats["cls"], model(normalised(x)), atol=1e-5)  # timm's pooled pre-logits
        assert torch.allclose(model.fc_norm(feats["mean"]), timm_pooled(model, x, "avg"), atol=1e-5)
    assert "no class token" in describe_readouts(model)["cls"]


def test_eva():
    model = timm.create_model("eva02_tiny_patch14_224", num_classes=0, img_size=28, patch_size=7, depth=2).eval()
    x = images()
    feats = extract_features(model, x, MEAN, STD)
    with torch.no_grad():
        assert torch.allclose(model.fc_norm(feats["cls"]), timm_pooled(model, x, "token"), atol=1e-5)
        assert torch.allclose(model.fc_norm(feats["mean"]), timm_pooled(model, x, "avg"), atol=1e-5)


def test_report_has_both_readouts_per_metric():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=0, img_size=28, patch_size=7)
    x, y = images(40), torch.arange(4).repeat(10)
    report = frozen_feature_report(model, x, y, x[:12], y[:12], MEAN, STD, shots=(1, 5), draws=2)
    expected = {f"{m}_{r}" for m in ("knn20", "linear_1shot", "linear_5shot") for r in ("cls", "mean")}
    assert set(report) == expected | {f"linear_{n}shot_{r}_std" for n in (1, 5) for r in ("cls", "mean")}
    assert all(0 <= v <= 1 for v in report.values())
    assert model.training  # restored after evaluation
    with pytest.raises(ValueError):
        frozen_feature_report(model, x, y, x, y, MEAN, STD, shots=(11,))  # more shots than examples per class
