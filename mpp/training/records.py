"""metrics.jsonl: records written once, counted and gathered over processes, and trimmed on resume so that
nothing is logged twice.
"""

import itertools
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    gather_object,
)

from mpp.training.xla import (
    is_xla,
)


def read_records(path: Path) -> list[dict]:
    """metrics.jsonl's records; a last line cut short by a kill in mid-write is left out."""
    records = []
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise
    return records


def trim_metrics(path: Path, state: dict, own_checkpoint: bool) -> bool:
    """Keep the records written up to the checkpoint the run resumes from; later ones are logged again.
    The checkpoint says how many records metrics.jsonl held when it was written. Records at its step written
    after it are the evaluation at the end of its epoch: they are kept, and True tells the loop that this
    evaluation is logged already (it runs again on resume, but is not written twice). A checkpoint of
    another folder, or one written before these counts: the records up to its step are kept."""
    if not path.is_file():
        return False
    records, step, count = read_records(path), state["step"], state.get("metrics_records")
    if own_checkpoint and count is not None and count <= len(records):
        after = list(itertools.takewhile(lambda r: r["step"] == step, records[count:]))
        kept, logged = records[:count] + after, bool(after)
    else:
        kept, logged = [r for r in records if r["step"] <= step], False
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return logged


def count_all(accelerator: Accelerator, count: int) -> int:
    """A count summed over all processes."""
    return int(accelerator.reduce(torch.tensor(count, device=accelerator.device), "sum").item())


def gather_lists(accelerator: Accelerator, items: list) -> list:
    """Every process's list, joined in process order. accelerate's gather_object refuses XLA
    (NotImplementedError); torch_xla's mesh_reduce does the same job there."""
    if accelerator.num_processes == 1:
        return list(items)
    if is_xla(accelerator.device):
        import torch_xla.core.xla_model as xm

        return xm.mesh_reduce("mpp.gather_lists", items, lambda parts: [x for part in parts for x in part])
    return [x for part in gather_object([items]) for x in part]
