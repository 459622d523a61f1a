"""Pretraining in which rank 1 fails at its third step (for tests/test_launch.py): the launch must fail fast."""

import sys

from accelerate.state import PartialState

import mpp.models.model
from mpp.cli import run_cli
from mpp.commands.pretrain import parse_config
from mpp.training.pretrain import pretrain

forward = mpp.models.model.MPP.forward
calls = {"n": 0}


def failing_forward(self, *args, **kwargs):
    calls["n"] += 1
    if PartialState().process_index == 1 and calls["n"] == 3:
        raise RuntimeError("injected failure on rank 1")
    return forward(self, *args, **kwargs)


mpp.models.model.MPP.forward = failing_forward
run_cli(lambda argv: pretrain(parse_config(argv)), sys.argv[1:])
