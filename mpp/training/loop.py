"""The accelerate training loop both recipes run: steps, logging windows, checkpoints and stops, in a fixed order
(the order of RNG draws and barriers is what makes a resume bit-identical).
"""

import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mpp.data.batch import Batch
from mpp.training.checkpoint import (
    latest_checkpoint,
    save_checkpoint,
)
from mpp.training.guards import BadDataError, NonFiniteGuard, StopSignals
from mpp.training.records import count_all, gather_lists
from mpp.training.run_setup import Run, write_record
from mpp.training.schedule import short_accumulation_scale
from mpp.training.terminal import CtrlCForTheLoop
from mpp.training.xla import (
    seed_micro_batch,
)


@dataclass
class LoopSettings:
    """What fit needs to know besides the model, optimiser and data: length, schedule, logging, checkpoints,
    stops, and the hooks a recipe plugs in."""

    total_steps: int
    lr_at: Callable[[int], float]  # optimiser step -> learning rate
    clip_grad: float
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int
    batch_size: int
    streaming: bool = False
    progress: bool = True
    desc: str = "train"
    metric: str = "acc"  # name of the second number step_fn returns
    max_nonfinite: int = 5  # consecutive optimiser steps with a non-finite gradient before giving up; 0: no check
    strict_data: bool = False  # an unreadable image stops the run instead of being skipped
    clock: Callable[[], float] = time.perf_counter  # seconds; tests pass a deterministic one
    prepare_batch: Callable[[Batch], Batch] | None = (
        None  # e.g. decoding on the device (--decode gpu), before the batch is counted
    )
    seed: int = 0  # on XLA, each micro-batch's device RNG seed derives from it (xla.seed_micro_batch)


@dataclass
class LoopResult:
    """What fit ends with: the step reached, unreadable images over all processes, skipped steps and the signal
    that stopped it early, if any."""

    step: int
    bad_images: int  # over all processes
    bad_examples: list = field(default_factory=list)  # (name, reason), the first few
    skipped_steps: int = 0  # optimiser steps skipped for a non-finite gradient
    stopped_by: str | None = None  # "SIGTERM" / "SIGINT" when the run was asked to stop early


class WaitClock:
    """Seconds spent waiting for the data loader to hand over the next batch (data-bound or not)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.seconds = 0.0

    def timed(self, batches):
        it = iter(batches)
        while True:
            start = self.clock()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.seconds += self.clock() - start
            yield batch


def fit(
    run: Run,
    model,
    optimizer,
    loader,
    images,
    step_fn: Callable,
    s: LoopSettings,
    on_epoch_end: Callable[[int, int], dict] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> LoopResult:
    """Train until s.total_steps optimiser steps, resuming at run.state; every process calls this.

    step_fn(model, batch) -> (loss, metric) scalar tensors. on_epoch_end(epoch, step) -> extra
    numbers to log (e.g. held-out accuracy), called on every process after each full epoch.
    on_step(step) runs on every process after each optimiser step (e.g. to log pictures).
    """
    with CtrlCForTheLoop(), StopSignals() as signals:
        return _fit(run, model, optimizer, loader, images, step_fn, s, on_epoch_end, on_step, signals)


def _fit(run, model, optimizer, loader, images, step_fn, s, on_epoch_end, on_step, signals: StopSignals) -> LoopResult:
    loop = TrainingLoop(run, model, optimizer, loader, images, step_fn, s, on_epoch_end, on_step, signals)
    loop.train()
    return loop.finish()


@dataclass
class LoopState:
    """What the loop's steps change as it runs; step, epoch, batches_in_epoch and the counts start from a
    resumed run's trainer state and go into each checkpoint."""

    step: int  # optimiser steps done
    epoch: int
    batches_in_epoch: int  # micro-batches of this epoch taken on this process
    bad_total: int  # unreadable images over all processes, as of the last count
    window: torch.Tensor  # (4,) sums since the last log: loss, metric, micro-batches, stop requests
    window_start: float  # s.clock() when the window opened
    waiting: WaitClock  # seconds of this window spent waiting for the loader
    guard: NonFiniteGuard | None  # None: accelerate's GradScaler skips non-finite steps, or the check is off
    skipped_before: int  # skipped_steps of the resumed run, kept as it is when the guard is off
    # resumed at an epoch's end whose evaluation was logged after the checkpoint: evaluated again, not logged twice
    epoch_end_logged: bool
    bad_new: int = 0  # this process's unreadable images since the last count
    bad_examples: list = field(default_factory=list)  # this process's (name, reason), the first 10
    window_images: int = 0  # images this process trained on in this window
    lr: float = 0.0  # the learning rate last set
    stream: Iterator | None = None  # the one iterator across epochs, when the loop spans them (see TrainingLoop)
    stopped_by: str | None = None
    saved: Path | None = None  # the checkpoint saved last; None when none was (save_checkpoint's answer)

    @property
    def skipped_steps(self) -> int:
        return self.guard.skipped if self.guard else self.skipped_before


class TrainingLoop:
    """fit's steps over one LoopState: train_epoch runs micro-batches (train_micro_batch) and after each
    optimiser step logs a window (log_window), checkpoints and stops (after_optimiser_step); end_epoch
    closes an epoch. What is fixed for the whole run is set here, once."""

    def __init__(self, run, model, optimizer, loader, images, step_fn, s, on_epoch_end, on_step, signals):
        self.run, self.model, self.optimizer, self.loader, self.images = run, model, optimizer, loader, images
        self.step_fn, self.s, self.on_epoch_end, self.on_step, self.signals = step_fn, s, on_epoch_end, on_step, signals
        self.accelerator = accelerator = run.accelerator
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.progress = tqdm(
            total=s.total_steps,
            initial=run.state["step"],
            disable=not (accelerator.is_main_process and s.progress),
            desc=s.desc,
            dynamic_ncols=True,
        )
        # micro-batches per epoch on this process; a stream has no epoch end accelerate could see
        self.per_epoch = None if s.streaming else len(loader)
        # one iterator across epochs (loader.EpochBatches): the workers build the next epoch's first batches
        # while this epoch's last ones train. Not when an epoch ends in a short accumulation, which
        # accelerate closes at the end of each loader pass.
        self.sampler = None if s.streaming else epoch_batches_of(loader)
        self.spanning = self.sampler is not None and self.per_epoch % accelerator.gradient_accumulation_steps == 0
        if self.sampler is not None:
            self.sampler.span = self.spanning
        self.state = LoopState(
            step=run.state["step"],
            epoch=run.state["epoch"],
            batches_in_epoch=run.state["batches_in_epoch"],
            bad_total=run.state["bad_images"],
            window=torch.zeros(4, device=accelerator.device),
            window_start=s.clock(),
            waiting=WaitClock(s.clock),
            guard=self.nonfinite_guard(),
            skipped_before=run.state.get("skipped_steps", 0),
            epoch_end_logged=run.state.get("epoch_end_logged", False),
        )

    def nonfinite_guard(self) -> NonFiniteGuard | None:
        # fp16 on a GPU: accelerate's GradScaler skips overflowing steps itself (and must see every step).
        # fp16 on a CPU has no scaler (accelerate makes none there): the guard stays on.
        if self.accelerator.scaler is None and self.s.max_nonfinite > 0:
            skipped = self.run.state.get("skipped_steps", 0)
            return NonFiniteGuard(self.optimizer, self.s.max_nonfinite, skipped, self.accelerator.device)
        return None

    def train(self) -> None:
        """Epoch after epoch until s.total_steps optimiser steps, or a stop."""
        self.model.train()
        while self.state.step < self.s.total_steps:
            if not self.train_epoch():
                return  # done, or stopped early
            self.end_epoch()

    def train_epoch(self) -> bool:
        """The rest of this epoch's micro-batches; True when they ran out, False when the loop ends within it."""
        for batch in self.state.waiting.timed(self.epoch_batches()):
            if self.train_micro_batch(batch) and self.after_optimiser_step():
                return False
        return True

    def epoch_batches(self):
        """This epoch's micro-batches on this process, past the batches_in_epoch a resume already trained."""
        st, s, loader = self.state, self.s, self.loader
        self.images.set_epoch(st.epoch)
        if st.stream is None:
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(st.epoch)
            if self.sampler is not None:
                # accelerate's set_epoch does not reach it through a multi-process shard
                self.sampler.set_epoch(st.epoch)
            skip = st.batches_in_epoch and not s.streaming
            batches = self.accelerator.skip_first_batches(loader, st.batches_in_epoch) if skip else loader
            if not self.spanning:
                return batches
            st.stream = iter(batches)
        return itertools.islice(st.stream, self.per_epoch - st.batches_in_epoch)  # the rest of this epoch

    def train_micro_batch(self, batch: Batch) -> bool:
        """Forward, backward and (at the end of an accumulation) the optimiser step on one micro-batch;
        True when the optimiser stepped (or skipped a non-finite step)."""
        st, s, accelerator, optimizer = self.state, self.s, self.accelerator, self.optimizer
        st.batches_in_epoch += 1
        if s.prepare_batch is not None:
            batch = s.prepare_batch(batch)
        self.note_bad_images(batch["bad"])
        seed_micro_batch(accelerator.device, s.seed, accelerator.process_index, st.epoch, st.batches_in_epoch)
        with accelerator.accumulate(self.model):
            loss, metric = self.step_fn(self.model, batch)
            scale = short_accumulation_scale(
                st.batches_in_epoch, self.per_epoch, accelerator.gradient_accumulation_steps
            )
            accelerator.backward(loss * scale if scale != 1 else loss)
            step_allowed = True
            if accelerator.sync_gradients and (s.clip_grad > 0 or st.guard):
                norm = accelerator.clip_grad_norm_(self.params, s.clip_grad if s.clip_grad > 0 else math.inf)
                step_allowed = st.guard is None or st.guard.allows_step(norm)
            st.lr = s.lr_at(st.step)
            for group in optimizer.param_groups:
                # timm's layer decay stores a per-group scale
                group["lr"] = st.lr * group.get("lr_scale", 1.0)
            if step_allowed:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        st.window += torch.stack(
            [
                loss.detach().float(),
                metric.detach().float(),
                torch.ones((), device=st.window.device),
                torch.tensor(float(self.signals.received is not None), device=st.window.device),
            ]
        )
        st.window_images += batch["pixels"].shape[0]
        return accelerator.sync_gradients

    def note_bad_images(self, bad: list) -> None:
        """bad: the batch's (name, reason) pairs; counted, or (--strict-data) the end of the run."""
        st = self.state
        if not bad:
            return
        if self.s.strict_data:
            name, reason = bad[0]
            raise BadDataError(f"--strict-data: {name}: {reason} (in epoch {st.epoch}, before step {st.step + 1})")
        st.bad_new += len(bad)
        st.bad_examples = (st.bad_examples + bad)[:10]

    def after_optimiser_step(self) -> bool:
        """Count the step, log, checkpoint, stop; True when the loop ends here (stopped, or done)."""
        st, s = self.state, self.s
        st.step += 1
        self.progress.update(1)
        if self.on_step is not None:
            self.on_step(st.step)
        # a stop request: acted on at once by a single process, at the next log step by many (they must agree)
        stop_now = self.signals.received is not None and self.accelerator.num_processes == 1
        if st.step % s.log_every == 0 or st.step == s.total_steps:
            stop_asked = self.log_window()
            stop_now = stop_now or stop_asked
        if st.step % s.checkpoint_every == 0 or st.step == s.total_steps or stop_now:
            self.checkpoint()
        if stop_now:
            self.stop()
            return True
        return st.step >= s.total_steps

    def count_bad_images(self) -> None:
        """Add every process's new unreadable images to the total (a collective: all processes call it)."""
        st = self.state
        st.bad_total, st.bad_new = st.bad_total + count_all(self.accelerator, st.bad_new), 0

    def log_window(self) -> bool:
        """Write the window's means to the metrics and open a new window; True when a process was asked to stop."""
        st, s, accelerator = self.state, self.s, self.accelerator
        # the only host-device synchronisation besides the finiteness check: once per logging window
        loss_sum, metric_sum, n, stops = accelerator.reduce(st.window, "sum").tolist()
        self.count_bad_images()
        if st.guard:
            st.guard.check(st.step, self.run.run_dir, accelerator.print)
        elapsed = s.clock() - st.window_start
        record = {
            "step": st.step,
            "epoch": st.epoch,
            "loss": loss_sum / n,
            s.metric: metric_sum / n,
            "lr": st.lr,
            "images_per_sec": st.window_images * accelerator.num_processes / elapsed,
            "data_wait_share": st.waiting.seconds / elapsed,  # this process's; near 0: the loader keeps up
            "bad_images": st.bad_total,
            "skipped_steps": st.skipped_steps,
        }
        self.show(record)
        write_record(self.run, record)
        st.window.zero_()
        st.window_images, st.window_start, st.waiting.seconds = 0, s.clock(), 0.0
        return stops > 0

    def show(self, record: dict) -> None:
        """A logging window on the progress bar, or (no bar: logs, batch jobs) as one line."""
        s = self.s
        self.progress.set_postfix(
            loss=f"{record['loss']:.3f}",
            **{s.metric: f"{record[s.metric]:.3f}"},
            img_s=f"{record['images_per_sec']:.0f}",
        )
        if not s.progress:
            self.accelerator.print(
                f"step {record['step']}/{s.total_steps} loss {record['loss']:.4f} {s.metric} {record[s.metric]:.4f} "
                f"lr {record['lr']:.3g} {record['images_per_sec']:.0f} img/s",
                flush=True,
            )

    def checkpoint(self) -> None:
        """Save the run's state at this step (save_checkpoint's barriers: every process calls it)."""
        st = self.state
        self.count_bad_images()
        if st.guard:  # never checkpoint a run that is about to stop for non-finite gradients
            st.guard.check(st.step, self.run.run_dir, self.accelerator.print)
        trainer_state = {
            "step": st.step,
            "epoch": st.epoch,
            "batches_in_epoch": st.batches_in_epoch,
            "bad_images": st.bad_total,
            "skipped_steps": st.skipped_steps,
            "launch": self.run.launch,
            "metrics_records": self.run.records,
            **(self.loader.position() if hasattr(self.loader, "position") else {}),  # a stream's per-worker place
        }
        st.saved = save_checkpoint(self.accelerator, self.run.run_dir, trainer_state, self.s.keep_checkpoints)

    def stop(self) -> None:
        """Say why the run stops early and how to continue it (after the checkpoint at this step)."""
        st = self.state
        st.stopped_by = self.signals.received or "a signal to another process"
        self.accelerator.print(
            f"stopped by {st.stopped_by} after step {st.step}; "
            f"checkpoint {st.saved or latest_checkpoint(self.run.run_dir)}. "
            f"Continue with the same command plus --resume auto --output-dir {self.run.run_dir}"
        )

    def end_epoch(self) -> None:
        """An epoch's batches ran out: its evaluation (on_epoch_end), then the next epoch from its start."""
        st = self.state
        if self.on_epoch_end is not None:
            extra = self.on_epoch_end(st.epoch, st.step)
            if extra and not st.epoch_end_logged:
                write_record(self.run, {"step": st.step, "epoch": st.epoch, **extra})
            st.epoch_end_logged = False  # only a resume at this epoch's end can find it logged
            self.model.train()
        st.epoch, st.batches_in_epoch = st.epoch + 1, 0

    def finish(self) -> LoopResult:
        """Close the bar and gather every process's counts (collectives: every process calls it)."""
        st = self.state
        self.progress.close()
        all_examples = gather_lists(self.accelerator, st.bad_examples)
        # every way out of the loop passes the checkpoint step, where the guard was read last
        bad_images = st.bad_total + count_all(self.accelerator, st.bad_new)
        return LoopResult(st.step, bad_images, all_examples[:10], st.skipped_steps, st.stopped_by)


def epoch_batches_of(loader):
    """The loader.EpochBatches inside a (prepared, possibly sharded) DataLoader, or None."""
    from mpp.data.loader import EpochBatches

    found = getattr(loader, "batch_sampler", None)
    while found is not None and not isinstance(found, EpochBatches):
        found = getattr(found, "batch_sampler", None)
    return found


def write_summary(run: Run, result: LoopResult, extra: dict | None = None) -> None:
    if run.accelerator.is_main_process:
        summary = {
            "steps": result.step,
            "bad_images": result.bad_images,
            "bad_examples": result.bad_examples,
            **({"stopped_by": result.stopped_by} if result.stopped_by else {}),
            **(extra or {}),
        }
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if result.bad_images:
            shown = "; ".join(f"{n}: {r}" for n, r in result.bad_examples[:3])
            run.accelerator.print(f"skipped {result.bad_images} unreadable images, e.g. {shown}")
