"""Run pretraining, then let every rank write what it ended with (for tests/test_launch.py): its weights at
the first forward and at the end, the example indices it was handed, its steps and what stopped it.
MPP_TEST_SIGTERM_RANK=R: rank R sends itself SIGTERM during its second step."""

import json
import os
import signal
import sys

import torch
from accelerate.state import PartialState

import mpp.data.images
import mpp.models.model
from mpp.cli import exit_cleanly
from mpp.commands.pretrain import parse_config
from mpp.training.pretrain import pretrain

seen, initial = [], []
getitems, forward = mpp.data.images.AugmentedImages.__getitems__, mpp.models.model.MPP.forward


def recording_getitems(self, indices):
    seen.extend([int(i[0]), int(i[1])] for i in indices)  # (epoch, index) pairs: loader.EpochBatches
    return getitems(self, indices)


def watched_forward(self, *args, **kwargs):
    if not initial:  # before the first optimiser step
        initial.append(torch.cat([p.detach().flatten().cpu().clone() for p in self.parameters()]))
    if len(initial) == 2 and os.environ.get("MPP_TEST_SIGTERM_RANK") == str(PartialState().process_index):
        os.kill(os.getpid(), signal.SIGTERM)
    initial.append(None)  # counts the calls
    return forward(self, *args, **kwargs)


mpp.data.images.AugmentedImages.__getitems__ = recording_getitems
mpp.models.model.MPP.forward = watched_forward
result = pretrain(parse_config(sys.argv[1:]))
state = PartialState()
params = torch.cat([p.detach().flatten().cpu() for p in result.model.parameters()])
torch.save(params, result.run_dir / f"params_rank{state.process_index}.pt")
torch.save(initial[0], result.run_dir / f"initial_rank{state.process_index}.pt")
(result.run_dir / f"rank{state.process_index}.json").write_text(
    json.dumps(
        {"world": state.num_processes, "steps": result.steps, "stopped_by": result.stopped_by, "seen": sorted(seen)}
    )
)
print(f"rank {state.process_index} done", flush=True)
exit_cleanly(0)
