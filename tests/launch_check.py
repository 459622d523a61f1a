"""Run pretraining, then let every rank write what it ended with (for tests/test_launch.py)."""
import json
import sys

import torch
from accelerate.state import PartialState

from mpp.cli import exit_cleanly, parse_config
from mpp.train import pretrain

result = pretrain(parse_config(sys.argv[1:]))
state = PartialState()
params = torch.cat([p.detach().flatten().cpu() for p in result.model.parameters()])
torch.save(params, result.run_dir / f"params_rank{state.process_index}.pt")
(result.run_dir / f"rank{state.process_index}.json").write_text(json.dumps({"world": state.num_processes, "steps": result.steps}))
print(f"rank {state.process_index} done", flush=True)
exit_cleanly(0)
