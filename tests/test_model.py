import math

import pytest
import torch

from mpp.models.masking import UNCHANGED, sample_corruption
from mpp.models.model import MPP, create_encoder

# small timm ViTs: class token, register tokens + class token, no class token (avg pool, fc_norm)
ENCODERS = {
    "cls": dict(model_name="test_vit", img_size=28, patch_size=7),
    "registers": dict(model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, reg_tokens=2),
    "no_cls_avg": dict(
        model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, class_token=False, global_pool="avg"
    ),
}


def build(kind: str, target: str = "mean3bit") -> MPP:
    return MPP(create_encoder(**ENCODERS[kind]), target=target)


@pytest.mark.parametrize("kind", list(ENCODERS))
def test_uncorrupted_encoder_equals_timm_forward_features(kind):
    model = build(kind).eval()
    x = torch.randn(3, 3, model.encoder.patch_embed.img_size[0], model.encoder.patch_embed.img_size[1])
    with torch.no_grad():
        ref = model.encoder.forward_features(x)
        assert torch.equal(model.encode(x), ref)
        # a corruption whose every token is 'unchanged' changes nothing either
        c = sample_corruption(3, model.num_patches, 0.5, (0.0, 0.0, 1.0))
        assert (c.kind == UNCHANGED).all()
        assert torch.equal(model.encode(x, c), ref)


@pytest.mark.parametrize("kind", list(ENCODERS))
@pytest.mark.parametrize("target", ["mean3bit", "mean3bit_4x4", "pixels_l2"])
def test_every_trainable_parameter_gets_a_gradient(kind, target):
    model = build(kind, target)
    size = model.encoder.patch_embed.img_size[0]
    out = model(torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8))
    assert torch.isfinite(out.loss) and 0 <= out.accuracy <= 1
    out.loss.backward()
    unused = set(model.unused_parameter_names())  # the encoder's pooling and classifier, left trainable
    missing = [
        n for n, p in model.named_parameters() if n not in unused and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert missing == []
    assert [n for n, p in model.named_parameters() if n in unused and p.grad is not None] == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_output_shapes():
    model = build("cls", "mean3bit_4x4")  # 16 patches, 8 corrupted
    out = model(torch.rand(4, 3, 28, 28))
    assert out.pred.shape == (4, 8, 16 * 512) and out.target.shape == (4, 8, 16)


def test_initial_loss_is_ln512():
    model = build("cls")
    out = model(torch.randint(0, 256, (64, 3, 28, 28), dtype=torch.uint8))
    assert abs(out.loss.item() - math.log(512)) < 0.05


def test_loss_only_on_corrupted_patches():
    """Changing the pixels of an uncorrupted patch changes no target that the loss sees."""
    model = build("cls")
    x = torch.rand(2, 3, 28, 28)
    c = sample_corruption(2, 16, 0.5, (0.8, 0.1, 0.1))
    kept = sorted(set(range(16)) - set(c.ids[0].tolist()))[0]
    y = x.clone()
    r, col = divmod(kept, 4)
    y[0, :, r * 7 : r * 7 + 7, col * 7 : col * 7 + 7] = 1 - y[0, :, r * 7 : r * 7 + 7, col * 7 : col * 7 + 7]
    assert torch.equal(model(x, c).target, model(y, c).target)


def test_step_compiles_without_graph_breaks():
    model = build("cls")
    x = torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8)
    explanation = torch._dynamo.explain(lambda images: model(images).loss)(x)
    # break_reasons: torch 2.14's graph_break_count stays 0 for a break with nothing traced after it
    assert explanation.graph_break_count == 0 and explanation.break_reasons == [], explanation.break_reasons


def test_unknown_and_non_vit_models_are_refused():
    with pytest.raises(ValueError, match="unknown timm model"):
        create_encoder("vit_nonexistent", 28, 7)
    with pytest.raises(ValueError, match="not a timm VisionTransformer"):
        create_encoder("resnet18", 28, 7)


# ---- where the corruption sits and where predictions are read (a signal traced through timm's parts) ----
PLACEMENT = {**ENCODERS, "eva02_rope": dict(model_name="eva02_tiny_patch14_224", img_size=28, patch_size=7, depth=2)}


@pytest.mark.parametrize("kind", ["cls", "registers", "eva02_rope"])
def test_corruption_is_applied_before_position_embeddings(kind):
    """The tokens entering the blocks are: the patch embedding, or the [mask] embedding, or another
    patch's embedding, plus the position embedding of the token's OWN position."""
    model = MPP(create_encoder(**PLACEMENT[kind])).eval()
    enc = model.encoder
    with torch.no_grad():
        model.mask_token.fill_(3.0)  # a recognisable signal
    seen = {}
    enc.patch_embed.register_forward_hook(lambda _m, _a, out: seen.setdefault("patches", out))
    enc.norm_pre.register_forward_pre_hook(lambda _m, args: seen.setdefault("blocks_in", args[0]))
    B, N = 3, model.num_patches
    c = sample_corruption(B, N, 0.5, (0.5, 0.3, 0.2))
    with torch.no_grad():
        model(torch.rand(B, 3, *enc.patch_embed.img_size), c)
    D = seen["patches"].shape[-1]
    patches = seen["patches"].reshape(B, N, D)  # (B, N, D) also from an NHWC patch embedding
    expected = patches.clone()
    for b in range(B):
        for k in range(c.ids.shape[1]):
            i, kind_, src = c.ids[b, k].item(), c.kind[b, k].item(), c.source[b, k].item()
            if kind_ == 0:
                expected[b, i] = 3.0
            elif kind_ == 1:
                expected[b, i] = patches.reshape(B * N, D)[src]
    expected = expected + enc.pos_embed[:, -N:]  # the last N rows belong to the patches in every layout
    assert torch.allclose(seen["blocks_in"][:, -N:], expected, atol=1e-6)


@pytest.mark.parametrize("kind", ["cls", "no_cls_avg", "eva02_rope"])
def test_predictions_are_read_from_exactly_the_corrupted_tokens(kind):
    model = MPP(create_encoder(**PLACEMENT[kind])).eval()
    enc = model.encoder
    seen = {}
    enc.norm.register_forward_hook(lambda _m, _a, out: seen.setdefault("tokens", out))
    model.head.register_forward_pre_hook(lambda _m, args: seen.setdefault("head_in", args[0]))
    size = enc.patch_embed.img_size[0]
    c = sample_corruption(3, model.num_patches, 0.5, (0.8, 0.1, 0.1))
    with torch.no_grad():
        model(torch.rand(3, 3, size, size), c)
    patch_tokens = seen["tokens"][:, enc.num_prefix_tokens :]  # (B, N, D)
    for b in range(3):
        assert torch.equal(seen["head_in"][b], patch_tokens[b, c.ids[b]])


@pytest.mark.slow
def test_a_compiled_mpp_matches_eager_and_takes_a_second_batch_size():
    # torch.compile: the same loss as eager on the same corruption; a second batch size recompiles with a
    # dynamic batch dimension, through which the corruption is still drawn (a last, shorter batch; another run)
    torch.manual_seed(0)
    objective = MPP("test_vit", img_size=32, patch_size=8)
    compiled = torch.compile(objective)
    for batch in (4, 3):
        images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
        drawn = compiled(images)  # the corruption drawn inside the compiled graph
        assert drawn.corruption.ids.shape == (batch, 8)
        torch.testing.assert_close(drawn.loss, objective(images, drawn.corruption).loss, rtol=1e-4, atol=1e-5)
