"""Frozen-feature evaluation: the paper's few-shot linear probe (§4.1) and k-NN, on two readouts of the tokens."""

import numpy as np
import torch
import torch.nn.functional as F

from mpp.errors import UsageError

READOUTS = ("cls", "mean")


def has_class_token(encoder) -> bool:
    return getattr(encoder, "cls_token", None) is not None


def describe_readouts(encoder) -> dict[str, str]:
    """What each readout of `extract_features` is for this encoder, in words (for reports)."""
    prefix = encoder.num_prefix_tokens
    if has_class_token(encoder):
        normed = (
            "after the final norm"
            if not isinstance(encoder.norm, torch.nn.Identity)
            else "the model has no norm on its tokens"
        )
        cls = f"class token of forward_features ({normed})"
    else:
        cls = f"timm's pooled pre-logits (global_pool {encoder.global_pool!r}; the model has no class token)"
    return {"cls": cls, "mean": f"mean of the patch tokens of forward_features, {prefix} prefix token(s) excluded"}


@torch.no_grad()
def extract_features(encoder, images: torch.Tensor, mean, std, batch_size: int = 512) -> dict[str, torch.Tensor]:
    """images (M, 3, H, W) uint8 -> {readout: (M, D) float32} for the readouts `cls` and `mean`.

    MPP never trains the class token's output, so a probe of it alone can hide what the patch
    tokens learned: both are read from one forward pass (see describe_readouts).
    """
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=device).view(1, -1, 1, 1)
    prefix = encoder.num_prefix_tokens
    out = {name: [] for name in READOUTS}
    for i in range(0, len(images), batch_size):
        x = (images[i : i + batch_size].to(device).float() / 255 - mean) / std
        tokens = encoder.forward_features(x)  # (b, prefix + N, D)
        cls = tokens[:, 0] if has_class_token(encoder) else encoder.forward_head(tokens, pre_logits=True)
        out["cls"].append(cls.float().cpu())  # (b, D)
        out["mean"].append(tokens[:, prefix:].mean(1).float().cpu())  # (b, D)
    encoder.train(was_training)
    return {name: torch.cat(chunks) for name, chunks in out.items()}


def fit_least_squares(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float) -> torch.Tensor:
    """Regularised least squares from features to {-1, 1}^K targets, in closed form.

    x (M, D), y (M,) -> W (D + 1, K), bias in the last row: W = (X^T X + l2 I)^-1 X^T T with the
    bias column of X unregularised.
    """
    x = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)  # (M, D + 1)
    targets = 2 * F.one_hot(y.long(), num_classes).double() - 1  # (M, K) in {-1, 1}
    reg = l2 * torch.eye(x.shape[1], dtype=torch.float64)
    reg[-1, -1] = 0
    return torch.linalg.solve(x.T @ x + reg, x.T @ targets)


def predict_least_squares(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1) @ w).argmax(1)


def few_shot_accuracy(
    train_x, train_y, test_x, test_y, shots: int, draws: int = 5, seed: int = 0, l2: float = 1.0
) -> tuple[float, float]:
    """Mean and std of test accuracy over `draws` random draws of `shots` training examples per class."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    counts = torch.bincount(train_y.long(), minlength=num_classes)
    present = counts[counts > 0]
    if shots > int(present.min()):
        raise UsageError(f"{shots} shots asked, but the smallest class has {int(present.min())} labelled examples")
    # standardise with the statistics of all training features (unlabelled use of them)
    mu, sigma = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mu) / sigma, (test_x - mu) / sigma
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(draws):
        picked = np.concatenate(
            [
                rng.choice(np.flatnonzero(train_y.numpy() == c), shots, replace=False)
                for c in range(num_classes)
                if counts[c] > 0
            ]
        )
        w = fit_least_squares(train_x[picked], train_y[picked], num_classes, l2)
        scores.append((predict_least_squares(w, test_x) == test_y).double().mean().item())
    return float(np.mean(scores)), float(np.std(scores))


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 20, batch_size: int = 1024) -> float:
    """k-nearest-neighbour accuracy with cosine similarity; majority vote, ties to the closer class."""
    train_n = F.normalize(train_x.float(), dim=1)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train_x))
    correct = 0
    for i in range(0, len(test_x), batch_size):
        sims = F.normalize(test_x[i : i + batch_size].float(), dim=1) @ train_n.T  # (b, M)
        top_sim, top_idx = sims.topk(k, dim=1)  # (b, k)
        votes = torch.zeros(len(sims), num_classes).scatter_add_(1, train_y[top_idx].long(), torch.ones_like(top_sim))
        votes += 1e-3 * torch.zeros_like(votes).scatter_add_(1, train_y[top_idx].long(), top_sim)  # tie break
        correct += (votes.argmax(1) == test_y[i : i + batch_size]).sum().item()
    return correct / len(test_x)


def frozen_feature_report(
    encoder,
    train_images,
    train_labels,
    test_images,
    test_labels,
    mean,
    std,
    shots=(1, 5, 10, 25),
    draws: int = 5,
    seed: int = 0,
) -> dict:
    """k-NN (k=20) and few-shot linear accuracies of an encoder's frozen features, per readout:
    keys knn20_cls, knn20_mean, linear_5shot_cls, linear_5shot_cls_std (over draws), ..."""
    train = extract_features(encoder, train_images, mean, std)
    test = extract_features(encoder, test_images, mean, std)
    report = {}
    for name in READOUTS:
        report[f"knn20_{name}"] = knn_accuracy(train[name], train_labels, test[name], test_labels)
        for n in shots:
            acc, spread = few_shot_accuracy(train[name], train_labels, test[name], test_labels, n, draws, seed)
            report[f"linear_{n}shot_{name}"], report[f"linear_{n}shot_{name}_std"] = acc, spread
    return report
