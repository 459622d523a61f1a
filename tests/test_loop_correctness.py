"""Silent loop defects: weight decay groups, optimiser step counting under gradient
accumulation, which examples a resumed streaming run reads, and RandAugment under per-batch seeding."""

import numpy as np
import pytest
import torch

from mpp.models.model import MPP, create_encoder
from mpp.training import pretrain as train
from mpp.training.pretrain_config import PretrainConfig


def tiny_images(path, n: int, size: int = 28):
    """n small RGB images saved with save_to_disk; image i is filled with colour (i, i // 256, 7)."""
    from datasets import Dataset, Image
    from PIL import Image as PILImage

    images = [PILImage.new("RGB", (size, size), (i % 256, i // 256, 7)) for i in range(n)]
    Dataset.from_dict({"image": images, "index": list(range(n))}).cast_column("image", Image()).save_to_disk(str(path))
    return path


# --- no weight decay on embeddings (#2) ---


def decay_of(optimizer, model) -> dict[str, float]:
    """parameter name -> the weight decay of the optimiser group that holds it."""
    group_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    return {name: group_of[id(p)] for name, p in model.named_parameters() if p.requires_grad}


def expected_decay(model: MPP, weight_decay: float) -> dict[str, float]:
    """timm's rule, stated independently: no decay on 1-d tensors (biases, norms, mask token) and on
    the encoder's own no_weight_decay() names (position embedding, class and register tokens)."""
    embeddings = {f"encoder.{n}" for n in model.encoder.no_weight_decay()} | {"mask_token"}
    return {
        name: 0.0 if p.ndim <= 1 or name in embeddings else weight_decay
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def test_optimiser_decays_no_embeddings():
    model = MPP(create_encoder("test_vit", 28, 7, reg_tokens=2))
    cfg = PretrainConfig(weight_decay=0.05)
    got = decay_of(train.build_optimizer(model, cfg, 1e-3, torch.device("cpu")), model)
    assert got == expected_decay(model, 0.05)
    for name in ("encoder.pos_embed", "encoder.cls_token", "encoder.reg_token", "mask_token"):
        assert got[name] == 0.0, name
    assert got["encoder.blocks.0.attn.qkv.weight"] == 0.05 and got["head.1.weight"] == 0.05


def test_pretraining_builds_its_optimiser_without_decay_on_embeddings(tmp_path, monkeypatch):
    """The wiring: the optimiser pretrain() actually trains with."""
    built = []

    def recording(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    real = train.build_optimizer
    monkeypatch.setattr(train, "build_optimizer", recording)
    cfg = PretrainConfig(
        dataset=str(tiny_images(tmp_path / "data", 16)),
        model="test_vit",
        img_size=28,
        patch_size=7,
        batch_size=8,
        max_steps=1,
        warmup_steps=0,
        progress=False,
        output_dir=str(tmp_path / "run"),
        workers=0,
    )
    result = train.pretrain(cfg)
    assert len(built) == 1
    got = decay_of(built[0], result.model)
    assert got == expected_decay(result.model, cfg.weight_decay)
    assert got["encoder.pos_embed"] == got["encoder.cls_token"] == got["mask_token"] == 0.0


# --- optimiser steps under gradient accumulation (#1) ---


def test_optimiser_steps_count_each_epochs_short_last_accumulation():
    from mpp.training.pretrain_config import optimizer_steps

    assert optimizer_steps(3, 6, 4) == 6  # 2 steps an epoch: 4 micro-batches, then the epoch's last 2
    assert optimizer_steps(30, 6, 4) == 60
    assert optimizer_steps(2, 8, 4) == 4 and optimizer_steps(1, 5, 1) == 5
    assert optimizer_steps(0.5, 30, 3) == 5 and optimizer_steps(0.1, 30, 1) == 3


class Rows(torch.utils.data.Dataset):
    """Rows of a regression problem as fit() expects them (a "pixels" tensor, a "bad" list)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def collate_rows(items):
    return {"pixels": torch.stack([x for x, _ in items]), "y": torch.stack([y for _, y in items]), "bad": []}


def test_each_optimiser_step_is_the_mean_gradient_of_its_own_micro_batches(tmp_path):
    """6 micro-batches an epoch with --grad-accum 4: steps after micro-batches 1-4 and 5-6, each with
    the gradient of the mean loss of its micro-batches (plain SGD, checked against torch by hand)."""
    from accelerate import Accelerator

    from mpp.training.loop import LoopSettings, fit
    from mpp.training.pretrain_config import optimizer_steps
    from mpp.training.run_setup import FRESH_STATE, Run

    torch.manual_seed(0)
    x, y = torch.randn(12, 3), torch.randn(12, 2)
    model = torch.nn.Linear(3, 2)
    start = [p.detach().clone() for p in model.parameters()]
    lr, epochs = 0.1, 2
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
    loader = torch.utils.data.DataLoader(
        Rows(x, y), batch_size=2, shuffle=False, drop_last=True, collate_fn=collate_rows
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    total = optimizer_steps(epochs, len(loader), 4)
    assert total == 4

    def step_fn(model, batch):
        loss = torch.nn.functional.mse_loss(model(batch["pixels"]), batch["y"])
        return loss, loss.detach()

    settings = LoopSettings(
        total_steps=total,
        lr_at=lambda step: lr,
        clip_grad=0,
        log_every=100,
        checkpoint_every=100,
        keep_checkpoints=1,
        batch_size=2,
        progress=False,
        max_nonfinite=0,
    )
    result = fit(
        Run(accelerator, tmp_path, None, dict(FRESH_STATE)), model, opt, loader, loader.dataset, step_fn, settings
    )
    assert result.step == total

    reference = torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p, p0 in zip(reference.parameters(), start):
            p.copy_(p0)
    for _ in range(epochs):
        for rows in (slice(0, 8), slice(8, 12)):  # micro-batches 1-4, then 5-6
            micro = [
                torch.nn.functional.mse_loss(reference(x[i : i + 2]), y[i : i + 2])
                for i in range(rows.start, rows.stop, 2)
            ]
            grads = torch.autograd.grad(torch.stack(micro).mean(), list(reference.parameters()))
            with torch.no_grad():
                for p, g in zip(reference.parameters(), grads):
                    p -= lr * g
    for p, q in zip(accelerator.unwrap_model(model).parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6)


def test_pretraining_with_grad_accum_runs_the_epochs_asked_for(tmp_path):
    """96 images, batch 16, --grad-accum 4: 6 micro-batches = 2 optimiser steps an epoch, 6 in 3 epochs."""
    import json

    cfg = PretrainConfig(
        dataset=str(tiny_images(tmp_path / "data", 96)),
        model="test_vit",
        img_size=28,
        patch_size=7,
        batch_size=16,
        grad_accum=4,
        epochs=3,
        warmup_steps=0,
        log_every=1,
        checkpoint_every=100,
        progress=False,
        output_dir=str(tmp_path / "run"),
        workers=0,
    )
    result = train.pretrain(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 6 and cfg.derived["total_steps"] == 6
    assert [(r["step"], r["epoch"]) for r in records] == [(1, 0), (2, 0), (3, 1), (4, 1), (5, 2), (6, 2)]


def test_a_loader_shorter_than_one_accumulation_is_refused(tmp_path, refused, capsys):
    from mpp.commands.finetune import parse_config as parse_finetune_config
    from mpp.commands.pretrain import parse_config
    from mpp.training.finetune import finetune

    data = str(tiny_images(tmp_path / "data", 16))
    capsys.readouterr()  # the dataset's progress bar
    line = refused(
        lambda a: train.pretrain(parse_config(a)),
        ["--dataset", data, "--model", "test_vit", "--batch-size", "8", "--grad-accum", "4"],
    )
    assert "--grad-accum 4 is more than the 2 batches of 8 per process" in line
    line = refused(
        lambda a: finetune(parse_finetune_config(a)),
        [
            "--dataset",
            "mnist5k",
            "--eval-split",
            "train",
            "--train-per-class",
            "2",
            "--batch-size",
            "8",
            "--grad-accum",
            "4",
        ],
    )
    assert "--grad-accum 4 is more than the 2 batches of 8 per process" in line


# --- RandAugment under per-batch seeding (#7) ---


def test_randaugment_depends_only_on_the_batch_seed():
    """The modern preset's transform (timm RandAugment draws from numpy's global RNG) gives the same
    image for the same seed whatever numpy's global state, another for another seed, and seeded()
    leaves every global RNG as it found it."""
    import random

    from PIL import Image as PILImage

    from mpp.data.images import seeded
    from mpp.data.transforms import timm_transform
    from mpp.training.finetune_config import PRESETS

    tf = timm_transform(28, True, auto_augment=PRESETS["modern"]["auto_augment"])
    image = PILImage.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8))
    seeds = range(8)
    outputs = []
    for prior in (1, 2):
        np.random.seed(prior)
        np.random.rand(prior)  # workers and earlier batches leave numpy's global RNG anywhere
        outputs.append([seeded(tf, image, s) for s in seeds])
    assert all(torch.equal(a, b) for a, b in zip(*outputs))
    assert len({bytes(x.numpy()) for x in outputs[0]}) == len(seeds)

    before = random.getstate(), np.random.get_state(), torch.get_rng_state()
    seeded(tf, image, 3)
    after = random.getstate(), np.random.get_state(), torch.get_rng_state()
    assert before[0] == after[0] and torch.equal(before[2], after[2])
    assert all(np.array_equal(a, b) for a, b in zip(before[1], after[1]))


# --- which examples a resumed streaming run reads (#3) ---


@pytest.fixture(scope="module")
def parquet_stream(tmp_path_factory):
    """150 images in 4 parquet files of unequal size (4 shards: workers get unequal shares and run
    out at different times); image i is filled with colour (i, i // 256, 7)."""
    from datasets import load_from_disk

    root = tmp_path_factory.mktemp("stream")
    ds = load_from_disk(str(tiny_images(root / "all", 150)))
    for k, (lo, hi) in enumerate([(0, 44), (44, 80), (80, 124), (124, 150)]):
        ds.select(range(lo, hi)).to_parquet(str(root / f"part{k}.parquet"))
    return str(root / "part*.parquet")


def stream_loader(data: str, workers: int, run_state: dict | None = None):
    """The streaming (images, loader) pair exactly as pretrain() builds it, on one process."""
    from types import SimpleNamespace

    from mpp.data.sources import find_image_column, load_images

    cfg = PretrainConfig(
        dataset=data, streaming=True, max_steps=100, batch_size=8, workers=workers, img_size=28, seed=3
    )
    ds = load_images(cfg.dataset, cfg.split, streaming=True)
    fake = SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1)
    return train.build_loader(cfg, ds, find_image_column(ds), fake, run_state)


def read_epoch(images, loader, epoch: int, batches: int | None = None) -> list[tuple[int, ...]]:
    """The image indices of each batch the loop would get in `epoch` (the first `batches` of them)."""
    images.set_epoch(epoch)
    loader.set_epoch(epoch)
    out = []
    for batch in loader:
        pixels = batch["pixels"]  # (B, 3, H, W): each image is one colour, cropping and flipping keep it
        out.append(tuple((pixels[:, 0, 0, 0].long() + 256 * pixels[:, 1, 0, 0].long()).tolist()))
        if len(out) == batches:
            break
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_reads_what_the_uninterrupted_run_reads(parquet_stream, workers, monkeypatch):
    """Interrupted in epoch 0, in epoch 1, and after a worker ran out of shards: the resumed loader
    yields the uninterrupted run's remaining batches, in order, and then the next epoch's."""
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)  # 5 s at every parquet stream's end
    full = [read_epoch(*stream_loader(parquet_stream, workers), epoch) for epoch in (0, 1, 2)]  # a fresh loader each
    for epoch in (0, 1, 2):
        indices = [i for batch in full[epoch] for i in batch]
        assert len(indices) == len(set(indices)) > 150 - 8 * max(1, workers)  # each image once, but drop_last's rest
    assert full[0] != full[1]  # each epoch is shuffled anew
    for epoch, stop in [(0, 4), (1, 5), (1, len(full[1]) - 1)]:  # the last: one worker has run out of shards
        images, loader = stream_loader(parquet_stream, workers)
        read = (
            read_epoch(images, loader, epoch, stop)
            if epoch == 0
            else (read_epoch(images, loader, 0), read_epoch(images, loader, 1, stop))[1]
        )
        assert read == full[epoch][:stop]
        state = {"step": 99, "epoch": epoch, "batches_in_epoch": stop, "bad_images": 0, **loader.position()}
        if workers and stop == len(full[1]) - 1:
            first, second = state["stream_worker_batches"]
            assert abs(first - second) > 1  # the turn order has skipped a worker that ran out
        images, loader = stream_loader(parquet_stream, workers, state)
        assert read_epoch(images, loader, epoch) == full[epoch][stop:], (epoch, stop)
        assert read_epoch(images, loader, epoch + 1) == full[epoch + 1]
