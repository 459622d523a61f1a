"""The MPP pretraining loop under Hugging Face Accelerate (one CPU, GPUs, nodes or TPU alike)."""
import json
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, gather_object, parse_flag_from_env, set_seed
from timm.optim import create_optimizer_v2
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import STATE_FILE, complete_checkpoints, latest_checkpoint, read_trainer_state, save_checkpoint
from .config import PretrainConfig, lr_at, resolve_lr, validate
from .data import AugmentedImages, AugmentedStream, collate_images, find_image_column, load_images, train_transform
from .errors import UsageError
from .model import MPPModel, create_encoder
from .weights import save_weights



@dataclass
class PretrainResult:
    run_dir: Path
    model: MPPModel  # unwrapped, on this process's device
    steps: int


def default_run_dir(cfg: PretrainConfig) -> Path:
    """--output-dir, else with --resume auto the newest run under runs/ that has a checkpoint, else runs/<date-time>."""
    if cfg.output_dir:
        return Path(cfg.output_dir)
    if cfg.resume == "auto":
        runs = sorted((p for p in Path("runs").glob("*") if complete_checkpoints(p)), key=lambda p: p.stat().st_mtime)
        if runs:
            return runs[-1]
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def check_run_dir(run_dir: Path, resume: str | None) -> None:
    """Refuse to overwrite a finished or started run unless resuming; make sure we can write there."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--output-dir {run_dir} exists and is not a folder")
    if resume is None and run_dir.is_dir() and any(run_dir.iterdir()):
        raise UsageError(f"--output-dir {run_dir} is not empty; pass --resume auto to continue that run, or choose another folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--output-dir {run_dir} is not writable ({e.strerror})") from None


def open_dataset(cfg: PretrainConfig, state: PartialState):
    """(dataset, image column); a Hub download happens once per machine."""
    with state.main_process_first():
        ds = load_images(cfg.dataset, cfg.split, cfg.dataset_config, cfg.streaming)
    column = find_image_column(ds, cfg.image_column)
    if not cfg.streaming and len(ds) < cfg.batch_size * state.num_processes:
        raise UsageError(f"--batch-size {cfg.batch_size} x {state.num_processes} processes is more than the {len(ds)} images of {cfg.dataset}")
    return ds, column


def default_workers(device: torch.device) -> int:
    """No worker processes on small CPU machines (they would take cores from the step), else a few."""
    cores = os.cpu_count() or 1
    if device.type == "cpu" and cores <= 4:
        return 0
    return min(8, max(1, cores // max(1, PartialState().num_processes) - 1))


def build_loader(cfg: PretrainConfig, ds, column: str, accelerator: Accelerator, skip_examples: int = 0):
    """(dataset wrapper, DataLoader). Only the map-style loader goes through accelerator.prepare."""
    transform = train_transform(cfg.img_size, cfg.crop_scale, cfg.hflip)
    workers = default_workers(accelerator.device) if cfg.workers is None else cfg.workers
    pin = accelerator.device.type == "cuda"
    if cfg.streaming:
        from datasets.distributed import split_dataset_by_node

        ds = ds.shuffle(seed=cfg.seed, buffer_size=10_000)
        ds = split_dataset_by_node(ds, rank=accelerator.process_index, world_size=accelerator.num_processes)
        images = AugmentedStream(ds, column, transform, cfg.seed, accelerator.process_index, skip_examples)
        loader = torch.utils.data.DataLoader(
            images, batch_size=cfg.batch_size, collate_fn=collate_images, num_workers=workers, pin_memory=pin, drop_last=True
        )
        return images, loader
    images = AugmentedImages(ds, column, transform, cfg.seed)
    loader = torch.utils.data.DataLoader(
        images,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,  # static shapes: every step sees a full batch
        collate_fn=collate_images,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=False,  # workers are re-made each epoch and see the new epoch's seeds
        # its own generator, so that creating an iterator (e.g. on resume) never draws from the global RNG
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    return images, loader


def export_weights(model: MPPModel, cfg: PretrainConfig, run_dir: Path, step: int) -> None:
    """model.safetensors (encoder, timm keys) and mpp_head.safetensors (mask token + head)."""
    enc = model.encoder
    meta = {
        "timm_model": cfg.model,
        "img_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "mean": list(enc.pretrained_cfg.get("mean", (0.5, 0.5, 0.5))),
        "std": list(enc.pretrained_cfg.get("std", (0.5, 0.5, 0.5))),
        "mpp_target": cfg.target,
        "steps": step,
        "mpp_version": __version__,
    }
    save_weights(run_dir / "mpp_head.safetensors", {"mask_token": model.mask_token, **{f"head.{k}": v for k, v in model.head.state_dict().items()}}, meta)
    save_weights(run_dir / "model.safetensors", enc.state_dict(), meta)


def trim_metrics(path: Path, last_step: int) -> None:
    """Keep the records up to the step the run starts from; later ones are logged again."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
        path.write_text("".join(line + "\n" for line in kept))


def count_all(accelerator: Accelerator, count: int) -> int:
    """A count summed over all processes."""
    return int(accelerator.reduce(torch.tensor(count, device=accelerator.device), "sum").item())


def _tracker_config(cfg_dict: dict) -> dict:
    """TensorBoard hparams take scalars and strings only."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in cfg_dict.items() if k != "derived"}


def pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Runs (or resumes) one pretraining run. Every process calls this."""
    validate(cfg)
    # starts the process group; AcceleratorState honours ACCELERATE_USE_CPU, a bare PartialState does not
    dist = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if dist.device.type == "cpu" or cfg.threads:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", dist.num_processes))
        torch.set_num_threads(cfg.threads or max(1, len(os.sched_getaffinity(0)) // local_processes))
    # Everything that can be wrong with the invocation is found before the run folder is made.
    set_seed(cfg.seed)  # identical initialisation on every process
    try:
        encoder = create_encoder(cfg.model, cfg.img_size, cfg.patch_size)
    except ValueError as e:
        raise UsageError(f"--model: {e}") from None
    if cfg.grad_checkpointing:
        encoder.set_grad_checkpointing(True)
    model = MPPModel(encoder, cfg.target, cfg.mask_ratio, cfg.mask_probs, cfg.random_from == "image")
    ds, column = open_dataset(cfg, dist)
    resume_from = None
    if cfg.resume and cfg.resume != "auto":
        resume_from = Path(cfg.resume)
        if not (resume_from / STATE_FILE).is_file():
            raise UsageError(f"--resume {cfg.resume}: not a complete checkpoint folder (no {STATE_FILE}); use 'auto' or a checkpoints/step_N folder")

    # the run folder is named on the main process (its clock) and shared before accelerate's trackers need it
    run_dir = Path(broadcast_object_list([str(default_run_dir(cfg))])[0])
    if dist.is_main_process:
        check_run_dir(run_dir, cfg.resume)
    dist.wait_for_everyone()
    if cfg.resume == "auto":
        resume_from = latest_checkpoint(run_dir)
    state = read_trainer_state(resume_from) if resume_from else {"step": 0, "epoch": 0, "batches_in_epoch": 0, "bad_images": 0}
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum,
        log_with="tensorboard",
        project_dir=str(run_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )

    global_batch = cfg.batch_size * accelerator.num_processes * cfg.grad_accum
    peak_lr = resolve_lr(cfg, global_batch)
    optimizer = create_optimizer_v2(
        model, opt="adamw", lr=peak_lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas),
        **({"fused": True} if accelerator.device.type == "cuda" else {}),
    )
    skip_examples = state["batches_in_epoch"] * cfg.batch_size if cfg.streaming else 0
    images, loader = build_loader(cfg, ds, column, accelerator, skip_examples)
    if cfg.streaming:
        model, optimizer = accelerator.prepare(model, optimizer)
        total_steps = cfg.max_steps
    else:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        steps_per_epoch = len(loader) // cfg.grad_accum
        total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = min(cfg.warmup_steps, total_steps // 2)

    if resume_from:
        accelerator.load_state(str(resume_from))  # model, optimizer, every process's RNG states
    else:
        set_seed(cfg.seed, device_specific=True)  # different corruptions on each process

    cfg.derived = dict(
        run_dir=str(run_dir), num_processes=accelerator.num_processes, global_batch=global_batch, peak_lr=peak_lr,
        total_steps=total_steps, warmup_steps=warmup, mixed_precision=accelerator.mixed_precision,
        device=str(accelerator.device), mpp_version=__version__, torch=torch.__version__,
        num_patches=accelerator.unwrap_model(model).num_patches,
    )
    if accelerator.is_main_process:
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        trim_metrics(run_dir / "metrics.jsonl", state["step"])
    accelerator.init_trackers("tensorboard", config=_tracker_config(cfg.to_dict()))

    step, epoch, batches_in_epoch = state["step"], state["epoch"], state["batches_in_epoch"]
    bad_total, bad_new, bad_examples = state["bad_images"], 0, []  # all processes; this one's since the last count
    progress = tqdm(total=total_steps, initial=step, disable=not (accelerator.is_main_process and cfg.progress), desc="mpp", dynamic_ncols=True)
    if resume_from:
        accelerator.print(f"resumed from {resume_from} at step {step}")
    params = [p for p in model.parameters() if p.requires_grad]
    window = torch.zeros(3, device=accelerator.device)  # loss sum, accuracy sum, micro-batches
    window_images, window_start = 0, time.perf_counter()

    model.train()
    while step < total_steps:
        images.set_epoch(epoch)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, batches_in_epoch) if batches_in_epoch and not cfg.streaming else loader
        for batch in batches:
            batches_in_epoch += 1
            if batch["bad"]:
                bad_new += len(batch["bad"])
                bad_examples = (bad_examples + batch["bad"])[:10]
            pixels = batch["pixels"].to(accelerator.device, non_blocking=True)  # (B, 3, H, W) uint8
            with accelerator.accumulate(model):
                out = model(pixels)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and cfg.clip_grad > 0:
                    accelerator.clip_grad_norm_(params, cfg.clip_grad)
                lr = lr_at(step, peak_lr, warmup, total_steps, cfg.min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            window += torch.stack([out.loss.detach().float(), out.accuracy.detach().float(), torch.ones((), device=window.device)])
            window_images += pixels.shape[0]
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                # the only host-device synchronisation: once per logging window
                loss, acc, n = accelerator.reduce(window, "sum").tolist()
                bad_total, bad_new = bad_total + count_all(accelerator, bad_new), 0
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": step, "epoch": epoch, "loss": loss / n, "masked_acc": acc / n, "lr": lr,
                    "images_per_sec": window_images * accelerator.num_processes / elapsed, "bad_images": bad_total,
                }
                progress.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['masked_acc']:.3f}", img_s=f"{record['images_per_sec']:.0f}")
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
                if accelerator.is_main_process:
                    with open(run_dir / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
                window.zero_()
                window_images, window_start = 0, time.perf_counter()
            if step % cfg.checkpoint_every == 0 or step == total_steps:
                bad_total, bad_new = bad_total + count_all(accelerator, bad_new), 0
                save_checkpoint(accelerator, run_dir, {"step": step, "epoch": epoch, "batches_in_epoch": batches_in_epoch, "bad_images": bad_total}, cfg.keep_checkpoints)
            if step >= total_steps:
                break
        else:  # the epoch ran out
            epoch, batches_in_epoch = epoch + 1, 0
    progress.close()

    all_bad = [b for part in gather_object([bad_examples]) for b in part]
    bad_sum = bad_total + count_all(accelerator, bad_new)
    if accelerator.is_main_process:
        export_weights(accelerator.unwrap_model(model), cfg, run_dir, step)
        summary = {"steps": step, "bad_images": bad_sum, "bad_examples": all_bad[:10]}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if bad_sum:
            accelerator.print(f"skipped {bad_sum} unreadable images, e.g. " + "; ".join(f"{n}: {r}" for n, r in all_bad[:3]))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # closes the trackers (and, in accelerate >= 1.x, the process group)
    return PretrainResult(run_dir, accelerator.unwrap_model(model), step)

