"""Streaming training sets: per-worker shards read in order, resumable at a recorded position."""

import itertools
from dataclasses import dataclass

import torch
from datasets import (
    IterableDataset,
)

from mpp.data.augment import augment_value, defer_value
from mpp.data.decode import image_name
from mpp.data.images import collate_images, sample_seed, seeded
from mpp.data.sources import prepare_columns
from mpp.errors import UsageError


@dataclass
class StreamPosition:
    """How far a streaming run got into an epoch: the batches each DataLoader worker had delivered
    (each worker reads its own shards of the stream) and the worker whose batch comes next."""

    epoch: int = 0
    worker_batches: tuple[int, ...] = (0,)
    next_worker: int = 0

    @classmethod
    def of_run(cls, state: dict, workers: int) -> "StreamPosition":
        """From a checkpoint's trainer state, for a loader with `workers` workers (0: the main process)."""
        n = max(1, workers)
        counts = state.get("stream_worker_batches")
        if counts is None:  # older checkpoints: the DataLoader's round robin over workers that all had batches left
            b = state["batches_in_epoch"]
            return cls(state["epoch"], tuple(b // n + (w < b % n) for w in range(n)), b % n)
        if len(counts) != n and sum(counts):
            raise UsageError(
                f"--workers {workers}: this streaming run was checkpointed with "
                f"{len(counts) if len(counts) > 1 else 0} "
                f"loader workers, and each reads its own part of the stream; resume it with that many"
            )
        return cls(state["epoch"], tuple(counts) if len(counts) == n else (0,) * n, state.get("stream_next_worker", 0))


class StreamGap:
    """A placeholder item: see AugmentedStream.__iter__."""


class AugmentedStream(torch.utils.data.IterableDataset):
    """The streaming twin of AugmentedImages over a datasets.IterableDataset (already split by node).

    A resumed run reads exactly what the uninterrupted one would have read: in the resumed epoch each
    worker re-reads its share of the shuffled stream (the epoch's shuffle is kept) and drops the
    examples it had delivered. The DataLoader takes one batch from each worker in turn, starting at
    worker 0; workers before `next_worker` first yield one batch of StreamGap placeholders, which
    StreamLoader drops, so the turn order continues where it stopped.
    """

    def __init__(
        self,
        ds: IterableDataset,
        image_column: str,
        transform,
        seed: int,
        rank: int = 0,
        batch_size: int = 1,
        resume: StreamPosition | None = None,
        defer: bool = False,
    ):
        self.ds = prepare_columns(ds, image_column)
        self.column = image_column
        self.transform = transform
        self.seed = seed
        self.rank = rank
        self.batch_size = batch_size
        self.resume = resume or StreamPosition()
        self.defer = defer
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.ds.set_epoch(epoch)

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        wid = worker.id if worker else 0
        consumed = 0
        if self.epoch == self.resume.epoch and any(self.resume.worker_batches):
            consumed = self.resume.worker_batches[wid] * self.batch_size
            if wid < self.resume.next_worker:
                yield from [StreamGap()] * self.batch_size
        seed = self.seed * 1009 + self.rank * 101 + wid
        # iterating self.ds in a worker reads that worker's shards only (datasets splits them)
        augment = defer_value if self.defer else augment_value
        for j, row in itertools.islice(enumerate(self.ds), consumed, None):  # skipped rows are read, not decoded
            value = row[self.column]
            yield seeded(
                lambda v, j=j: augment(v, self.transform, image_name(v, j)),
                value,
                sample_seed(seed, self.epoch, j),
            )

    @staticmethod
    def collate(items: list) -> dict:
        """collate_images' Batch plus "worker", which worker made it (or a gap batch of placeholders);
        StreamLoader takes "worker" off again."""
        worker = torch.utils.data.get_worker_info()
        wid = worker.id if worker else 0
        if isinstance(items[0], StreamGap):
            return {"gap": True, "worker": wid}
        return {**collate_images(items), "worker": wid}


class StreamLoader:
    """A DataLoader over an AugmentedStream that drops gap batches and counts each worker's batches,
    for the checkpoint (position())."""

    def __init__(self, loader: torch.utils.data.DataLoader, resume: StreamPosition):
        self.loader = loader
        self.resume = resume
        self.workers = max(1, loader.num_workers)
        self.worker_batches, self.next_worker = [0] * self.workers, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.resume.epoch and any(self.resume.worker_batches):
            self.worker_batches, self.next_worker = list(self.resume.worker_batches), self.resume.next_worker
        else:
            self.worker_batches, self.next_worker = [0] * self.workers, 0

    def __iter__(self):
        for batch in self.loader:
            worker = batch.pop("worker")
            if batch.get("gap"):
                continue
            self.worker_batches[worker] += 1
            self.next_worker = (worker + 1) % self.workers
            yield batch

    def position(self) -> dict:
        return {"stream_worker_batches": list(self.worker_batches), "stream_next_worker": self.next_worker}
