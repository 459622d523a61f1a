"""The DataLoader of a map-style training set: a seeded shuffle per epoch, workers that live across epochs.

Starting worker processes anew at every epoch cost a GPU run ~half its throughput for the first
batches of each epoch (../shared/FACTS.md: 1,300 img/s against 3,000 on an H200). Persistent workers
keep the copy of the dataset they were given at the first epoch, so the epoch cannot reach them
through the dataset: EpochSampler sends it along with every index instead, and the augmentation
seeds (data.sample_seed) follow it exactly as they did with fresh workers; a resume is unchanged.
"""
import os

import torch
from accelerate import PartialState


class EpochSampler(torch.utils.data.Sampler):
    """(epoch, index) pairs in a seeded random order per epoch (the order depends on seed and epoch
    only). accelerate's prepared loader calls set_epoch (DataLoaderShard.set_epoch finds it)."""

    def __init__(self, length: int, seed: int):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))
        return ((self.epoch, i) for i in order.tolist())


def training_loader(images, batch_size: int, seed: int, workers: int, device: torch.device, collate_fn) -> torch.utils.data.DataLoader:
    """Shuffled full batches (static shapes: every step sees a full batch) of a map-style dataset whose
    __getitems__ takes (epoch, index) pairs (data.AugmentedImages)."""
    return torch.utils.data.DataLoader(
        images,
        batch_size=batch_size,
        sampler=EpochSampler(len(images), seed),
        drop_last=True,
        collate_fn=collate_fn,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,  # the epoch travels with the indices (EpochSampler)
    )


def default_workers(device: torch.device) -> int:
    """No worker processes on small CPU machines (they would take cores from the step); else every core
    this process has but one, which the process itself needs (benchmarks/bench_data.py measures
    images/s per core: a compiled bf16 ViT-B/16 step on an H100/H200 eats ~3k img/s, several cores' worth)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cpu" and cores <= 4:
        return 0
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", PartialState().num_processes)))
    return max(1, per_process - 1)
