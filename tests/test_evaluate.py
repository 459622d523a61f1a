import numpy as np
import pytest
import torch

from mpp.errors import UsageError
from mpp.evaluation.probes import few_shot_accuracy, fit_least_squares, knn_accuracy, predict_least_squares


def test_least_squares_matches_numpy_lstsq():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 7))
    y = rng.integers(0, 4, 60)
    w = fit_least_squares(torch.tensor(x), torch.tensor(y), num_classes=4, l2=0.0).numpy()
    targets = 2 * np.eye(4)[y] - 1
    ref, *_ = np.linalg.lstsq(np.hstack([x, np.ones((60, 1))]), targets, rcond=None)
    assert np.allclose(w, ref, atol=1e-8)


def test_ridge_matches_the_normal_equations_by_hand():
    rng = np.random.default_rng(1)
    x, y, l2 = rng.normal(size=(30, 5)), rng.integers(0, 3, 30), 2.5
    xb = np.hstack([x, np.ones((30, 1))])
    reg = l2 * np.eye(6)
    reg[-1, -1] = 0  # the bias is not regularised
    ref = np.linalg.inv(xb.T @ xb + reg) @ xb.T @ (2 * np.eye(3)[y] - 1)
    assert np.allclose(fit_least_squares(torch.tensor(x), torch.tensor(y), 3, l2).numpy(), ref, atol=1e-8)


def test_knn_on_separable_clusters_is_perfect():
    rng = np.random.default_rng(2)
    centres = np.eye(5) * 10
    train_y = np.repeat(np.arange(5), 30)
    test_y = np.repeat(np.arange(5), 10)
    train_x = centres[train_y] + rng.normal(size=(150, 5))
    test_x = centres[test_y] + rng.normal(size=(50, 5))
    acc = knn_accuracy(torch.tensor(train_x), torch.tensor(train_y), torch.tensor(test_x), torch.tensor(test_y), k=20)
    assert acc == 1.0


def test_few_shot_on_separable_data_and_too_many_shots():
    rng = np.random.default_rng(3)
    train_y, test_y = np.repeat(np.arange(3), 20), np.repeat(np.arange(3), 10)
    train_x = np.eye(3)[train_y] * 5 + rng.normal(size=(60, 3)) * 0.3
    test_x = np.eye(3)[test_y] * 5 + rng.normal(size=(30, 3)) * 0.3
    args = (torch.tensor(train_x), torch.tensor(train_y), torch.tensor(test_x), torch.tensor(test_y))
    mean, std = few_shot_accuracy(*args, shots=5, draws=3)
    assert mean == 1.0 and std == 0.0
    with pytest.raises(UsageError, match="25 shots asked, but the smallest class has 20"):
        few_shot_accuracy(*args, shots=25)


def test_predict_uses_the_bias_row():
    w = torch.zeros(3, 2, dtype=torch.float64)
    w[-1] = torch.tensor([0.0, 1.0])  # bias only: always class 1
    assert predict_least_squares(w, torch.randn(4, 2)).tolist() == [1, 1, 1, 1]


def at_angles(degrees, norm=1.0) -> torch.Tensor:
    """2-d points at these angles (degrees) and this length: (M, 2)."""
    rad = np.radians(np.asarray(degrees, dtype=np.float64))
    return torch.tensor(np.stack([np.cos(rad), np.sin(rad)], 1) * norm)


def test_knn_uses_cosine_not_dot_product():
    """Class 0 points the test point's way with length 1, class 1 30 degrees off with length 10: by
    cosine the 20 nearest are class 0, by dot product (length counts) class 1."""
    train_x = torch.cat([at_angles(np.linspace(0, 5, 20)), at_angles(np.full(20, 40.0), norm=10.0)])
    train_y = torch.tensor([0] * 20 + [1] * 20)
    test_x = at_angles([10.0])
    assert (test_x @ train_x.T).argmax() >= 20  # dot product would pick class 1
    assert knn_accuracy(train_x, train_y, test_x, torch.tensor([0]), k=20) == 1.0
    assert knn_accuracy(train_x, train_y, test_x, torch.tensor([0])) == 1.0  # k=20 by default


def test_knn_votes_over_k_neighbours():
    """The single nearest neighbour is class 0, the next 19 are class 1: k=20 says 1, k=1 says 0."""
    train_x = torch.cat([at_angles([10.0]), at_angles(np.linspace(12, 14, 19)), at_angles(np.linspace(80, 90, 20))])
    train_y = torch.tensor([0] + [1] * 19 + [0] * 20)  # class 0 also has 20 far-away points: it is not rare
    test_x = at_angles([10.0])
    assert knn_accuracy(train_x, train_y, test_x, torch.tensor([1]), k=20) == 1.0
    assert knn_accuracy(train_x, train_y, test_x, torch.tensor([1])) == 1.0  # the default is 20
    assert knn_accuracy(train_x, train_y, test_x, torch.tensor([0]), k=1) == 1.0


def numpy_knn(train_x, train_y, test_x, k, similarity):
    """Reference k-NN: majority of the k most similar, ties to the class with the larger summed similarity."""
    sims = similarity(test_x, train_x)  # (T, M)
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    predictions = []
    for row, idx in zip(sims, top):
        classes = train_y[idx]
        votes = np.bincount(classes, minlength=train_y.max() + 1).astype(float)
        votes += 1e-3 * np.bincount(classes, weights=row[idx], minlength=train_y.max() + 1)
        predictions.append(votes.argmax())
    return np.array(predictions)


def test_knn_matches_a_numpy_reference_on_overlapping_classes():
    """Overlapping classes, features of very different lengths: knn_accuracy equals cosine 20-NN by
    numpy, and on this data dot product or k=1 would give other numbers."""
    rng = np.random.default_rng(4)
    train_y, test_y = rng.integers(0, 4, 400), rng.integers(0, 4, 200)
    centres = rng.normal(size=(4, 8))
    train_x = (centres[train_y] + 1.5 * rng.normal(size=(400, 8))) * rng.uniform(0.1, 10, (400, 1))
    test_x = (centres[test_y] + 1.5 * rng.normal(size=(200, 8))) * rng.uniform(0.1, 10, (200, 1))
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    cosine = lambda a, b: unit(a) @ unit(b).T  # noqa: E731
    dot = lambda a, b: a @ b.T  # noqa: E731
    reference = (numpy_knn(train_x, train_y, test_x, 20, cosine) == test_y).mean()
    assert reference != (numpy_knn(train_x, train_y, test_x, 20, dot) == test_y).mean()
    assert reference != (numpy_knn(train_x, train_y, test_x, 1, cosine) == test_y).mean()
    got = knn_accuracy(torch.tensor(train_x), torch.tensor(train_y), torch.tensor(test_x), torch.tensor(test_y))
    assert got == pytest.approx(reference, abs=1e-12)
