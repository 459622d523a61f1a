"""mpp: masked patch prediction pretraining (ViT paper, §4.6) for timm Vision Transformers.

from mpp import MPP                       # the objective, in any training loop
objective = MPP("vit_tiny_patch16_224", img_size=28, patch_size=7)
out = objective(images)                   # out.loss, out.accuracy, out.pred, out.target, out.corruption
objective.save_pretrained("out")          # a timm hub folder; MPP.from_pretrained("out") reads it back

import mpp
run = mpp.pretrain(dataset="mnist5k", max_steps=100)   # the command line's settings, as keywords
run.run_dir, run.summary
"""

__version__ = "0.1.0"

from mpp.api import RunResult, finetune, pretrain  # noqa: E402
from mpp.models.model import MPP, MPPOutput  # noqa: E402
from mpp.models.weights import load_backbone, read_metadata  # noqa: E402

__all__ = ["MPP", "MPPOutput", "pretrain", "finetune", "RunResult", "load_backbone", "read_metadata", "__version__"]
