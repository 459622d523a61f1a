"""Stopping on a signal, in process: DataLoader workers leave SIGTERM/SIGINT to the training process."""

import os
import signal
import time
from types import SimpleNamespace

import psutil
import pytest
import torch


def tiny_labelled(n: int = 24):
    """n 28x28 RGB images with labels, as a datasets.Dataset; image i is filled with grey level i."""
    from datasets import Dataset, Image
    from PIL import Image as PILImage

    images = [PILImage.new("RGB", (28, 28), (i % 256, i % 256, i % 256)) for i in range(n)]
    return Dataset.from_dict({"image": images, "label": [i % 3 for i in range(n)]}).cast_column("image", Image())


def training(tmp_path):
    from mpp.data.images import AugmentedImages, collate_images
    from mpp.data.loader import training_loader
    from mpp.data.transforms import train_transform

    images = AugmentedImages(tiny_labelled(), "image", train_transform(28, (0.35, 1.0), 0.5), seed=0)
    return training_loader(images, 4, 0, 1, torch.device("cpu"), collate_images)


def held_out(tmp_path):
    from mpp.training.finetune import LabelledData, held_out_loader
    from mpp.training.finetune_config import FinetuneConfig

    ds = tiny_labelled(600)  # batches of 256: this one's at least
    data = LabelledData(ds, ds, "image", "label", ["a", "b", "c"])
    return held_out_loader(ds, data, 28, FinetuneConfig(batch_size=4), 1, torch.device("cpu"))


def streaming(tmp_path):
    from mpp.data.sources import find_image_column, load_images
    from mpp.training.pretrain import build_loader
    from mpp.training.pretrain_config import PretrainConfig

    tiny_labelled(64).to_parquet(str(tmp_path / "images.parquet"))
    cfg = PretrainConfig(
        dataset=str(tmp_path / "images.parquet"), streaming=True, max_steps=100, batch_size=4, workers=1, img_size=28
    )
    ds = load_images(cfg.dataset, cfg.split, streaming=True)
    fake = SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1)
    return build_loader(cfg, ds, find_image_column(ds), fake)[1]


@pytest.mark.parametrize("make", [training, held_out, streaming], ids=["training", "held-out", "streaming"])
def test_loader_workers_leave_stop_signals_to_the_training_process(make, tmp_path, monkeypatch):
    """SIGTERM and SIGINT sent to a worker (as torchrun's killpg and a terminal's Ctrl-C do) leave it
    running: the training process reads on, and acting on the signal stays its own business."""
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)  # 5 s at the end of a parquet stream
    loader = make(tmp_path)
    before = {p.pid for p in psutil.Process().children()}
    batches = iter(loader)
    next(batches)
    workers = [p for p in psutil.Process().children() if p.pid not in before]
    assert len(workers) == 1
    for sig in (signal.SIGTERM, signal.SIGINT):
        os.kill(workers[0].pid, sig)
    time.sleep(0.5)  # a killed worker is seen by torch's SIGCHLD handler, which raises here
    assert workers[0].is_running() and workers[0].status() != psutil.STATUS_ZOMBIE
    assert len([next(batches) for _ in range(2)]) == 2
    del batches


def test_a_stream_outlives_its_reader():
    """Writing to a pipe whose reader has gone: no BrokenPipeError, the output is discarded from then on
    (the descriptor now points at /dev/null, for every holder of it); other errors still raise."""
    import errno
    import io

    from mpp.console import SurvivingStream

    read_end, write_end = os.pipe()
    raw = io.TextIOWrapper(io.FileIO(write_end, "w"), line_buffering=True)
    stream = SurvivingStream(raw)
    stream.write("seen\n")
    assert os.read(read_end, 100) == b"seen\n" and not stream.reader_gone
    os.close(read_end)
    with pytest.raises(BrokenPipeError):
        raw.write("unguarded\n")  # what killed runs
    stream.write("after the reader left\n")
    stream.flush()
    assert stream.reader_gone
    raw.write("the original stream object works again\n")
    raw.flush()
    assert os.readlink(f"/proc/self/fd/{write_end}") == os.devnull

    class Failing(io.StringIO):
        def write(self, text):
            raise OSError(errno.EIO, "input/output error")

    with pytest.raises(OSError, match="input/output error"):
        SurvivingStream(Failing()).write("x")
    raw.close()


def test_accelerates_launcher_is_recognised_by_its_command_line():
    from mpp.training.terminal import launched_by_accelerate

    assert launched_by_accelerate(["/venv/bin/python", "/venv/bin/accelerate", "launch", "recipes/pretrain_mpp.py"])
    assert launched_by_accelerate(["python", "-m", "accelerate.commands.launch", "--num_processes", "1", "train.py"])
    assert launched_by_accelerate(["/venv/bin/python", "/venv/bin/accelerate-launch", "train.py"])
    assert not launched_by_accelerate(["/venv/bin/python", "/venv/bin/accelerate", "config"])
    assert not launched_by_accelerate(
        ["bash", "-c", "accelerate launch train.py | tee log"]
    )  # a shell, not the launcher
    assert not launched_by_accelerate(["python", "recipes/pretrain_mpp.py", "--dataset", "launch"])
