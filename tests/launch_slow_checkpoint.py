"""Pretraining whose every checkpoint takes 8 s longer (for tests/test_reliability.py): longer than the 5 s that
accelerate's single-process launcher leaves between its SIGTERM and its SIGKILL, as a large model's would."""

import sys
import time

import mpp.training.loop
from mpp.commands.pretrain import cli

save_checkpoint = mpp.training.loop.save_checkpoint


def slow_save_checkpoint(*args, **kwargs):
    time.sleep(8)
    return save_checkpoint(*args, **kwargs)


mpp.training.loop.save_checkpoint = slow_save_checkpoint
cli(sys.argv[1:])
