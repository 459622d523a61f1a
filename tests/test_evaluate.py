import numpy as np
import pytest
import torch

from mpp.errors import UsageError
from mpp.evaluate import few_shot_accuracy, fit_least_squares, knn_accuracy, predict_least_squares


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
