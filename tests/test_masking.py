import pytest
import torch

from mpp.models.masking import (
    MASK_TOKEN,
    RANDOM_PATCH,
    UNCHANGED,
    apply_corruption,
    corrupted_mask,
    num_corrupted,
    sample_corruption,
)


@pytest.mark.parametrize(
    "N,ratio,expected", [(196, 0.5, 98), (16, 0.5, 8), (49, 0.5, 24), (49, 0.75, 37), (4, 0.01, 1)]
)
def test_exact_count_per_image(N, ratio, expected):
    c = sample_corruption(64, N, ratio, (0.8, 0.1, 0.1))
    assert num_corrupted(N, ratio) == expected
    assert (corrupted_mask(c, N).sum(1) == expected).all()
    # ids are distinct in every row
    assert all(len(set(row.tolist())) == expected for row in c.ids)


def test_split_80_10_10_over_many_draws():
    c = sample_corruption(512, 196, 0.5, (0.8, 0.1, 0.1))
    kinds = c.kind.flatten()
    n = kinds.numel()  # 50,176 corrupted tokens: binomial std <= 0.0018, tolerance 0.01 is > 5 std
    for code, p in [(MASK_TOKEN, 0.8), (RANDOM_PATCH, 0.1), (UNCHANGED, 0.1)]:
        assert abs((kinds == code).sum().item() / n - p) < 0.01


def test_every_position_equally_likely():
    c = sample_corruption(4000, 16, 0.5, (0.8, 0.1, 0.1))
    freq = corrupted_mask(c, 16).float().mean(0)  # each ~0.5, std 0.008
    assert (freq - 0.5).abs().max() < 0.04


@pytest.mark.parametrize("random_from", ["batch", "image"])
def test_apply_corruption_token_by_token(random_from):
    B, N, D = 6, 16, 8
    tokens = torch.randn(B, N, D)
    mask_token = torch.randn(D)
    c = sample_corruption(B, N, 0.5, (0.5, 0.3, 0.2), random_from=random_from)
    out = apply_corruption(tokens, c, mask_token)
    corrupted = corrupted_mask(c, N)
    flat = tokens.reshape(B * N, D)
    # untouched tokens are bit-identical
    assert torch.equal(out[~corrupted], tokens[~corrupted])
    for b in range(B):
        for k in range(c.ids.shape[1]):
            i, kind, src = c.ids[b, k].item(), c.kind[b, k].item(), c.source[b, k].item()
            if kind == MASK_TOKEN:
                assert torch.equal(out[b, i], mask_token)
            elif kind == UNCHANGED:
                assert torch.equal(out[b, i], tokens[b, i])
            else:  # an original embedding of some *other* patch
                assert src != b * N + i
                assert torch.equal(out[b, i], flat[src])
                if random_from == "image":
                    assert src // N == b


def test_random_replacement_draws_from_the_whole_batch():
    c = sample_corruption(64, 16, 0.5, (0.0, 1.0, 0.0))
    rows = c.source // 16
    own = torch.arange(64).unsqueeze(1)
    assert (rows != own).float().mean() > 0.9  # 63 of 64 rows are other images


def test_gradient_reaches_mask_token_and_tokens():
    tokens = torch.randn(2, 16, 4, requires_grad=True)
    mask_token = torch.zeros(4, requires_grad=True)
    c = sample_corruption(2, 16, 0.5, (0.8, 0.1, 0.1))
    apply_corruption(tokens, c, mask_token).sum().backward()
    assert mask_token.grad.abs().sum() > 0 and tokens.grad.abs().sum() > 0


def test_an_unknown_random_from_is_refused():
    with pytest.raises(ValueError, match="random_from must be 'batch' or 'image', got 'same'"):
        sample_corruption(2, 16, 0.5, (0.8, 0.1, 0.1), random_from="same")
