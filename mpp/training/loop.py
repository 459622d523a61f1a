"""What every training recipe shares: processes, the run folder, resume, and the accelerate loop.

The recipes (pretraining, fine-tuning) differ only in their model, data and `step_fn`.
"""

import itertools
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DataLoaderConfiguration,
    TorchDynamoPlugin,
    broadcast_object_list,
    gather_object,
    parse_flag_from_env,
)
from tqdm.auto import tqdm

from mpp.errors import UsageError
from mpp.training.checkpoint import (
    STATE_FILE,
    check_checkpoint,
    latest_checkpoint,
    read_trainer_state,
    save_checkpoint,
    usable_checkpoint,
)
from mpp.training.launches import check_resume, launch_record, record_launch
from mpp.training.run_dir import claim_run_dir
from mpp.training.terminal import CtrlCForTheLoop
from mpp.training.trackers import PROJECT, build_trackers
from mpp.training.xla import (
    is_xla,
    load_models_through_cpu,
    make_loader_checkpointable,
    refuse_compile_on_xla,
    seed_micro_batch,
)

FRESH_STATE = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "bad_images": 0}


def init_processes(threads: int | None, compile: bool = False) -> PartialState:
    """Start the process group and give each CPU process its share of the cores; refuse what the
    device cannot do (--compile on XLA) before any heavy work.

    AcceleratorState honours ACCELERATE_USE_CPU, a bare PartialState does not. accelerate launch
    without a config sets OMP_NUM_THREADS=1, which would halve a 2-core CPU run.
    """
    dist = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    refuse_compile_on_xla(compile, dist.device)
    if dist.device.type == "cpu" or threads:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", dist.num_processes))
        torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0)) // local_processes))
    return dist


def check_resume_path(resume: str | None) -> Path | None:
    """--resume PATH must be a complete checkpoint; 'auto' is resolved once the run folder is known."""
    if not resume or resume == "auto":
        return None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UsageError(
            f"--resume {resume}: not a complete checkpoint folder (no {STATE_FILE}); use 'auto' or a "
            "checkpoints/step_N "
            "folder"
        )
    return path


@dataclass
class Run:
    accelerator: Accelerator
    run_dir: Path
    resume_from: Path | None
    state: dict  # step, epoch, batches_in_epoch, bad_images at the start
    launch: dict = field(default_factory=dict)  # what each checkpoint records and a resume must keep (launches.py)
    records: int = 0  # metrics.jsonl records so far (main process); each checkpoint stores the count


def open_run(
    dist: PartialState,
    output_dir: str | None,
    resume: str | None,
    grad_accum: int,
    compile: bool = False,
    report_to: str = "tensorboard",
    settings: dict | None = None,
) -> Run:
    """Name, check and make the run folder, find the checkpoint to resume from, create the Accelerator.
    settings: the run's configuration; a resume that changes what it trains is refused (launches.py)."""
    resume_from = check_resume_path(resume)
    # The main process makes and holds the run folder and checks the checkpoint's files against its
    # manifest; every process takes its answers (a refusal too) before accelerate's trackers need them.
    claimed = [None, None, None]  # run folder, checkpoint, refusal
    if dist.is_main_process:
        try:
            run_dir = claim_run_dir(output_dir, resume)
            if resume == "auto":
                resume_from = usable_checkpoint(run_dir, lambda line: print(line, flush=True))
            elif resume_from is not None:
                check_checkpoint(resume_from, "--resume")
            claimed = [str(run_dir), str(resume_from) if resume_from else None, None]
        except UsageError as e:
            claimed[2] = str(e)
    run_dir, resume_from, refused = broadcast_object_list(claimed)
    if refused:
        raise UsageError(refused)
    run_dir, resume_from = Path(run_dir), Path(resume_from) if resume_from else None
    state = read_trainer_state(resume_from) if resume_from else dict(FRESH_STATE)
    accelerator = Accelerator(
        gradient_accumulation_steps=grad_accum,
        log_with=build_trackers(report_to, run_dir, resumed_at=state["step"] if resume_from else None),  # --report-to
        project_dir=str(run_dir),
        # non_blocking: batches from pinned memory are copied while the previous step still runs (GPU)
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
        # accelerate compiles in prepare() and unwraps for saving; `accelerate launch --dynamo_backend` works too
        **({"dynamo_plugin": TorchDynamoPlugin(backend="inductor")} if compile else {}),
    )
    launch = (
        launch_record(settings, accelerator.num_processes, accelerator.mixed_precision) if settings is not None else {}
    )
    if resume_from:
        check_resume(state.get("launch"), launch, resume_from)
    if is_xla(accelerator.device):
        make_loader_checkpointable()
        accelerator.register_load_state_pre_hook(load_models_through_cpu)
    return Run(accelerator, run_dir, resume_from, state, launch)


def read_records(path: Path) -> list[dict]:
    """metrics.jsonl's records; a last line cut short by a kill in mid-write is left out."""
    records = []
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise
    return records


def trim_metrics(path: Path, state: dict, own_checkpoint: bool) -> bool:
    """Keep the records written up to the checkpoint the run resumes from; later ones are logged again.
    The checkpoint says how many records metrics.jsonl held when it was written. Records at its step written
    after it are the evaluation at the end of its epoch: they are kept, and True tells the loop that this
    evaluation is logged already (it runs again on resume, but is not written twice). A checkpoint of
    another folder, or one written before these counts: the records up to its step are kept."""
    if not path.is_file():
        return False
    records, step, count = read_records(path), state["step"], state.get("metrics_records")
    if own_checkpoint and count is not None and count <= len(records):
        after = list(itertools.takewhile(lambda r: r["step"] == step, records[count:]))
        kept, logged = records[:count] + after, bool(after)
    else:
        kept, logged = [r for r in records if r["step"] <= step], False
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return logged


def start_logging(run: Run, config: dict) -> None:
    """This launch's configuration (launches.record_launch), metrics.jsonl trimmed to the checkpoint, the
    --report-to trackers through accelerate."""
    if run.accelerator.is_main_process:
        record_launch(run.run_dir, config, run.resume_from)
        own = run.resume_from is not None and run.resume_from.resolve().parent.parent == run.run_dir.resolve()
        run.state["epoch_end_logged"] = trim_metrics(run.run_dir / "metrics.jsonl", run.state, own)
        run.records = len(read_records(run.run_dir / "metrics.jsonl"))
    # TensorBoard hparams take scalars and strings only
    flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items() if k != "derived"}
    run.accelerator.init_trackers(PROJECT, config=flat)
    if run.resume_from:
        run.accelerator.print(f"resumed from {run.resume_from} at step {run.state['step']}")


def count_all(accelerator: Accelerator, count: int) -> int:
    """A count summed over all processes."""
    return int(accelerator.reduce(torch.tensor(count, device=accelerator.device), "sum").item())


def gather_lists(accelerator: Accelerator, items: list) -> list:
    """Every process's list, joined in process order. accelerate's gather_object refuses XLA
    (NotImplementedError); torch_xla's mesh_reduce does the same job there."""
    if accelerator.num_processes == 1:
        return list(items)
    if is_xla(accelerator.device):
        import torch_xla.core.xla_model as xm

        return xm.mesh_reduce("mpp.gather_lists", items, lambda parts: [x for part in parts for x in part])
    return [x for part in gather_object([items]) for x in part]


def write_record(run: Run, record: dict) -> None:
    run.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
    if run.accelerator.is_main_process:
        with open(run.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        run.records += 1


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


class RunError(RuntimeError):
    """A run that cannot go on: reported as one line, exit code 1, the last checkpoint left as it was."""


class NonFiniteError(RunError):
    """Too many consecutive non-finite gradients."""


class BadDataError(RunError):
    """An unreadable image or missing label under --strict-data."""


class StopSignals:
    """SIGTERM / SIGINT (pre-emption, Ctrl-C) ask the loop to stop after the current step.

    Signals within `grace` seconds of the first are the same request: accelerate's launcher answers a
    terminal's Ctrl-C with a SIGTERM of its own a moment later, and a scheduler may signal both the
    launcher (which forwards it) and the training process. A signal after that interrupts at once,
    through the handler that was there before the loop. This handler stays installed until the loop
    ends, and the loop does not end within the grace period: a handler swapped while a signal is on
    its way loses that signal ("OSError: Signal 15 ignored due to race condition"), and with it the
    exit code 75.
    """

    grace = 1.0  # seconds

    def __init__(self):
        self.received: str | None = None
        self._first_at = 0.0
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is None:
            self.received, self._first_at = signal.Signals(signum).name, time.monotonic()
            return
        if time.monotonic() - self._first_at < self.grace:
            return  # the same request, delivered twice
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):  # e.g. Python's KeyboardInterrupt for SIGINT
            previous(signum, frame)
        elif previous == signal.SIG_DFL:  # end the way the signal would have ended the process
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def __exit__(self, *exc):
        if self.received is not None:  # a duplicate still on its way is absorbed here, not by the default handler
            time.sleep(max(0.0, self._first_at + self.grace - time.monotonic()))
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


FUSED_OPTIMIZER_DEVICES = ("cpu", "cuda")  # where torch has fused Adam/AdamW kernels


def fused_optimizer_kwargs(opt: str, device: torch.device) -> dict:
    """{'fused': True} for timm's create_optimizer_v2 where torch has a fused kernel: one kernel for
    all parameters (the AdamW step is 3x faster on CPU) that also takes `found_inf`, which lets a
    non-finite step be skipped without the host waiting for the device (NonFiniteGuard)."""
    return {"fused": True} if opt in ("adam", "adamw") and device.type in FUSED_OPTIMIZER_DEVICES else {}


class NonFiniteGuard:
    """Skips optimiser steps whose gradient norm is NaN/inf and stops the run after too many in a row.

    With a fused optimiser the skip happens inside its kernel through `found_inf`, the way torch's
    GradScaler does it, so no step waits for the device; the counts stay on the device and are read
    at logging and checkpoint steps only. Other optimisers need the verdict on the host: one
    synchronisation per step.
    """

    def __init__(self, optimizer, max_in_a_row: int, skipped: int, device: torch.device):
        self.inner = getattr(optimizer, "optimizer", optimizer)  # under accelerate's AcceleratedOptimizer
        self.on_device = getattr(self.inner, "_step_supports_amp_scaling", False)  # GradScaler's test for found_inf
        self.max_in_a_row = max_in_a_row
        self.skipped = skipped  # read so far, over the whole run
        self.counts = torch.zeros(3, device=device)  # skipped since the last read, current streak, longest streak since

    def allows_step(self, grad_norm: torch.Tensor) -> bool:
        """Records one optimiser step's gradient norm; False: skip optimizer.step() (host path only)."""
        bad = (~torch.isfinite(grad_norm)).float().reshape(())
        streak = (self.counts[1] + bad) * bad
        self.counts = torch.stack([self.counts[0] + bad, streak, torch.maximum(self.counts[2], streak)])
        if self.on_device:
            self.inner.found_inf = bad  # the fused kernel leaves weights and moments alone when it is 1
            return True
        return not bool(bad)

    def check(self, step: int, run_dir: Path, say: Callable[[str], None]) -> None:
        """Reads the counts (one synchronisation); raises NonFiniteError after max_in_a_row bad steps in a row."""
        new, streak, longest = self.counts.tolist()
        self.counts = torch.tensor([0.0, streak, streak], device=self.counts.device)
        if new:
            self.skipped += int(new)
            say(f"step {step}: {int(new)} optimiser step(s) skipped for a non-finite gradient since the last report")
        if longest >= self.max_in_a_row:
            raise NonFiniteError(
                f"{int(longest)} optimiser steps in a row with a non-finite gradient (found at step {step}); "
                f"the last good checkpoint in {run_dir / 'checkpoints'} is intact (lower --lr or check the data)"
            )


def capped_warmup(requested: int, total_steps: int, say: Callable[[str], None]) -> int:
    """Warmup takes at most half the run, so that the cosine has room; said aloud when it is cut."""
    warmup = min(requested, total_steps // 2)
    if warmup < requested:
        say(f"--warmup-steps {requested} is more than half of the {total_steps} steps: warming up over {warmup} steps")
    return warmup


def short_accumulation_scale(batch: int, per_epoch: int | None, grad_accum: int) -> float:
    """The factor for micro-batch `batch` (1-based in its epoch) that makes each optimiser step's
    gradient the mean over its own micro-batches. accelerate divides every loss by grad_accum, but
    also steps at each epoch's end, after a short last accumulation of k < grad_accum micro-batches:
    those get grad_accum / k."""
    short = per_epoch % grad_accum if per_epoch else 0
    return grad_accum / short if short and batch > per_epoch - short else 1.0


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


def finish(run: Run) -> None:
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()  # closes the trackers (and, in accelerate >= 1.x, the process group)
