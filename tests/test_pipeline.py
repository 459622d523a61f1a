"""The training data pipeline: workers that live across epochs keep exact augmentation and
resume; JPEG draft decoding keeps torchvision's crop boxes and flips; the --decode gpu path (run here on
the CPU through the same code) gives the CPU path's crops; --decode gpu is refused without CUDA."""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from torchvision.transforms import v2

from mpp.commands.pretrain import parse_config
from mpp.data.augment import (
    CropBox,
    CropFlip,
    EncodedCrop,
    crop_batch,
    crop_tensor,
    decode_deferred,
    decode_jpeg_rgb,
    draft_jpeg,
)
from mpp.data.images import collate_images, seeded
from mpp.data.loader import EpochBatches, default_workers
from mpp.data.sources import load_images
from mpp.errors import UsageError
from mpp.training.loop import epoch_batches_of
from mpp.training.pretrain import build_loader, device_decoder
from mpp.training.pretrain_config import PretrainConfig


def photo(seed: int, size=(320, 240)) -> Image.Image:
    """A smooth colour picture (a crop of a scikit-image photograph, resized): JPEG-like content."""
    from skimage import data

    base = [data.astronaut(), data.chelsea(), data.coffee()][seed % 3]
    rng = np.random.default_rng(seed)
    top, left = rng.integers(0, 100, 2)
    return Image.fromarray(base[top : top + 280, left : left + 280]).resize(size)


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """24 JPEGs of 320x240 and 240x320 in an imagefolder."""
    root = tmp_path_factory.mktemp("jpegs")
    (root / "all").mkdir()
    for i in range(24):
        photo(i, (320, 240) if i % 2 else (240, 320)).save(root / "all" / f"{i:03d}.jpg", quality=90)
    return str(root)


def reference(image: Image.Image, size: int, scale, seed: int) -> torch.Tensor:
    """Today's pipeline before this change, kept as the reference: torchvision v2 on the decoded image."""
    tf = v2.Compose([v2.RandomResizedCrop(size, scale=scale, antialias=True), v2.RandomHorizontalFlip(0.5)])
    out = seeded(tf, image, seed)
    return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1)


def test_crop_boxes_and_flips_are_torchvisions_draws():
    """Same seed -> the same box and flip as v2.RandomResizedCrop + v2.RandomHorizontalFlip, so the
    augmentation's distribution is unchanged; and full decoding gives torchvision's pixels bit for bit."""
    image = photo(0)
    tf = CropFlip(32, (0.35, 1.0), fast=False)
    flips = 0
    for seed in range(20):
        ours = seeded(tf, image, seed)
        assert torch.equal(ours, reference(image, 32, (0.35, 1.0), seed)), seed
        box = seeded(lambda _: tf.sample(240, 320), None, seed)
        params = seeded(
            lambda _: v2.RandomResizedCrop(32, scale=(0.35, 1.0)).make_params([torch.empty(3, 240, 320)]), None, seed
        )
        assert (box.top, box.left, box.height, box.width) == (
            params["top"],
            params["left"],
            params["height"],
            params["width"],
        )
        flips += box.flip
    assert 3 < flips < 17  # both ways happen


def test_draft_decoding_keeps_the_crop_and_loses_little():
    """A JPEG opened but not decoded: draft decodes at a reduced DCT scale when the crop is at least twice
    the output, and the result stays close to decoding the whole image (levels of 255)."""
    data = jpeg_bytes(photo(1, (640, 480)))
    full, drafted, reduced = CropFlip(32, fast=False), CropFlip(32, fast=True), 0
    diffs = []
    for seed in range(12):
        a = seeded(full, Image.open(io.BytesIO(data)), seed)
        b = seeded(drafted, Image.open(io.BytesIO(data)), seed)
        opened = Image.open(io.BytesIO(data))
        box = seeded(lambda _: drafted.sample(480, 640), None, seed)
        reduced += draft_jpeg(opened, box, 32) is not None
        diffs.append((a.float() - b.float()).abs().mean().item())
    assert reduced >= 10  # crops of >= 35% of 640x480 are >= 4x the output: the draft path is taken
    assert max(diffs) < 2.0 and np.mean(diffs) < 1.5, diffs  # mean absolute difference per pixel (measured 0.8-1.3)


def ramp_jpeg(width: int, height: int) -> bytes:
    """A JPEG whose red rises from 0 to 255 left to right and whose green rises top to bottom."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return jpeg_bytes(Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8)), quality=95)


@pytest.mark.parametrize("width, height", [(333, 251), (517, 389), (255, 201)])
def test_draft_decoding_keeps_the_crop_where_it_is_on_odd_sizes(width, height):
    """libjpeg's image at 1/s scale is exactly 1/s of the full one (its pixel i averages full pixels [i s, (i + 1) s));
    on sizes that are not multiples of s, mapping the box by reduced size / full size shifted every crop toward the
    bottom right. On a ramp the mean difference to the pil path (the whole image decoded) is that shift times the
    slope: measured here in full-size pixels (0.47-1.42 px with the old map, under 0.02 with the exact one)."""
    data = ramp_jpeg(width, height)
    full, drafted = (
        CropFlip(32, hflip=0, fast=False),
        CropFlip(32, hflip=0, fast=True),
    )  # no flip: a flip reverses the ramp
    differences, reduced = [], 0
    for seed in range(24):
        a = seeded(full, Image.open(io.BytesIO(data)), seed).float()
        b = seeded(drafted, Image.open(io.BytesIO(data)), seed).float()
        box = seeded(lambda _: drafted.sample(height, width), None, seed)
        reduced += bool(draft_jpeg(Image.open(io.BytesIO(data)), box, 32))
        differences.append(b - a)  # (3, 32, 32)
    d = torch.stack(differences)
    shift_x, shift_y = d[:, 0].mean() / (255 / (width - 1)), d[:, 1].mean() / (255 / (height - 1))  # full-size pixels
    assert reduced >= 20  # the draft path is the one measured
    assert abs(shift_x) < 0.1 and abs(shift_y) < 0.1, (shift_x, shift_y)
    assert d.abs().mean() < 1.0


def test_draft_never_decodes_below_the_output_resolution():
    data = jpeg_bytes(photo(2, (640, 480)))
    tf = CropFlip(200, fast=True)
    for seed in range(10):
        opened = Image.open(io.BytesIO(data))
        box = seeded(lambda _: tf.sample(480, 640), None, seed)
        if draft_jpeg(opened, box, 200):
            scale = opened.size[0] / 640
            assert min(box.height, box.width) * scale >= 200 - 1e-6


def epochs_of(loader, images, epochs):
    """The batches of each epoch, one loader pass per epoch (EpochBatches.span off)."""
    out = []
    epoch_batches_of(loader).span = False
    for epoch in epochs:
        images.set_epoch(epoch)
        loader.set_epoch(epoch)
        out.append([b["pixels"].clone() for b in loader])
    return out


def spanned(loader, epoch: int, count: int, skip: int = 0):
    """`count` batches of one pass that starts in `epoch` (after `skip` batches), as the training loop reads them."""
    import itertools

    from accelerate.data_loader import skip_first_batches

    epoch_batches_of(loader).span = True
    loader.set_epoch(epoch)
    epoch_batches_of(loader).set_epoch(epoch)
    source = skip_first_batches(loader, skip) if skip else loader
    return [b["pixels"].clone() for b in itertools.islice(iter(source), count)]


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def loader_for(jpeg_folder, accelerator, workers: int, decode: str = "cpu", img_size: int = 32):
    cfg = PretrainConfig(
        dataset=jpeg_folder,
        img_size=img_size,
        batch_size=4,
        workers=workers,
        seed=5,
        decode="cpu" if decode == "gpu" else decode,
    )
    ds = load_images(jpeg_folder)
    images, loader = build_loader(cfg, ds, "image", accelerator)
    images.defer = decode == "gpu"
    return images, accelerator.prepare(loader)


def test_persistent_workers_augment_each_epoch_as_fresh_ones_would(jpeg_folder, accelerator):
    """Workers that live across epochs (the dataset copy of epoch 0) still see each epoch's seeds: the
    same batches as reading in the main process; epochs differ. One pass across epochs (the loop's
    way: no reset, no wait at an epoch start) gives the same batches; a resume mid-epoch skips into it."""
    images, loader = loader_for(jpeg_folder, accelerator, workers=2)
    assert (
        loader.base_dataloader.persistent_workers if hasattr(loader, "base_dataloader") else loader.persistent_workers
    )
    with_workers = epochs_of(loader, images, [0, 1, 2])
    images0, loader0 = loader_for(jpeg_folder, accelerator, workers=0)
    in_process = epochs_of(loader0, images0, [0, 1, 2])
    for a, b in zip(with_workers, in_process):
        assert len(a) == len(b) == 6 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(with_workers[0][0], with_workers[1][0])
    flat = [x for epoch in with_workers for x in epoch]
    one_pass = spanned(loader, 0, 18)
    assert all(torch.equal(x, y) for x, y in zip(one_pass, flat)) and len(one_pass) == 18
    # resume in epoch 1 after 2 batches, as the loop does: a fresh loader, skip_first_batches, on into epoch 2
    images_r, loader_r = loader_for(jpeg_folder, accelerator, workers=2)
    rest = spanned(loader_r, 1, 10, skip=2)
    assert all(torch.equal(x, y) for x, y in zip(rest, flat[8:])) and len(rest) == 10


def test_epoch_batches_are_whole_epochs_in_one_pass():
    s = EpochBatches(50, 8, seed=1, span=False)
    first = list(s)
    assert len(first) == len(s) == 6 and all(len(b) == 8 for b in first)  # full batches, the rest of 50 dropped
    flat = [i for b in first for _, i in b]
    assert len(set(flat)) == 48 and {e for b in first for e, _ in b} == {0}
    s.set_epoch(3)
    third = list(s)
    assert {e for b in third for e, _ in b} == {3} and third != first
    again = EpochBatches(50, 8, seed=1)  # spanning: epoch 3 then epoch 4, the same batches as one pass each
    again.set_epoch(3)
    stream = iter(again)
    assert [next(stream) for _ in range(6)] == third
    s.set_epoch(4)
    assert [next(stream) for _ in range(6)] == list(s)
    assert len(EpochBatches(50, 8, seed=1, processes=4)) == 4  # whole rounds of the processes' dealing


@pytest.mark.parametrize("img_size", [32, 128])
def test_gpu_path_gives_the_cpu_paths_crops(jpeg_folder, accelerator, img_size):
    """--decode gpu, run on the CPU through the same code (libjpeg-turbo instead of nvJPEG): workers
    hand over bytes and boxes, the process decodes, crops, resizes and flips. Against Pillow decoding
    whole images (pil): the same crops, at most 1 level apart (torch's antialiased bilinear resize, not
    PIL's). Against the default cpu path: within 1 level wherever that path does not draft-decode (128 px
    outputs from 240x320 images never allow a 2x reduction): the batch is resized at once, by matrix products."""
    reference = {}
    for decode in ("pil", "cpu"):
        images, loader = loader_for(jpeg_folder, accelerator, 0, decode, img_size)
        reference[decode] = epochs_of(loader, images, [0])[0]
    images_g, loader_g = loader_for(jpeg_folder, accelerator, workers=0, decode="gpu", img_size=img_size)
    prepare = device_decoder(img_size, torch.device("cpu"))
    images_g.set_epoch(0)
    loader_g.set_epoch(0)
    deferred = 0
    for a, c, batch in zip(reference["pil"], reference["cpu"], loader_g):
        deferred += len(batch.get("encoded", []))
        b = prepare(batch)["pixels"]
        diff = (a.float() - b.float()).abs()
        assert diff.mean() < 0.05 and diff.max() <= 1, (diff.mean(), diff.max())  # measured: mean 0.001, max 1
        if img_size == 128:  # the same filter; float weights against torch's fixed-point uint8 resize
            gap = (b.float() - c.float()).abs()
            assert gap.max() <= 1 and gap.mean() < 0.05, (gap.mean(), gap.max())
    assert deferred == 24


def test_a_jpeg_that_fails_on_the_device_is_counted_and_replaced():
    good = jpeg_bytes(photo(3))
    broken = good[: len(good) // 3]  # a valid header, then the data stops
    tf = CropFlip(16)
    box = tf.sample(240, 320)
    batch = collate_images([EncodedCrop(good, box, 16, "a.jpg"), EncodedCrop(broken, box, 16, "b.jpg")])
    assert len(batch["encoded"]) == 2 and batch["pixels"].shape == (2, 3, 16, 16)
    out = device_decoder(16, torch.device("cpu"))(batch)
    assert [name for name, _ in out["bad"]] == ["b.jpg"] and "truncated" in out["bad"][0][1]
    assert (
        out["valid"].tolist() == [True, False]
        and torch.equal(out["pixels"][1], out["pixels"][0])
        and out["pixels"][0].float().std() > 10
    )


def test_decode_gpu_is_refused_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="--decode gpu needs a CUDA GPU"):
        parse_config(["--decode", "gpu"])


def test_default_workers_scale_with_the_cores_per_process(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_workers(torch.device("cuda")) == 15
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_workers(torch.device("cuda")) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_workers(torch.device("cuda")) == 7
    monkeypatch.setattr("os.sched_getaffinity", lambda _: {0, 1})
    assert default_workers(torch.device("cpu")) == 0


@pytest.mark.parametrize(
    "box,size", [((10, 20, 200, 180), 64), ((0, 0, 230, 310), 128), ((5, 7, 150, 140), 224), ((50, 60, 40, 30), 64)]
)
def test_the_batched_crop_is_each_images_crop(box, size):
    """--decode gpu crops a whole batch at once (crop_batch): against crop_tensor, image by image, shrinking and
    enlarging, on images of two sizes (the batch is padded), with and without flips: within 1 level (float
    weights against torch's fixed-point uint8 resize)."""
    images = [decode_jpeg_rgb(jpeg_bytes(photo(seed, (500, 375) if seed % 2 else (320, 240)))) for seed in range(6)]
    boxes = [CropBox(*box, flip=seed % 3 == 0) for seed in range(6)]
    batched = crop_batch(images, boxes, size)
    assert batched.shape == (6, 3, size, size) and batched.dtype == torch.uint8
    each = torch.stack([crop_tensor(image, b, size) for image, b in zip(images, boxes)])
    diff = (batched.float() - each.float()).abs()
    assert diff.max() <= 1 and diff.mean() < 0.05, (diff.mean(), diff.max())  # measured: mean 0.001-0.016
    unflipped = crop_batch(images, [CropBox(*box, flip=False)] * 6, size)
    for k, b in enumerate(boxes):  # a flip is exactly the mirror of the unflipped crop
        assert torch.equal(batched[k], unflipped[k].flip(-1) if b.flip else unflipped[k])


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG); run by benchmarks/run_gpu.sh on one"
)
def test_nvjpeg_gives_the_cpu_paths_crops():
    """On a GPU: the batch decoded by nvJPEG and cropped on the device against the same code on the CPU
    (libjpeg-turbo): the same boxes and flips, pixels a few levels apart at most (the IDCTs differ)."""
    tf = CropFlip(64)
    encoded = []
    for seed in range(8):
        data = jpeg_bytes(photo(seed, (500, 375)))
        encoded.append((seed, EncodedCrop(data, seeded(lambda _: tf.sample(375, 500), None, seed), 64, f"{seed}.jpg")))
    on_cpu, failed_cpu = decode_deferred(torch.zeros(8, 3, 64, 64, dtype=torch.uint8), encoded, 64)
    on_gpu, failed_gpu = decode_deferred(torch.zeros(8, 3, 64, 64, dtype=torch.uint8, device="cuda"), encoded, 64)
    diff = (on_cpu.float() - on_gpu.cpu().float()).abs()
    print(f"nvJPEG vs libjpeg-turbo after crop+resize: mean {diff.mean():.3f}, max {diff.max():.0f} levels")
    assert not failed_cpu and not failed_gpu and diff.mean() < 1.0 and diff.max() <= 16


@pytest.mark.parametrize("workers", [0, 2])
def test_pretraining_with_deferred_decoding_runs_the_real_loop(jpeg_folder, tmp_path, monkeypatch, workers):
    """--decode gpu through the real recipe loop, on the CPU (CUDA's check faked; the deferred JPEGs are
    decoded on the batch's device, here the CPU): EncodedCrops cross worker processes and accelerate's
    device placement, every step trains on decoded pixels, no image is lost."""
    import mpp.training.pretrain
    from mpp.training.pretrain import pretrain

    def validate_as_on_a_gpu_machine(cfg):  # the refusal without CUDA is tested above; the loop runs on the CPU
        with pytest.MonkeyPatch.context() as m:
            m.setattr(torch.cuda, "is_available", lambda: True)
            validate(cfg)

    validate = mpp.training.pretrain.validate
    monkeypatch.setattr(mpp.training.pretrain, "validate", validate_as_on_a_gpu_machine)
    seen = []
    real = device_decoder

    def watching(size, device):
        prepare = real(size, device)

        def run(batch):
            seen.append(len(batch.get("encoded", [])))
            out = prepare(batch)
            assert out["pixels"].float().std() > 5  # decoded pictures, not the zeros they replace
            return out

        return run

    monkeypatch.setattr("mpp.training.pretrain.device_decoder", watching)
    cfg = PretrainConfig(
        dataset=jpeg_folder,
        model="test_vit",
        img_size=32,
        patch_size=8,
        batch_size=8,
        max_steps=4,
        warmup_steps=0,
        workers=workers,
        decode="gpu",
        progress=False,
        output_dir=str(tmp_path / "run"),
        checkpoint_every=100,
    )
    result = pretrain(cfg)
    assert result.steps == 4 and seen == [8, 8, 8, 8]
    summary = (tmp_path / "run" / "summary.json").read_text()
    assert '"bad_images": 0' in summary


@pytest.mark.parametrize("grad_accum, passes", [(1, 1), (2, 3)])
def test_the_loop_reads_one_pass_across_epochs(jpeg_folder, tmp_path, monkeypatch, grad_accum, passes):
    """Pretraining over 3 epochs takes its batches from one loader pass (no reset, no wait at an epoch
    start), except when gradient accumulation does not divide an epoch (3 batches here, grad_accum 2):
    then one pass per epoch, so that accelerate closes each epoch's short accumulation."""
    from mpp.training.pretrain import pretrain

    real_iter, starts = EpochBatches.__iter__, []

    def counting_iter(self):
        starts.append(self.epoch)
        return real_iter(self)

    monkeypatch.setattr(EpochBatches, "__iter__", counting_iter)
    steps = 9 // grad_accum if grad_accum == 1 else 6  # 3 epochs: 3 steps each, or 2 (one short) with grad_accum 2
    cfg = PretrainConfig(
        dataset=jpeg_folder,
        model="test_vit",
        img_size=32,
        patch_size=8,
        batch_size=8,
        max_steps=steps,
        warmup_steps=0,
        workers=0,
        grad_accum=grad_accum,
        progress=False,
        output_dir=str(tmp_path / "run"),
        checkpoint_every=100,
    )
    assert pretrain(cfg).steps == steps
    assert starts == list(range(passes))


def test_seeded_transforms_in_two_threads_draw_what_they_draw_alone():
    """torch_xla's loader thread augments training images while the main thread augments a held-out
    set: each seeded() call must draw from its own seed, not from a seed the other thread just set."""
    import random
    import threading
    import time

    def slow_transform(_):
        first = (random.random(), torch.rand(()).item(), np.random.rand())
        time.sleep(0.05)  # the other thread reseeds here when the global RNGs are not guarded
        return first + (random.random(), torch.rand(()).item(), np.random.rand())

    alone = {seed: seeded(slow_transform, None, seed) for seed in (1, 2)}
    together = {}
    threads = [
        threading.Thread(target=lambda s=seed: together.__setitem__(s, seeded(slow_transform, None, s)))
        for seed in (1, 2)
    ]
    for t in threads:
        t.start()
        time.sleep(0.01)
    for t in threads:
        t.join()
    assert together == alone


def test_a_process_exits_although_a_loader_was_never_shut_down(tmp_path):
    """The workers ignore SIGTERM (the training process owns the stop signals), which multiprocessing's exit
    would wait on forever when a loader was never shut down (an exception still holding its iterator, as a
    failed test does): the process exits, quietly, and leaves no worker behind."""
    script = tmp_path / "left_open.py"
    script.write_text(
        "import torch\n"
        "from mpp.data.loader import leave_stop_signals_to_main\n"
        "loader = torch.utils.data.DataLoader(list(range(64)), batch_size=4, num_workers=1, persistent_workers=True,\n"
        "                                     worker_init_fn=leave_stop_signals_to_main)\n"
        "kept = iter(loader)\n"
        "next(kept)\n"
        "print(kept._workers[0].pid, flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]
    worker = int(done.stdout.split()[0])
    assert not Path(f"/proc/{worker}").exists() or "zombie" in Path(f"/proc/{worker}/status").read_text()
