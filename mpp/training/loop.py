"""The accelerate training loop both recipes run: steps, logging windows, checkpoints and stops, in a fixed order
(the order of RNG draws and barriers is what makes a resume bit-identical).
"""

import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

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
    prepare_batch: Callable[[dict], dict] | None = (
        None  # e.g. decoding on the device (--decode gpu), before the batch is counted
    )
    seed: int = 0  # on XLA, each micro-batch's device RNG seed derives from it (xla.seed_micro_batch)


@dataclass
class LoopResult:
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
    acc = run.accelerator
    step, epoch, batches_in_epoch = run.state["step"], run.state["epoch"], run.state["batches_in_epoch"]
    bad_total, bad_new, bad_examples = run.state["bad_images"], 0, []  # all processes; this one's since the last count
    progress = tqdm(
        total=s.total_steps,
        initial=step,
        disable=not (acc.is_main_process and s.progress),
        desc=s.desc,
        dynamic_ncols=True,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    window = torch.zeros(4, device=acc.device)  # loss sum, metric sum, micro-batches, stop requests
    window_images, window_start, waiting = 0, s.clock(), WaitClock(s.clock)
    # fp16 on a GPU: accelerate's GradScaler skips overflowing steps itself (and must see every step).
    # fp16 on a CPU has no scaler (accelerate makes none there): the guard stays on.
    guard = None
    if acc.scaler is None and s.max_nonfinite > 0:
        guard = NonFiniteGuard(optimizer, s.max_nonfinite, run.state.get("skipped_steps", 0), acc.device)

    def skipped_steps() -> int:  # with the check off, a resumed run keeps the count it had
        return guard.skipped if guard else run.state.get("skipped_steps", 0)

    stopped_by = None
    # resumed at an epoch's end whose evaluation was logged after the checkpoint: evaluated again, not logged twice
    epoch_end_logged = run.state.get("epoch_end_logged", False)

    # micro-batches per epoch on this process; a stream has no epoch end accelerate could see
    per_epoch = None if s.streaming else len(loader)
    # one iterator across epochs (loader.EpochBatches): the workers build the next epoch's first batches
    # while this epoch's last ones train. Not when an epoch ends in a short accumulation, which
    # accelerate closes at the end of each loader pass.
    sampler = None if s.streaming else epoch_batches_of(loader)
    spanning = sampler is not None and per_epoch % acc.gradient_accumulation_steps == 0
    if sampler is not None:
        sampler.span = spanning
    stream = None
    model.train()
    while step < s.total_steps:
        images.set_epoch(epoch)
        if stream is None:
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            if sampler is not None:
                sampler.set_epoch(epoch)  # accelerate's set_epoch does not reach it through a multi-process shard
            batches = (
                acc.skip_first_batches(loader, batches_in_epoch) if batches_in_epoch and not s.streaming else loader
            )
            if spanning:
                stream = iter(batches)
        if spanning:
            batches = itertools.islice(stream, per_epoch - batches_in_epoch)  # the rest of this epoch
        for batch in waiting.timed(batches):
            batches_in_epoch += 1
            if s.prepare_batch is not None:
                batch = s.prepare_batch(batch)
            if batch["bad"]:
                if s.strict_data:
                    name, reason = batch["bad"][0]
                    raise BadDataError(f"--strict-data: {name}: {reason} (in epoch {epoch}, before step {step + 1})")
                bad_new += len(batch["bad"])
                bad_examples = (bad_examples + batch["bad"])[:10]
            seed_micro_batch(acc.device, s.seed, acc.process_index, epoch, batches_in_epoch)
            with acc.accumulate(model):
                loss, metric = step_fn(model, batch)
                scale = short_accumulation_scale(batches_in_epoch, per_epoch, acc.gradient_accumulation_steps)
                acc.backward(loss * scale if scale != 1 else loss)
                step_allowed = True
                if acc.sync_gradients and (s.clip_grad > 0 or guard):
                    norm = acc.clip_grad_norm_(params, s.clip_grad if s.clip_grad > 0 else math.inf)
                    step_allowed = guard is None or guard.allows_step(norm)
                lr = s.lr_at(step)
                for group in optimizer.param_groups:
                    # timm's layer decay stores a per-group scale
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                if step_allowed:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            window += torch.stack(
                [
                    loss.detach().float(),
                    metric.detach().float(),
                    torch.ones((), device=window.device),
                    torch.tensor(float(signals.received is not None), device=window.device),
                ]
            )
            window_images += batch["pixels"].shape[0]
            if not acc.sync_gradients:
                continue
            step += 1
            progress.update(1)
            if on_step is not None:
                on_step(step)
            # a stop request: acted on at once by a single process, at the next log step by many (they must agree)
            stop_now = signals.received is not None and acc.num_processes == 1
            if step % s.log_every == 0 or step == s.total_steps:
                # the only host-device synchronisation besides the finiteness check: once per logging window
                loss_sum, metric_sum, n, stops = acc.reduce(window, "sum").tolist()
                stop_now = stop_now or stops > 0
                bad_total, bad_new = bad_total + count_all(acc, bad_new), 0
                if guard:
                    guard.check(step, run.run_dir, acc.print)
                elapsed = s.clock() - window_start
                record = {
                    "step": step,
                    "epoch": epoch,
                    "loss": loss_sum / n,
                    s.metric: metric_sum / n,
                    "lr": lr,
                    "images_per_sec": window_images * acc.num_processes / elapsed,
                    "data_wait_share": waiting.seconds / elapsed,  # this process's; near 0: the loader keeps up
                    "bad_images": bad_total,
                    "skipped_steps": skipped_steps(),
                }
                progress.set_postfix(
                    loss=f"{record['loss']:.3f}",
                    **{s.metric: f"{record[s.metric]:.3f}"},
                    img_s=f"{record['images_per_sec']:.0f}",
                )
                if not s.progress:  # no bar (logs, batch jobs): one line per logging window instead
                    acc.print(
                        f"step {step}/{s.total_steps} loss {record['loss']:.4f} {s.metric} {record[s.metric]:.4f} "
                        f"lr {lr:.3g} {record['images_per_sec']:.0f} img/s",
                        flush=True,
                    )
                write_record(run, record)
                window.zero_()
                window_images, window_start, waiting.seconds = 0, s.clock(), 0.0
            if step % s.checkpoint_every == 0 or step == s.total_steps or stop_now:
                bad_total, bad_new = bad_total + count_all(acc, bad_new), 0
                if guard:  # never checkpoint a run that is about to stop for non-finite gradients
                    guard.check(step, run.run_dir, acc.print)
                trainer_state = {
                    "step": step,
                    "epoch": epoch,
                    "batches_in_epoch": batches_in_epoch,
                    "bad_images": bad_total,
                    "skipped_steps": skipped_steps(),
                    "launch": run.launch,
                    "metrics_records": run.records,
                    **(loader.position() if hasattr(loader, "position") else {}),
                }  # a stream's per-worker place
                saved = save_checkpoint(acc, run.run_dir, trainer_state, s.keep_checkpoints)
            if stop_now:
                stopped_by = signals.received or "a signal to another process"
                acc.print(
                    f"stopped by {stopped_by} after step {step}; checkpoint {saved or latest_checkpoint(run.run_dir)}. "
                    f"Continue with the same command plus --resume auto --output-dir {run.run_dir}"
                )
                break
            if step >= s.total_steps:
                break
        else:  # the epoch ran out
            if on_epoch_end is not None:
                extra = on_epoch_end(epoch, step)
                if extra and not epoch_end_logged:
                    write_record(run, {"step": step, "epoch": epoch, **extra})
                epoch_end_logged = False  # only a resume at this epoch's end can find it logged
                model.train()
            epoch, batches_in_epoch = epoch + 1, 0
            continue
        break  # stopped early
    progress.close()
    all_examples = gather_lists(acc, bad_examples)
    # every way out of the loop above passes the checkpoint step, where the guard was read last
    return LoopResult(step, bad_total + count_all(acc, bad_new), all_examples[:10], skipped_steps(), stopped_by)


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
