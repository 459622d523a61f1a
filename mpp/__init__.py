"""mpp: masked patch prediction pretraining (ViT paper, §4.6) for timm Vision Transformers."""
__version__ = "0.1.0"

from mpp.models.weights import load_backbone, read_metadata  # noqa: E402

__all__ = ["load_backbone", "read_metadata", "__version__"]
