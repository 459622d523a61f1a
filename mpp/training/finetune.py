"""Fine-tuning a timm ViT classifier from scratch, from MPP weights or from supervised weights."""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from accelerate.utils import broadcast_object_list, extract_model_from_parallel, set_seed
from safetensors import SafetensorError
from timm.data import Mixup
from timm.optim import create_optimizer_v2

from mpp import __version__
from mpp.data.batch import Batch
from mpp.data.heldout import low_label_subset
from mpp.data.images import AugmentedImages, collate_images
from mpp.data.loader import default_workers, leave_stop_signals_to_main, training_loader
from mpp.data.sources import class_names_of, find_image_column, find_label_column, load_images
from mpp.data.transforms import timm_transform
from mpp.errors import UsageError
from mpp.models.hub_folder import hub_dataset_ids, public_path, write_model_card, write_timm_config
from mpp.models.publish import publish
from mpp.models.weights import load_encoder_weights, load_tensors, read_metadata, save_weights
from mpp.training.guards import RunError
from mpp.training.loop import LoopSettings, fit, write_summary
from mpp.training.pretrain_config import check_batch_fits, lr_at, optimizer_steps
from mpp.training.run_setup import finish, init_processes, open_run_for, start_logging
from mpp.training.schedule import capped_warmup, fused_optimizer_kwargs
from mpp.training.xla import sync_free_on_xla


@dataclass
class LabelledData:
    train: object  # datasets.Dataset
    eval: object
    image_column: str
    label_column: str
    class_names: list[str]
    test: object | None = None  # --test-split, scored once with the best-by-validation weights


def open_labelled_data(cfg, dist) -> LabelledData:
    with dist.main_process_first():
        train = load_images(cfg.dataset, cfg.train_split, cfg.dataset_config)
        evaluation = load_images(cfg.dataset, cfg.eval_split, cfg.dataset_config)
        test = load_images(cfg.dataset, cfg.test_split, cfg.dataset_config) if cfg.test_split else None
    image_column = find_image_column(train, cfg.image_column)
    label_column = find_label_column(train, cfg.label_column)
    for flag, split, ds in [("--eval-split", cfg.eval_split, evaluation), ("--test-split", cfg.test_split, test)]:
        if ds is not None and label_column not in ds.features:
            raise UsageError(f"{flag} {split} has no {label_column!r} column")
    names = class_names_of(train, label_column)
    train = low_label_subset(train, label_column, cfg.train_per_class, cfg.train_fraction, cfg.subset_seed)
    check_batch_fits(
        cfg.batch_size, dist.num_processes, len(train), f"the training split {cfg.train_split}", cfg.grad_accum
    )
    return LabelledData(train, evaluation, image_column, label_column, names, test)


def init_weights(init: str) -> tuple[dict | None, dict]:
    """(tensors or None, architecture metadata) for --init scratch | RUN_FOLDER | FILE.safetensors | timm:NAME.TAG."""
    if init == "scratch":
        return None, {}
    if init.startswith("timm:"):
        name = init[len("timm:") :]
        if not timm.is_model(name):
            raise UsageError(f"--init {init}: {name!r} is not a timm model")
        try:
            source = timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as e:  # offline, no such tag, ...
            raise UsageError(
                f"--init {init}: could not get timm's pretrained weights ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:160]})"
            ) from None
        meta = {
            "timm_model": name.split(".")[0],
            "img_size": source.patch_embed.img_size[0],
            "patch_size": source.patch_embed.patch_size[0],
            "mean": list(source.pretrained_cfg["mean"]),
            "std": list(source.pretrained_cfg["std"]),
        }
        return source.state_dict(), meta
    path = Path(init)
    if path.is_dir():  # a run folder (a timm hub folder): its model.safetensors
        if not (path / "model.safetensors").is_file():
            raise UsageError(
                f"--init {init}: a folder without model.safetensors (give a run folder or a .safetensors file)"
            )
        path = path / "model.safetensors"
    if not path.is_file():
        raise UsageError(
            f"--init {init}: no such file or folder (use scratch, a run folder, a .safetensors file or timm:NAME.TAG)"
        )
    try:
        meta, tensors = read_metadata(path), load_tensors(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"--init {init}: not a readable safetensors file ({str(e).splitlines()[0][:160]})") from None
    if "timm_model" not in meta:
        raise UsageError(
            f"--init {init}: no 'timm_model' metadata, so the architecture is unknown (files written by mpp have it)"
        )
    return tensors, meta


def build_classifier(cfg, num_classes: int):
    """The timm model to fine-tune, with the init's weights loaded (strict but for the head)."""
    tensors, meta = init_weights(cfg.init)
    name = meta.get("timm_model", cfg.model)
    patch = meta.get("patch_size", cfg.patch_size or 7)
    img_size = cfg.img_size or meta.get("img_size", 28)
    if img_size % patch:
        raise UsageError(f"--img-size {img_size} is not divisible by the patch size {patch}")
    if not timm.is_model(name):
        raise UsageError(f"--model {name!r} is not a timm model")
    model = timm.create_model(
        name,
        pretrained=False,
        num_classes=num_classes,
        img_size=img_size,
        patch_size=patch,
        drop_path_rate=cfg.resolved("drop_path"),
    )
    if tensors is not None:
        load_encoder_weights(model, tensors, f"--init {cfg.init}")
    if cfg.resolved("zero_head"):
        for head in (model.head, getattr(model, "head_dist", None)):  # DeiT distilled models have two heads
            if isinstance(head, torch.nn.Linear):
                torch.nn.init.zeros_(head.weight)
                torch.nn.init.zeros_(head.bias)
    mean = meta.get("mean", list(model.pretrained_cfg["mean"]))
    std = meta.get("std", list(model.pretrained_cfg["std"]))
    return model, dict(timm_model=name, img_size=img_size, patch_size=patch, mean=mean, std=std)


@torch.no_grad()
def top1(
    accelerator, model, loader, mean: torch.Tensor, std: torch.Tensor, predictions: dict | None = None
) -> tuple[float, int]:
    """(top-1 over the readable images, how many unreadable ones were left out). An unreadable image's
    slot holds a copy of another image (collate_images) and must not be scored twice. Given a dict,
    `predictions` gets each image's 'predictions', 'labels' and 'scored' (readable) in the split's order."""
    model.eval()
    correct = total = left_out = 0
    kept = []
    for batch in loader:
        x = (batch["pixels"].float() / 255 - mean) / std
        pred = model(x).argmax(1)
        pred, labels, valid = accelerator.gather_for_metrics((pred, batch["labels"], batch["valid"]))  # (B,) each
        correct += ((pred == labels) & valid).sum().item()
        total += valid.sum().item()
        left_out += (~valid).sum().item()
        if predictions is not None:
            kept.append((pred.cpu(), labels.cpu(), valid.cpu()))
    if predictions is not None:
        for key, column in zip(("predictions", "labels", "scored"), zip(*kept)):
            predictions[key] = torch.cat(column).tolist()
    return correct / max(1, total), left_out


def plain_model(model) -> torch.nn.Module:
    """The timm model under accelerate's wrappers and torch.compile's (whose state_dict keys carry `_orig_mod.`)."""
    return extract_model_from_parallel(model, keep_torch_compile=False)


def save_classifier(path: Path, model, metadata: dict) -> None:
    """The classifier's weights under timm's own keys (a valid --init and load_backbone file), compiled or not."""
    save_weights(path, plain_model(model).state_dict(), metadata)


def card_metrics(cfg, results: dict) -> dict:
    """The card's top-1 rows, each naming the weights it scores: model.safetensors is what the folder loads
    (with --test-split the best validation epoch's weights, last.safetensors the last ones; without, the last)."""
    if "test_top1" in results:
        best = f"model.safetensors: the best {cfg.eval_split} epoch's weights (epoch {results['best_epoch']})"
        return {
            f"top-1 on {cfg.test_split}, {best}": results["test_top1"],
            f"top-1 on {cfg.eval_split}, {best}": results["best_val_top1"],
            f"top-1 on {cfg.eval_split}, last.safetensors: the last weights": results["final_top1"],
        }
    return {
        f"top-1 on {cfg.eval_split}, model.safetensors: the last weights": results["final_top1"],
        f"top-1 on {cfg.eval_split}, the best evaluated epoch (its weights are not kept; --test-split keeps them)": (
            results["best_top1"]
        ),
    }


def write_finetuning_card(run_dir: Path, cfg, arch: dict, results: dict) -> None:
    """README.md of a fine-tuned run (with timm's config.json and model.safetensors: a timm hub folder)."""
    metrics = card_metrics(cfg, results)
    write_model_card(
        run_dir,
        title=f"{arch['timm_model']}, fine-tuned on {Path(cfg.dataset).name}",
        summary=f"A timm `{arch['timm_model']}` classifier fine-tuned on `{public_path(cfg.dataset)}` from "
        f"`{public_path(cfg.init)}`.",
        facts={
            "timm model": f"`{arch['timm_model']}`",
            "image size / patch": f"{arch['img_size']} / {arch['patch_size']}",
            "initialised from": f"`{public_path(cfg.init)}`",
            "steps": results["steps"],
            "training images": results["train_images"],
            "preset": cfg.preset,
            "data": f"`{public_path(cfg.dataset)}` (train: {cfg.train_split}, evaluated: {cfg.eval_split}"
            + (f", test: {cfg.test_split})" if cfg.test_split else ")"),
        },
        metrics=metrics,
        tags=["timm", "image-classification", "vision-transformer"],
        datasets=hub_dataset_ids(cfg.dataset),
        use=[
            'label = model.pretrained_cfg["label_names"][model(x).argmax(1).item()]  # the class names of config.json'
        ],
        note="The classifier of the label names in `config.json`, with the weights the metrics above name "
        "(`model.safetensors`); `num_classes=0` gives features only, `num_classes=N` a fresh head for another task.",
    )


def eval_history(metrics_files: list[Path], last_step: int) -> list[dict]:
    """The held-out evaluations logged in metrics.jsonl files up to last_step, one per epoch (the last
    logged wins: a run resumed at an epoch's end evaluates that epoch again), oldest first. A resumed
    run starts from these, so results.json covers the evaluations before the resume too."""
    by_epoch = {}
    for path in metrics_files:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            if "eval_top1" in record and record["step"] <= last_step:
                by_epoch[record["epoch"]] = {
                    "epoch": record["epoch"],
                    "step": record["step"],
                    "top1": record["eval_top1"],
                }
    return sorted(by_epoch.values(), key=lambda h: h["epoch"])


def earlier_run_dir(run) -> Path | None:
    """The run folder of the checkpoint resumed from, when that is another folder than this run's."""
    if run.resume_from is None:
        return None
    source = Path(run.resume_from).resolve().parent.parent  # RUN/checkpoints/step_N
    return None if source == Path(run.run_dir).resolve() else source


def score_best_on_test(
    accelerator,
    model,
    test_loader,
    best_file: Path,
    history: list[dict],
    final: float,
    epoch: int,
    step: int,
    keep_if_best,
    mean,
    std,
) -> dict:
    """Model selection on the validation split, one score on the test split: the final evaluation is the
    last candidate; the best-by-validation weights (best.safetensors) are loaded and scored once."""
    keep_if_best(epoch, step, final, history)
    candidates = history + [{"epoch": epoch, "step": step, "top1": final}]
    best = max(candidates, key=lambda h: h["top1"])  # the first of equals, as keep_if_best keeps it
    accelerator.wait_for_everyone()  # best.safetensors is written by the main process
    saved = read_metadata(best_file) if best_file.is_file() else {}
    if saved.get("steps") != best["step"]:
        raise RunError(
            f"{best_file} holds step {saved.get('steps')}, but the best validation top-1 was at step {best['step']} "
            "(a resume that did not repeat the run exactly?); no test score without the selected weights"
        )
    plain_model(model).load_state_dict(load_tensors(best_file))
    predictions = {}
    test, left_out = top1(accelerator, model, test_loader, mean, std, predictions)
    return {
        "best_val_top1": best["top1"],
        "best_epoch": best["epoch"],
        "best_step": best["step"],
        "test_top1": test,
        "test_unreadable": left_out,
        "test_predictions": predictions,
    }


def held_out_loader(
    ds, data: LabelledData, img_size: int, cfg, workers: int, device: torch.device
) -> torch.utils.data.DataLoader:
    """A held-out split in order, un-augmented (resized and centre-cropped), its workers kept for the many
    evaluations."""
    images = AugmentedImages(ds, data.image_column, timm_transform(img_size, False), cfg.seed, data.label_column)
    # its own generator: each pass draws a base seed, and from the global RNG that draw would land inside
    # a training image's seeded augmentation running in torch_xla's loader thread (data.dataset.seeded)
    return torch.utils.data.DataLoader(
        images,
        batch_size=max(cfg.batch_size, 256),
        collate_fn=collate_images,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        worker_init_fn=leave_stop_signals_to_main,
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def finetune(cfg) -> dict:
    """Runs (or resumes) one fine-tuning run; returns results.json's content. Every process calls this."""
    from mpp.training.finetune_config import validate_finetune

    validate_finetune(cfg)
    dist = init_processes(cfg.threads, cfg.compile)
    set_seed(cfg.seed)
    data = open_labelled_data(cfg, dist)
    model, arch = build_classifier(cfg, len(data.class_names))
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    run = open_run_for(dist, cfg)
    accelerator = run.accelerator

    global_batch = cfg.batch_size * accelerator.num_processes * cfg.grad_accum
    peak_lr = cfg.resolved("lr")
    opt_kwargs = (
        {"momentum": 0.9}
        if cfg.resolved("opt") in ("momentum", "sgd")
        else fused_optimizer_kwargs(cfg.resolved("opt"), accelerator.device)
    )
    optimizer = create_optimizer_v2(
        model,
        opt=cfg.resolved("opt"),
        lr=peak_lr,
        weight_decay=cfg.resolved("weight_decay"),
        layer_decay=cfg.resolved("layer_decay"),
        **opt_kwargs,
    )
    optimizer = sync_free_on_xla(optimizer, accelerator.device)
    workers = default_workers(accelerator.device) if cfg.workers is None else cfg.workers
    train_images = AugmentedImages(
        data.train,
        data.image_column,
        timm_transform(arch["img_size"], True, cfg.crop_scale, cfg.hflip, cfg.resolved("auto_augment")),
        cfg.seed,
        data.label_column,
    )

    train_loader = training_loader(
        train_images, cfg.batch_size, cfg.seed, workers, accelerator.device, collate_images, accelerator.num_processes
    )
    model, optimizer, train_loader, eval_loader = accelerator.prepare(
        model,
        optimizer,
        train_loader,
        held_out_loader(data.eval, data, arch["img_size"], cfg, workers, accelerator.device),
    )
    test_loader = (
        accelerator.prepare(held_out_loader(data.test, data, arch["img_size"], cfg, workers, accelerator.device))
        if data.test is not None
        else None
    )
    total_steps = cfg.max_steps or optimizer_steps(cfg.epochs, len(train_loader), cfg.grad_accum)
    warmup = capped_warmup(cfg.resolved("warmup_steps"), total_steps, accelerator.print)
    if run.resume_from:
        accelerator.load_state(str(run.resume_from))
    else:
        set_seed(cfg.seed, device_specific=True)

    cfg.derived = dict(
        run_dir=str(run.run_dir),
        num_processes=accelerator.num_processes,
        global_batch=global_batch,
        total_steps=total_steps,
        warmup_steps=warmup,
        train_images=len(data.train),
        eval_images=len(data.eval),
        **({"test_images": len(data.test)} if data.test is not None else {}),
        num_classes=len(data.class_names),
        mpp_version=__version__,
        **arch,
    )
    start_logging(run, cfg.to_dict())

    mean = torch.tensor(arch["mean"], device=accelerator.device).view(1, -1, 1, 1)
    std = torch.tensor(arch["std"], device=accelerator.device).view(1, -1, 1, 1)
    mixing = cfg.resolved("mixup") > 0 or cfg.resolved("cutmix") > 0
    mixup = (
        Mixup(
            mixup_alpha=cfg.resolved("mixup"),
            cutmix_alpha=cfg.resolved("cutmix"),
            label_smoothing=cfg.resolved("label_smoothing"),
            num_classes=len(data.class_names),
        )
        if mixing
        else None
    )

    def classify_step(model, batch: Batch):
        x = (batch["pixels"].float() / 255 - mean) / std  # (B, 3, H, W)
        y = batch["labels"]
        if mixup is not None:
            x, soft = mixup(x, y)  # soft targets (B, K), label smoothing included
            logits = model(x)
            loss = torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        else:
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.resolved("label_smoothing"))
        return loss, (logits.argmax(1) == y).float().mean()

    # evaluations before a resume: from this run's metrics.jsonl (trimmed to the resume step) and,
    # resuming another folder's checkpoint, from that folder's (its best weights come along)
    earlier = earlier_run_dir(run)
    if accelerator.is_main_process and earlier and cfg.test_split and (earlier / "best.safetensors").is_file():
        if not (run.run_dir / "best.safetensors").exists():
            shutil.copyfile(earlier / "best.safetensors", run.run_dir / "best.safetensors")
    metrics_files = ([earlier / "metrics.jsonl"] if earlier else []) + [run.run_dir / "metrics.jsonl"]
    history = broadcast_object_list(
        [eval_history(metrics_files, run.state["step"]) if accelerator.is_main_process else None]
    )[0]
    weights_meta = {
        **arch,
        "num_classes": len(data.class_names),
        "class_names": data.class_names,
        "init": public_path(cfg.init),
        "mpp_version": __version__,
    }
    best_file = run.run_dir / "best.safetensors"

    def keep_if_best(epoch: int, step: int, score: float, others: list[dict]) -> None:
        """--test-split: the weights of each new best validation top-1 go to best.safetensors."""
        if cfg.test_split and accelerator.is_main_process and score > max((h["top1"] for h in others), default=-1.0):
            save_classifier(best_file, model, {**weights_meta, "steps": step, "epoch": epoch, "val_top1": score})

    def evaluate(epoch: int, step: int) -> dict | None:
        if (epoch + 1) % cfg.eval_every:
            return None
        score, _ = top1(accelerator, model, eval_loader, mean, std)
        history[:] = [h for h in history if h["epoch"] != epoch]  # evaluated again after a resume at its end
        keep_if_best(epoch, step, score, history)
        history.append({"epoch": epoch, "step": step, "top1": score})
        return {"eval_top1": score}

    settings = LoopSettings(
        total_steps=total_steps,
        lr_at=lambda step: lr_at(step, peak_lr, warmup, total_steps, cfg.min_lr),
        clip_grad=cfg.resolved("clip_grad"),
        log_every=cfg.log_every,
        checkpoint_every=cfg.checkpoint_every,
        keep_checkpoints=cfg.keep_checkpoints,
        batch_size=cfg.batch_size,
        progress=cfg.progress,
        desc="finetune",
        metric="train_acc",
        max_nonfinite=cfg.max_nonfinite_steps,
        strict_data=cfg.strict_data,
        seed=cfg.seed,
    )
    result = fit(run, model, optimizer, train_loader, train_images, classify_step, settings, on_epoch_end=evaluate)
    if result.stopped_by:
        write_summary(run, result)
        finish(run)
        return {"stopped_by": result.stopped_by, "steps": result.step}
    final, left_out = top1(accelerator, model, eval_loader, mean, std)
    results = {
        "final_top1": final,
        "best_top1": max([final] + [h["top1"] for h in history]),
        "init": cfg.init,
        "steps": result.step,
        "train_images": len(data.train),
        "eval_images": len(data.eval),
        "eval_unreadable": left_out,
        "history": history,
        "config": cfg.to_dict(),
    }
    # the folder's model.safetensors is what the card's test top-1 describes: with --test-split the selected
    # (best validation) weights, the last ones beside it in last.safetensors
    if accelerator.is_main_process:
        save_classifier(
            run.run_dir / ("last.safetensors" if cfg.test_split else "model.safetensors"),
            model,
            {**weights_meta, "steps": result.step},
        )
    if cfg.test_split:
        last_epoch = (
            train_images.epoch if result.step > run.state["step"] else run.state["epoch"]
        )  # no step: a finished run
        results.update(
            score_best_on_test(
                accelerator,
                model,
                test_loader,
                best_file,
                history,
                final,
                last_epoch,
                result.step,
                keep_if_best,
                mean,
                std,
            )
        )
        results["test_images"] = len(data.test)
        predictions = results.pop("test_predictions")
        if accelerator.is_main_process:  # per image, for intervals over test images as well as seeds
            (run.run_dir / "test_predictions.json").write_text(json.dumps(predictions))
            save_weights(run.run_dir / "model.safetensors", load_tensors(best_file), read_metadata(best_file))
    if accelerator.is_main_process:
        (run.run_dir / "results.json").write_text(json.dumps(results, indent=2))
        write_timm_config(run.run_dir, plain_model(model), weights_meta, label_names=[str(c) for c in data.class_names])
        write_finetuning_card(run.run_dir, cfg, arch, results)
        accelerator.print(
            f"top-1 on {cfg.eval_split}: final {final:.4f}, best {results['best_top1']:.4f}"
            + (f" ({left_out} unreadable images left out)" if left_out else "")
            + (
                f"; on {cfg.test_split} with the best epoch's weights ({results['best_epoch']}, now model.safetensors; "
                f"the last weights are last.safetensors): {results['test_top1']:.4f}"
                if cfg.test_split
                else ""
            )
        )
    write_summary(run, result, {"final_top1": final})
    finish(run)
    if cfg.push_to_hub and accelerator.is_main_process:
        publish(run.run_dir, cfg.push_to_hub, cfg.hub_private)
    return results
