"""recipes/finetune.py as benchmarks/soak_resume.py runs it: the recipe unchanged, plus one marker file
that lets the soak aim a kill at an evaluation. While the main process evaluates a held-out split,
RUN/.evaluating exists (made before, removed after the evaluation). Nothing else is changed."""

import sys
from pathlib import Path

import mpp.training.finetune as finetune
from mpp.commands.finetune import cli

top1 = finetune.top1


def marked_top1(accelerator, model, loader, mean, std):
    marker = Path(output_dir) / ".evaluating"
    if accelerator.is_main_process:
        marker.touch()
    try:
        return top1(accelerator, model, loader, mean, std)
    finally:
        if accelerator.is_main_process:
            marker.unlink(missing_ok=True)


output_dir = sys.argv[sys.argv.index("--output-dir") + 1]
finetune.top1 = marked_top1
cli(sys.argv[1:])
