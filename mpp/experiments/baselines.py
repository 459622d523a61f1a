"""The floors every result is read against, computed on the same images as the probes and fine-tunings.

A pretrained encoder that does not beat the raw pixels has learnt nothing a classifier could not read
off the input; a metric on which no encoder beats a random one cannot show a difference at all.
"""

import torch
import torch.nn.functional as F

from mpp.evaluation.probes import few_shot_accuracy, knn_accuracy


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """(M, 3, H, W) uint8 -> (M, 3*H*W) float32 in [0, 1]: the raw pixels as features."""
    return images.reshape(len(images), -1).float() / 255


def majority_accuracy(train_labels: torch.Tensor, test_labels: torch.Tensor) -> float:
    """Test accuracy of always answering the most frequent training class."""
    majority = int(torch.bincount(train_labels.long()).argmax())
    return float((test_labels == majority).double().mean())


def pixel_baselines(
    train_images, train_labels, test_images, test_labels, shots=(5, 10), draws: int = 5, seed: int = 0
) -> dict:
    """{'majority', 'pixels_knn1', 'pixels_knn20', 'pixels_linear_{n}shot'}: the floors on a test split, with
    the probes' own k-NN (cosine) and few-shot linear code."""
    train_x, test_x = pixel_features(train_images), pixel_features(test_images)
    report = {
        "majority": majority_accuracy(train_labels, test_labels),
        "pixels_knn1": knn_accuracy(train_x, train_labels, test_x, test_labels, k=1),
        "pixels_knn20": knn_accuracy(train_x, train_labels, test_x, test_labels, k=20),
    }
    for n in shots:
        report[f"pixels_linear_{n}shot"] = few_shot_accuracy(
            train_x, train_labels, test_x, test_labels, n, draws, seed
        )[0]
    return report


def near_twins(reference: torch.Tensor, queries: torch.Tensor, threshold: float = 0.98, batch: int = 1024) -> int:
    """How many query images (M, 3, H, W) have a reference image whose pixels correlate above `threshold`
    with theirs, as they are or mirrored: an independent check that no held-out image has a copy in the
    training images."""

    def standardised(x):
        x = pixel_features(x)
        return F.normalize(x - x.mean(1, keepdim=True), dim=1)

    ref = torch.cat([standardised(reference), standardised(reference.flip(-1))])  # (2R, D)
    q = standardised(queries)
    best = torch.cat([(q[i : i + batch] @ ref.T).max(1).values for i in range(0, len(q), batch)])
    return int((best > threshold).sum())
