import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mpp.evaluation import diagnostics as dg
from mpp.models.masking import Corruption
from mpp.models.model import MPP, create_encoder
from mpp.training.pretrain import export_weights
from mpp.training.pretrain_config import PretrainConfig

P = 7  # test_vit at 28 px: a 4x4 grid of 7x7 patches, one class token, 6 blocks of 2 heads


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return create_encoder("test_vit", 28, P).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (3, 3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


# ---- shapes and finiteness on a tiny model ----


def test_patch_embed_components(encoder):
    comps = dg.patch_embed_components(encoder, n=28)
    assert comps.shape == (28, P, P, 3) and np.isfinite(comps).all()
    assert comps.min() >= 0 and comps.max() <= 1
    assert np.allclose(comps.reshape(28, -1).min(1), 0) and np.allclose(comps.reshape(28, -1).max(1), 1)


def test_patch_embed_components_match_numpy_pca(encoder):
    w = encoder.patch_embed.proj.weight.detach().numpy().reshape(64, -1)
    eigval, eigvec = np.linalg.eigh(np.cov(w, rowvar=False))  # independent reference: covariance eigenvectors
    first = eigvec[:, -1].reshape(3, P, P).transpose(1, 2, 0)
    first = (first - first.min()) / (first.max() - first.min())
    got = dg.patch_embed_components(encoder, n=1)[0]
    assert np.allclose(got, first, atol=1e-4) or np.allclose(got, 1 - first, atol=1e-4)  # sign is arbitrary


def test_attention_maps_shapes(encoder, images):
    maps = dg.attention_maps(encoder, images)
    assert maps.shape == (6, 3, 2, 17, 17) and np.isfinite(maps).all()
    assert np.allclose(maps.sum(-1), 1, atol=1e-5)


def test_recomputed_attention_reproduces_timm_blocks(encoder, images):
    """softmax(q k^T s) @ v, then proj, equals what each timm block's (fused) attention returned."""
    seen = []
    hooks = [blk.attn.register_forward_hook(lambda m, a, out: seen.append((a[0], out))) for blk in encoder.blocks]
    maps = torch.from_numpy(dg.attention_maps(encoder, images))  # runs the encoder once, hooks see it
    for h in hooks:
        h.remove()
    assert len(seen) == len(encoder.blocks)
    for blk, w, (x, out) in zip(encoder.blocks, maps, seen):
        B, T, D = x.shape
        v = F.linear(x, blk.attn.qkv.weight[2 * D :], blk.attn.qkv.bias[2 * D :])  # (B, T, D) the value third
        v = v.reshape(B, T, 2, D // 2).transpose(1, 2)  # (B, H, T, hd)
        mixed = (w @ v).transpose(1, 2).reshape(B, T, D)
        assert torch.allclose(blk.attn.proj(mixed), out, atol=1e-5)


def test_attention_weights_respect_qk_norm():
    torch.manual_seed(0)
    enc = create_encoder("test_vit", 28, P, qk_norm=True).eval()
    blk = enc.blocks[0]
    with torch.no_grad():
        blk.attn.q_norm.weight.mul_(3.0)  # a q norm that matters
        x = torch.randn(2, 17, 64)
        w = dg.attention_weights(blk.attn, x)
        B, T, D = x.shape
        v = (
            F.linear(x, blk.attn.qkv.weight[2 * D :], blk.attn.qkv.bias[2 * D :])
            .reshape(B, T, 2, D // 2)
            .transpose(1, 2)
        )
        assert torch.allclose(blk.attn.proj((w @ v).transpose(1, 2).reshape(B, T, D)), blk.attn(x), atol=1e-5)


def test_rollout_and_distance_shapes(encoder, images):
    maps = dg.attention_maps(encoder, images)
    dist = dg.mean_attention_distance(maps, (4, 4), P, num_prefix=1)
    assert dist.shape == (6, 3, 2) and np.isfinite(dist).all()
    assert (dist >= 0).all() and (dist <= math.hypot(21, 21)).all()
    roll = dg.attention_rollout(maps, num_prefix=1)
    assert roll.shape == (3, 4, 4) and np.isfinite(roll).all() and (roll >= 0).all()


def test_pos_embed_similarity_of_encoder(encoder):
    sim = dg.pos_embed_similarity(encoder)
    assert sim.shape == (4, 4, 4, 4) and np.isfinite(sim).all()
    # the class token's row is skipped: patch (0, 0) is row 1 of pos_embed
    e = F.normalize(encoder.pos_embed[0, 1:].detach(), dim=-1)
    assert np.isclose(sim[0, 0, 1, 2], float(e[0] @ e[6]), atol=1e-6)


# ---- hand-computed references ----


def test_distance_of_self_attention_is_zero():
    attn = np.broadcast_to(np.eye(17), (2, 3, 17, 17))  # every token attends only to itself
    assert np.allclose(dg.mean_attention_distance(attn, (4, 4), P, num_prefix=1), 0)


def test_distance_of_uniform_attention_on_2x2_grid():
    p = 16
    attn = np.full((5, 5), 1 / 5)  # class token + 2x2 patches; renormalised over the 4 patch keys
    expected = (0 + p + p + p * math.sqrt(2)) / 4  # the same for every query by symmetry
    assert np.isclose(dg.mean_attention_distance(attn, (2, 2), p, num_prefix=1), expected)


def test_distance_of_attention_to_one_neighbour():
    # 1x3 grid, no prefix: each query looks only at the patch to its right (the last at the first)
    attn = np.zeros((3, 3))
    attn[0, 1] = attn[1, 2] = attn[2, 0] = 1
    assert np.isclose(dg.mean_attention_distance(attn, (1, 3), 10, num_prefix=0), (10 + 10 + 20) / 3)


def test_pos_embed_similarity_hand_built():
    e = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 0.0]])  # a 2x2 grid
    sim = dg.pos_embed_similarity(e)
    assert sim.shape == (2, 2, 2, 2)
    flat = sim.reshape(4, 4)
    assert np.allclose(np.diag(flat), 1)
    assert np.allclose(flat, flat.T)  # sim[a, b] == sim[b, a]
    assert np.isclose(flat[0, 3], -1) and np.isclose(flat[0, 1], 0) and np.isclose(flat[0, 2], 1 / math.sqrt(2))
    with_prefix = dg.pos_embed_similarity(torch.cat([torch.randn(1, 2), e])[None], num_prefix=1)
    assert np.allclose(with_prefix, sim)


def test_rollout_of_identity_attention_points_at_no_patch():
    # attention only to oneself: the class token keeps only its own information
    attn = np.broadcast_to(np.eye(5), (3, 1, 2, 5, 5))
    assert np.allclose(dg.attention_rollout(attn, num_prefix=1), 0)


def test_rollout_one_layer_by_hand():
    a = np.full((5, 5), 1 / 5)  # one layer, uniform: (A + I) / 2 gives the class row 0.1 per patch
    roll = dg.attention_rollout(a[None, None, None], num_prefix=1)
    assert roll.shape == (1, 2, 2) and np.allclose(roll, 0.1)
    # no class token: the mean over patch rows; each row puts 0.1 elsewhere and 0.6 on itself
    roll = dg.attention_rollout(a[None, None, None], num_prefix=1, from_class_token=False)
    assert np.allclose(roll, (0.6 + 3 * 0.1) / 4)


# ---- MPP predictions and loading ----


@pytest.mark.parametrize("target", ["mean3bit", "mean3bit_4x4", "pixels_l2"])
def test_mpp_predictions(target, images):
    torch.manual_seed(0)
    model = MPP(create_encoder("test_vit", 28, P), target=target)
    ids = torch.tensor([[0, 5], [1, 15], [3, 4]])
    corruption = Corruption(
        ids=ids, kind=torch.tensor([[0, 1], [2, 0], [0, 0]]), source=torch.zeros(3, 2, dtype=torch.long)
    )
    pred = dg.mpp_predictions(model, images, corruption)
    for key in ("input", "predicted", "true"):
        assert pred[key].shape == (3, 28, 28, 3) and np.isfinite(pred[key]).all()
        assert pred[key].min() >= 0 and pred[key].max() <= 1
    assert pred["kind"].shape == (3, 4, 4) and (pred["kind"] >= 0).sum() == 6 and pred["kind"][0, 1, 1] == 1
    x = images.permute(0, 2, 3, 1).numpy() / 255
    assert np.allclose(pred["input"], x)
    assert np.allclose(pred["true"][0, :7, 7:], x[0, :7, 7:])  # patches 1-3 are not corrupted: the input
    assert np.allclose(pred["predicted"][0, 7:, :7], x[0, 7:, :7])  # nor is patch 4
    true_patch = pred["true"][0, :7, :7]  # patch 0
    if target == "mean3bit":  # one 3-bit colour: the bin centre of the patch mean
        expected = (np.floor(x[0, :7, :7].mean((0, 1)) * 8).clip(0, 7) + 0.5) / 8
        assert np.allclose(true_patch, expected)
    elif target == "pixels_l2":
        assert np.allclose(true_patch, x[0, :7, :7])
    else:
        assert len(np.unique(true_patch.reshape(-1, 3), axis=0)) <= 16


def test_prediction_grid(images):
    model = MPP(create_encoder("test_vit", 28, P))
    grid = dg.prediction_grid(model, images)
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
    assert grid.shape[0] == 3 * 112 + 2 * 2 and grid.shape[1] == 3 * 112 + 2 * 2  # 4x enlarged panels


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    torch.manual_seed(3)
    model = MPP(create_encoder("test_vit", 28, P), target="mean3bit_4x4")
    export_weights(model, PretrainConfig(model="test_vit", img_size=28, patch_size=P, target="mean3bit_4x4"), d, step=2)
    return d, model


def test_load_mpp_model(run_dir):
    d, original = run_dir
    for path in (d, d / "model.safetensors"):
        model, head_loaded = dg.load_mpp_model(path)
        assert head_loaded and model.target.name == "mean3bit_4x4" and not model.training
        assert torch.equal(model.mask_token, original.mask_token)
        for k, v in original.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k


def test_load_mpp_model_without_head(run_dir, tmp_path):
    d, _ = run_dir
    (tmp_path / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes())
    model, head_loaded = dg.load_mpp_model(tmp_path)
    assert not head_loaded and model.target.name == "mean3bit_4x4"


def test_load_mpp_model_rejects_a_foreign_head(run_dir, tmp_path):
    from mpp.models.weights import save_weights

    d, _ = run_dir
    (tmp_path / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes())
    save_weights(
        tmp_path / dg.HEAD_FILE,
        {"mask_token": torch.zeros(64), "head.1.weight": torch.zeros(512, 64), "head.1.bias": torch.zeros(512)},
        {},
    )
    with pytest.raises(ValueError, match="does not fit"):
        dg.load_mpp_model(tmp_path)


def test_model_with_registers_and_no_class_token(images):
    enc = create_encoder(
        "test_vit", 28, P, reg_tokens=4, class_token=False, global_pool="avg", no_embed_class=True
    ).eval()
    maps = dg.attention_maps(enc, images)
    assert maps.shape == (6, 3, 2, 20, 20)  # 4 register tokens + 16 patches
    assert dg.pos_embed_similarity(enc).shape == (4, 4, 4, 4)  # no_embed_class: no prefix rows to skip
    roll = dg.attention_rollout(maps, enc.num_prefix_tokens, from_class_token=False)
    assert roll.shape == (3, 4, 4) and np.isfinite(roll).all()
    assert dg.mean_attention_distance(maps, (4, 4), P, enc.num_prefix_tokens).shape == (6, 3, 2)


def test_unpatchify_inverts_patchify():
    from mpp.models.targets import patchify

    x = torch.rand(2, 3, 14, 21)
    assert torch.equal(dg.unpatchify(patchify(x, P), (2, 3)), x)
