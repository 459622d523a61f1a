"""The optimiser's schedule and kernels: the warmup a short run can have, the scale of a short accumulation window,
fused kernels where torch has them.
"""

from collections.abc import Callable

import torch

FUSED_OPTIMIZER_DEVICES = ("cpu", "cuda")  # where torch has fused Adam/AdamW kernels


def fused_optimizer_kwargs(opt: str, device: torch.device) -> dict:
    """{'fused': True} for timm's create_optimizer_v2 where torch has a fused kernel: one kernel for
    all parameters (the AdamW step is 3x faster on CPU) that also takes `found_inf`, which lets a
    non-finite step be skipped without the host waiting for the device (NonFiniteGuard)."""
    return {"fused": True} if opt in ("adam", "adamw") and device.type in FUSED_OPTIMIZER_DEVICES else {}


def capped_warmup(requested: int, total_steps: int, say: Callable[[str], None]) -> int:
    """Warmup takes at most half the run, so that the cosine has room; said aloud when it is cut."""
    warmup = min(requested, total_steps // 2)
    if warmup < requested:
        say(f"--warmup-steps {requested} is more than half of the {total_steps} steps: warming up over {warmup} steps")
    return warmup


def short_accumulation_scale(batch: int, per_epoch: int | None, grad_accum: int) -> float:
    """The factor for micro-batch `batch` (1-based in its epoch) that makes each optimiser step's
    gradient the mean over its own micro-batches. accelerate divides every loss by grad_accum, but
    also steps at each epoch's end, after a short last accumulation of k < grad_accum micro-batches:
    those get grad_accum / k."""
    short = per_epoch % grad_accum if per_epoch else 0
    return grad_accum / short if short and batch > per_epoch - short else 1.0
