"""The MPP pretraining loop under Hugging Face Accelerate (one CPU, GPUs, nodes or TPU alike)."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from timm.optim import create_optimizer_v2

from mpp import __version__
from mpp.data.batch import Batch
from mpp.data.images import AugmentedImages, collate_images
from mpp.data.loader import default_workers, leave_stop_signals_to_main, training_loader
from mpp.data.sources import find_image_column, load_images
from mpp.data.stream import AugmentedStream, StreamLoader, StreamPosition
from mpp.data.transforms import train_transform
from mpp.errors import UsageError
from mpp.models.hub_folder import hub_dataset_ids, public_path, write_model_card
from mpp.models.model import MPP, create_encoder
from mpp.models.mpp_folder import save_objective
from mpp.models.publish import publish
from mpp.training.fast_paths import convert_to_fp8
from mpp.training.loop import LoopSettings, fit, write_summary
from mpp.training.pretrain_config import PretrainConfig, check_batch_fits, lr_at, optimizer_steps, resolve_lr, validate
from mpp.training.run_setup import finish, init_processes, open_run_for, start_logging, write_record
from mpp.training.schedule import capped_warmup, fused_optimizer_kwargs
from mpp.training.trackers import tracker_names
from mpp.training.xla import sync_free_on_xla


@dataclass
class PretrainResult:
    run_dir: Path
    model: MPP  # unwrapped, on this process's device
    steps: int
    stopped_by: str | None = None  # a signal that stopped the run before its last step


def open_dataset(cfg: PretrainConfig, state: PartialState):
    """(dataset, image column); a Hub download happens once per machine."""
    with state.main_process_first():
        ds = load_images(cfg.dataset, cfg.split, cfg.dataset_config, cfg.streaming)
    column = find_image_column(ds, cfg.image_column)
    if not cfg.streaming:
        check_batch_fits(cfg.batch_size, state.num_processes, len(ds), cfg.dataset, cfg.grad_accum)
    return ds, column


def build_loader(cfg: PretrainConfig, ds, column: str, accelerator: Accelerator, run_state: dict | None = None):
    """(dataset wrapper, DataLoader). Only the map-style loader goes through accelerator.prepare.
    run_state: the checkpoint's trainer state, where a resumed stream starts."""
    transform = train_transform(cfg.img_size, cfg.crop_scale, cfg.hflip, cfg.decode)
    defer = cfg.decode == "gpu"  # workers hand over JPEG bytes and crop boxes; device_decoder decodes them
    workers = default_workers(accelerator.device) if cfg.workers is None else cfg.workers
    if cfg.streaming:
        from datasets.distributed import split_dataset_by_node

        ds = ds.shuffle(seed=cfg.seed, buffer_size=10_000)
        ds = split_dataset_by_node(ds, rank=accelerator.process_index, world_size=accelerator.num_processes)
        position = StreamPosition.of_run(run_state, workers) if run_state else None
        images = AugmentedStream(
            ds, column, transform, cfg.seed, accelerator.process_index, cfg.batch_size, position, defer
        )
        loader = torch.utils.data.DataLoader(
            images,
            batch_size=cfg.batch_size,
            collate_fn=AugmentedStream.collate,
            num_workers=workers,
            pin_memory=accelerator.device.type == "cuda",
            drop_last=True,
            worker_init_fn=leave_stop_signals_to_main,
            generator=torch.Generator().manual_seed(cfg.seed),  # a resume's new iterator leaves the global RNG alone
        )
        return images, StreamLoader(loader, images.resume)
    images = AugmentedImages(ds, column, transform, cfg.seed, defer=defer)
    return images, training_loader(
        images, cfg.batch_size, cfg.seed, workers, accelerator.device, collate_images, accelerator.num_processes
    )


def device_decoder(img_size: int, device: torch.device):
    """LoopSettings.prepare_batch for --decode gpu: decodes a batch's deferred JPEGs on the device into
    their slots; one that fails is counted as unreadable and its slot filled with a readable image."""
    from mpp.data.augment import decode_deferred

    def prepare(batch: Batch) -> Batch:
        encoded = batch.pop("encoded", None)
        if not encoded:
            return batch
        pixels, failed = decode_deferred(batch["pixels"].to(device, non_blocking=True), encoded, img_size)
        if failed:
            broken = {slot for slot, _ in failed}
            good = [i for i in range(len(pixels)) if i not in broken]
            if not good:
                raise RuntimeError(f"all {len(pixels)} images of a batch are unreadable, e.g. {failed[0][1]}")
            for k, (slot, reason) in enumerate(failed):
                pixels[slot] = pixels[good[k % len(good)]]
                batch["valid"][slot] = False
                name, _, reason = reason.partition(": ")
                batch["bad"].append((name, reason))
        batch["pixels"] = pixels
        return batch

    return prepare


FINAL_WINDOWS = 5  # the docs' "final loss" is the mean of the last 5 logged windows


def last_records(run_dir: Path, has, count: int) -> list[dict]:
    """The newest `count` metrics.jsonl records for which has(record) holds, oldest first; [] when none (or no file
    yet)."""
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [r for r in records if has(r)][-count:]


def last_record(run_dir: Path, has) -> dict:
    """The newest metrics.jsonl record for which has(record) holds; {} when none."""
    newest = last_records(run_dir, has, 1)
    return newest[0] if newest else {}


def final_training_metrics(run_dir: Path) -> tuple[dict, str]:
    """(mean loss and masked-patch accuracy over the last FINAL_WINDOWS logged windows, what that mean covers):
    one window is too noisy to judge a run by, and the evidence tables use this mean."""
    windows = last_records(run_dir, lambda r: "loss" in r, FINAL_WINDOWS)
    if not windows:
        return {}, "no logged window"
    means = {k: sum(r[k] for r in windows) / len(windows) for k in ("loss", "masked_acc")}
    steps = f"step {windows[0]['step']}" if len(windows) == 1 else f"steps {windows[0]['step']}-{windows[-1]['step']}"
    return means, f"mean of the last {len(windows)} logged windows, records at {steps}"


def closing_summary(run_dir: Path) -> str:
    """What the end of a run tells the user: steps, final loss and masked accuracy, wall time, images/s
    (start-up included), where the files are, and the next commands."""
    summary = json.loads((run_dir / "summary.json").read_text())
    final, covers = final_training_metrics(run_dir)
    rate = summary.get("images_per_sec")
    lines = [
        f"MPP pretraining finished: {summary['steps']} steps ({summary.get('steps_this_run', summary['steps'])} in "
        "this "
        "run, "
        f"{summary.get('wall_s', 0):.0f} s{f', {rate:.0f} images/s with start-up' if rate else ''})",
        f"  final loss {final.get('loss', float('nan')):.4f}, masked-patch accuracy "
        f"{final.get('masked_acc', float('nan')):.4f} ({covers})"
        + (f"; {summary['bad_images']} unreadable images skipped" if summary.get("bad_images") else ""),
        f"  encoder weights  {run_dir / 'model.safetensors'}   (timm keys, timm's config.json beside it; MPP head: "
        "mpp_head.safetensors)",
        f"  metrics          {run_dir / 'metrics.jsonl'}   (tensorboard --logdir {run_dir})",
        "next:",
        f"  accelerate launch recipes/finetune.py --init {run_dir / 'model.safetensors'} --dataset <labelled set>",
        f"  python recipes/inspect_run.py {run_dir}",
        f"  python -c \"import timm; m = timm.create_model('local-dir:{run_dir}', pretrained=True)\"   "
        "(timm alone: the folder is a timm hub folder; model card README.md)",
    ]
    return "\n".join(lines)


def build_optimizer(model: MPP, cfg: PretrainConfig, lr: float, device: torch.device):
    """AdamW through timm: no decay on biases, norms and embeddings (MPP.no_weight_decay)."""
    optimizer = create_optimizer_v2(
        model,
        opt="adamw",
        lr=lr,
        weight_decay=cfg.weight_decay,
        betas=tuple(cfg.betas),
        **fused_optimizer_kwargs("adamw", device),
    )
    return sync_free_on_xla(optimizer, device)


def export_weights(model: MPP, cfg: PretrainConfig, run_dir: Path, step: int) -> None:
    """model.safetensors (encoder, timm keys), timm's config.json and mpp_head.safetensors (mask token + head),
    written as MPP.save_pretrained writes them, and the model card."""
    meta = save_objective(
        model, run_dir, {"steps": step}
    )  # with model.safetensors: a folder timm loads as "local-dir:RUN"
    write_pretraining_card(run_dir, cfg, meta, model.encoder)


def write_pretraining_card(
    run_dir: Path, cfg: PretrainConfig, meta: dict, encoder: torch.nn.Module | None = None
) -> None:
    derived = cfg.derived or {}
    final, covers = final_training_metrics(run_dir)
    evals = last_record(run_dir, lambda r: any(k.startswith("eval_") for k in r))
    where = meta.get("mpp_corrupt_at", cfg.corrupt_at)
    corrupted = (
        "patch embeddings is corrupted after the patch projection"
        if where == "embedding"
        else "patches' pixel regions of the normalised image is corrupted before the patch embedding"
    )
    write_model_card(
        run_dir,
        title=f"{cfg.model}, pretrained by masked patch prediction",
        summary=(
            f"A timm `{cfg.model}` encoder pretrained without labels on `{public_path(cfg.dataset)}` by masked patch "
            "prediction "
            f"(ViT paper §4.6): a share of the {corrupted}, and the model predicts, from each "
            "corrupted patch's output token, a target computed from its pixels."
        ),
        facts={
            "timm model": f"`{cfg.model}`",
            "image size / patch": f"{cfg.img_size} / {cfg.patch_size}",
            "target": cfg.target,
            "corrupted": f"{cfg.mask_ratio:.0%} of patches, {'/'.join(f'{p:.0%}' for p in cfg.mask_probs)} "
            f"mask/random/kept, in the {'embeddings' if where == 'embedding' else 'pixels'} (--corrupt-at {where})",
            "steps": meta["steps"],
            "global batch": derived.get("global_batch", "?"),
            "peak lr": derived.get("peak_lr", "?"),
            "data": f"`{public_path(cfg.dataset)}`" + (f" ({cfg.split})" if cfg.split else ""),
        },
        metrics={
            k: v
            for k, v in {
                f"loss ({covers})": final.get("loss"),
                f"masked-patch accuracy ({covers})": final.get("masked_acc"),
                **{f"{k} (step {evals['step']})": v for k, v in evals.items() if k.startswith("eval_")},
            }.items()
            if v is not None
        },
        tags=["timm", "image-feature-extraction", "vision-transformer", "masked-patch-prediction", "self-supervised"],
        datasets=hub_dataset_ids(cfg.dataset),
        use=PATCH_TOKEN_FEATURES,
        note=features_note(encoder),
    )


# How to read features from an MPP encoder: MPP trains the patch tokens only, never a class token or an attention
# pool, so the features are the mean of the patch tokens (forward_features, prefix tokens left out).
PATCH_TOKEN_FEATURES = [
    "tokens = model.forward_features(x)  # (1, prefix + patch tokens, width)",
    "features = tokens[:, model.num_prefix_tokens:].mean(1)  # the mean of the patch tokens",
]


def features_note(encoder: torch.nn.Module | None) -> str:
    """Why the card's features are the patch tokens' mean, and what model(x) gives instead for this encoder."""
    pool = getattr(encoder, "global_pool", None)
    if pool == "avg":
        fc_norm = not isinstance(getattr(encoder, "fc_norm", None), (torch.nn.Identity, type(None)))
        own = "`model(x)` gives the same mean" + (
            ", then timm's `fc_norm`, which MPP leaves at its initial values" if fc_norm else ""
        )
    else:
        own = (
            f"`model(x)` pools with timm's `{pool}` pooling (the class token or its like), which MPP never trains: "
            "it is not a feature of this encoder"
        )
    return (
        "MPP trains the patch tokens only (each corrupted patch's output token predicts its target), so the features "
        f"are the mean of the patch tokens; {own}. `num_classes=N` adds a fresh head to fine-tune."
    )


def picture_logger(cfg: PretrainConfig, accelerator, model):
    """on_step callback: every --log-images-every steps, a grid of MPP predictions on 8 fixed images."""
    if not cfg.log_images_every or cfg.streaming or not accelerator.is_main_process:
        return None
    if "tensorboard" not in tracker_names(cfg.report_to):
        accelerator.print(
            f"--log-images-every: the pictures go to TensorBoard, which --report-to {cfg.report_to} leaves out; not "
            "logged"
        )
        return None
    from mpp.data.heldout import sample_images
    from mpp.evaluation.diagnostics import prediction_grid

    images = sample_images(cfg.dataset, cfg.split, cfg.dataset_config, cfg.image_column, 8, cfg.seed, cfg.img_size)
    tracker = accelerator.get_tracker("tensorboard", unwrap=True)  # a SummaryWriter

    def log_pictures(step: int) -> None:
        if step % cfg.log_images_every == 0:
            grid = prediction_grid(
                accelerator.unwrap_model(model), images.to(accelerator.device), seed=cfg.seed
            )  # (H, W, 3) uint8
            tracker.add_image("mpp/predictions", grid, step, dataformats="HWC")

    return log_pictures


def feature_monitor(cfg: PretrainConfig, run, model, labelled):
    """on_step callback: every --eval-every-steps, k-NN and 10-shot linear accuracy of the frozen
    encoder on --eval-dataset, logged as eval_knn20_{cls,mean} / eval_linear_10shot_{cls,mean} (watching an
    unlabelled run)."""
    if labelled is None or not run.accelerator.is_main_process:
        return None
    from mpp.evaluation.probes import frozen_feature_report

    def evaluate(step: int) -> None:
        if step % cfg.eval_every_steps == 0:
            encoder = run.accelerator.unwrap_model(model).encoder
            report = frozen_feature_report(
                encoder,
                *labelled,
                encoder.pretrained_cfg["mean"],
                encoder.pretrained_cfg["std"],
                shots=(10,),
                draws=3,
                seed=cfg.seed,
            )
            write_record(run, {"step": step, **{f"eval_{k}": v for k, v in report.items() if not k.endswith("_std")}})

    return evaluate


def load_monitor_data(cfg: PretrainConfig):
    """(train images, train labels, test images, test labels) of --eval-dataset: 50 per class from
    its train split, the first 2,000 of its test split."""
    if not cfg.eval_dataset:
        return None
    from mpp.data.heldout import labelled_images

    try:
        train = labelled_images(cfg.eval_dataset, "train", cfg.img_size, per_class=50, seed=cfg.seed)
        test = labelled_images(cfg.eval_dataset, "test", cfg.img_size, limit=2000)
    except UsageError as e:
        raise UsageError(f"--eval-dataset needs a labelled set with train and test splits: {e}") from None
    return (*train, *test)


def pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Runs (or resumes) one pretraining run. Every process calls this."""
    import time

    started = time.perf_counter()
    validate(cfg)
    dist = init_processes(cfg.threads, cfg.compile)
    # Everything that can be wrong with the invocation is found before the run folder is made.
    set_seed(cfg.seed)  # identical initialisation on every process
    try:
        encoder = create_encoder(cfg.model, cfg.img_size, cfg.patch_size)
    except ValueError as e:
        raise UsageError(f"--model: {e}") from None
    if cfg.grad_checkpointing:
        encoder.set_grad_checkpointing(True)
    try:
        model = MPP(
            encoder,
            target=cfg.target,
            mask_ratio=cfg.mask_ratio,
            mask_probs=cfg.mask_probs,
            random_from=cfg.random_from,
            corrupt_at=cfg.corrupt_at,
            sdpa_backend=cfg.sdpa_backend,
        )
    except ValueError as e:
        raise UsageError(f"--model {cfg.model} at --img-size {cfg.img_size}: {e}") from None
    # the run's own encoder: its pooling and classifier stay out of the optimiser, as in earlier runs' checkpoints
    model.freeze_unused()
    # FP8 swaps Linear modules and keeps their parameters: the optimiser, checkpoints and the export see no change
    fp8_converted = convert_to_fp8(model.encoder, cfg.fp8, cfg.fp8_layers)
    ds, column = open_dataset(cfg, dist)
    labelled = load_monitor_data(cfg) if dist.is_main_process else None
    run = open_run_for(dist, cfg)
    accelerator = run.accelerator

    global_batch = cfg.batch_size * accelerator.num_processes * cfg.grad_accum
    peak_lr = resolve_lr(cfg, global_batch)
    optimizer = build_optimizer(model, cfg, peak_lr, accelerator.device)
    images, loader = build_loader(cfg, ds, column, accelerator, run.state)
    if cfg.streaming:
        model, optimizer = accelerator.prepare(model, optimizer)
        total_steps = cfg.max_steps
    else:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        total_steps = cfg.max_steps or optimizer_steps(cfg.epochs, len(loader), cfg.grad_accum)
    warmup = capped_warmup(cfg.warmup_steps, total_steps, accelerator.print)

    if run.resume_from:
        accelerator.load_state(str(run.resume_from))  # model, optimizer, every process's RNG states
    else:
        set_seed(cfg.seed, device_specific=True)  # different corruptions on each process

    cfg.derived = dict(
        run_dir=str(run.run_dir),
        num_processes=accelerator.num_processes,
        global_batch=global_batch,
        peak_lr=peak_lr,
        total_steps=total_steps,
        warmup_steps=warmup,
        mixed_precision=accelerator.mixed_precision,
        device=str(accelerator.device),
        mpp_version=__version__,
        torch=torch.__version__,
        num_patches=accelerator.unwrap_model(model).num_patches,
        loader_workers=default_workers(accelerator.device) if cfg.workers is None else cfg.workers,
        **({"fp8_layers_converted": fp8_converted} if cfg.fp8 != "none" else {}),
    )
    start_logging(run, cfg.to_dict())

    def mpp_step(model, batch: Batch):
        out = model(batch["pixels"].to(accelerator.device, non_blocking=True))  # (B, 3, H, W) uint8
        return out.loss, out.accuracy

    settings = LoopSettings(
        total_steps=total_steps,
        lr_at=lambda step: lr_at(step, peak_lr, warmup, total_steps, cfg.min_lr),
        clip_grad=cfg.clip_grad,
        log_every=cfg.log_every,
        checkpoint_every=cfg.checkpoint_every,
        keep_checkpoints=cfg.keep_checkpoints,
        batch_size=cfg.batch_size,
        streaming=cfg.streaming,
        progress=cfg.progress,
        desc="mpp",
        metric="masked_acc",
        max_nonfinite=cfg.max_nonfinite_steps,
        strict_data=cfg.strict_data,
        seed=cfg.seed,
        prepare_batch=device_decoder(cfg.img_size, accelerator.device) if cfg.decode == "gpu" else None,
    )
    callbacks = [c for c in (picture_logger(cfg, accelerator, model), feature_monitor(cfg, run, model, labelled)) if c]
    result = fit(
        run, model, optimizer, loader, images, mpp_step, settings, on_step=lambda step: [c(step) for c in callbacks]
    )
    if accelerator.is_main_process and not result.stopped_by:  # weights only for a finished run
        export_weights(accelerator.unwrap_model(model), cfg, run.run_dir, result.step)
    trained = result.step - run.state["step"]  # this invocation's steps (a resumed run did the rest before)
    wall = time.perf_counter() - started
    write_summary(
        run,
        result,
        {
            "wall_s": wall,
            "steps_this_run": trained,
            "images_per_sec": trained * global_batch / wall if wall > 0 else None,
        },
    )
    finish(run)
    if cfg.push_to_hub and accelerator.is_main_process and not result.stopped_by:
        publish(run.run_dir, cfg.push_to_hub, cfg.hub_private)
    return PretrainResult(run.run_dir, accelerator.unwrap_model(model), result.step, result.stopped_by)
