"""The DataLoader of a map-style training set: seeded full batches per epoch, one stream across epochs.

Starting worker processes anew at every epoch cost a GPU run ~half its throughput for the first
batches of each epoch (measured on an H200: 1,300 img/s against 3,000). Persistent workers
alone do not remove the dip: at every epoch the loader's iterator is reset and the first batch waits
for one worker to build all of it (an H100 run with 20-step epochs still lost ~0.35 s at every epoch
start, benchmarks/results/bench_loop_cuda.md). So EpochBatches runs on from one epoch into the next
within one iteration, and the training loop takes each epoch's batches from that one stream: the
workers are already building the next epoch's first batches while this epoch's last ones train.
Each index carries its epoch, so the augmentation seeds (data.sample_seed) follow it exactly as with
an iterator per epoch; a resume skips into the stream as before.
"""

import atexit
import multiprocessing
import multiprocessing.util  # registers its exit hook now, before ours (atexit runs the last first)
import os
import signal
from pathlib import Path

import torch
from accelerate import PartialState


class EpochBatches(torch.utils.data.Sampler):
    """Batches of (epoch, index) pairs: each epoch a seeded random order (depending on seed and epoch
    only) cut into full batches, the count rounded down to a multiple of `processes` so that
    accelerate's round-robin dealing gives every process whole epochs. From set_epoch(e), one
    iteration runs through epochs e, e+1, ... (span) or through epoch e alone (span False: the loop
    needs an end per epoch when gradient accumulation does not divide it). len(): batches per epoch."""

    def __init__(self, length: int, batch_size: int, seed: int, processes: int = 1, span: bool = True):
        self.length, self.batch_size, self.seed, self.processes, self.span = length, batch_size, seed, processes, span
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length // self.batch_size // self.processes * self.processes

    def epoch_order(self, epoch: int) -> list[int]:
        return torch.randperm(
            self.length, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        ).tolist()

    def __iter__(self):
        epoch = self.epoch
        while True:
            order = self.epoch_order(epoch)
            for b in range(len(self)):
                yield [(epoch, i) for i in order[b * self.batch_size : (b + 1) * self.batch_size]]
            if not self.span:
                return
            epoch += 1


def leave_stop_signals_to_main(worker_id: int) -> None:
    """worker_init_fn of every DataLoader the package builds: SIGTERM and SIGINT are the training
    process's to act on (it finishes its step, checkpoints and exits 75). A launcher or scheduler that
    signals a whole process group (torchrun's os.killpg, SLURM, Ctrl-C in a terminal) reaches the
    workers too; a worker killed by it makes torch's SIGCHLD handler raise in the training process
    before the loop can checkpoint. The workers still end with the training process (torch's watchdog
    sees it gone; SIGKILL still kills them). torch seeds a worker before this runs, and this draws nothing."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def kill_workers_left_at_exit() -> None:
    """At interpreter exit multiprocessing stops its daemonic children with SIGTERM, which these workers ignore,
    and then waits for them: an exit that skipped a loader's shutdown (an exception still holding its iterator)
    would wait forever. Such a child gets SIGKILL instead, the only signal it still obeys. Registered after
    multiprocessing's own exit hook, so it runs first (atexit runs the last registered first)."""
    stuck = [child for child in multiprocessing.active_children() if child.daemon and ignores_sigterm(child.pid)]
    if stuck:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report these kills as worker failures
        for child in stuck:
            child.kill()


def ignores_sigterm(pid: int) -> bool:
    """Whether process pid ignores SIGTERM (Linux's /proc/PID/status SigIgn mask; False where it cannot be read)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    ignored = next((line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), "0")
    return bool(int(ignored, 16) >> (signal.SIGTERM - 1) & 1)


atexit.register(kill_workers_left_at_exit)


def training_loader(
    images, batch_size: int, seed: int, workers: int, device: torch.device, collate_fn, processes: int = 1
) -> torch.utils.data.DataLoader:
    """Shuffled full batches (static shapes: every step sees a full batch) of a map-style dataset whose
    __getitems__ takes (epoch, index) pairs (data.AugmentedImages); loader.batch_sampler is the EpochBatches."""
    return torch.utils.data.DataLoader(
        images,
        batch_sampler=EpochBatches(len(images), batch_size, seed, processes),
        collate_fn=collate_fn,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        worker_init_fn=leave_stop_signals_to_main,
        # its own generator (for the workers' base seed), so that creating an iterator (e.g. on resume)
        # never draws from the global RNG that the corruption draws from
        generator=torch.Generator().manual_seed(seed),
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
