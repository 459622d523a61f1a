"""FP8 linear layers through torchao's float8 training: an opt-in speed lever for a GPU step, checked before any
heavy work (the other levers: the attention kernel, mpp.models.attention_kernel; torch.compile's modes).

FP8 pays only where a GEMM is large: torchao's own filter (`_auto_filter_for_recipe`, thresholds from its H100
benchmarks) keeps a Linear in bf16 unless its dimensions clear the recipe's bar. For a ViT that means:
  tensorwise: converted when out_features > 1024 or in_features > 4096, e.g. ViT-B/16's qkv (768 -> 2304) and
              fc1 (768 -> 3072), ViT-L/16's qkv (1024 -> 3072) and fc1 (1024 -> 4096); proj and fc2 stay;
  rowwise:    converted only when out_features > 2048, in_features > 1024 and not both <= 4096 / 2048: no layer
              of ViT-B/16 or ViT-L/16 (ViT-H/14's fc1, 1280 -> 5120, is the first).
`fp8_layers="all"` converts every Linear whose dimensions are multiples of 16 (the hardware's rule), to measure
what the filter leaves out. The weights stay in their own dtype (torchao casts per GEMM), so the state dict,
the exported safetensors and timm's strict load are the same with and without FP8.
"""

import importlib.util
import os

import torch

from mpp.errors import UsageError

FP8_RECIPES = ("none", "tensorwise", "rowwise")
FP8_LAYERS = ("auto", "all")
FP8_MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9), Hopper (9.0) and later
EMULATE_ON_CPU = "MPP_FP8_EMULATE_ON_CPU"


def check_fp8(recipe: str, layers: str = "auto", cuda: bool | None = None) -> None:
    """One-line refusals, before anything is built: an unknown recipe or layer set, torchao not installed, no CUDA
    device with FP8 tensor cores. `cuda`: whether the run will be on a CUDA device (default: torch sees one).
    MPP_FP8_EMULATE_ON_CPU=1 lets a CPU run convert anyway (torchao emulates the FP8 GEMMs, slowly): for tests and
    rehearsals of a GPU script, never for speed."""
    if recipe not in FP8_RECIPES:
        raise UsageError(f"--fp8 {recipe}: one of {', '.join(FP8_RECIPES)}")
    if layers not in FP8_LAYERS:
        raise UsageError(f"--fp8-layers {layers}: one of {', '.join(FP8_LAYERS)}")
    if recipe == "none":
        return
    if importlib.util.find_spec("torchao") is None:
        raise UsageError(f"--fp8 {recipe}: needs torchao (pip install 'vit-mpp[fp8]')")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda and os.environ.get(EMULATE_ON_CPU) == "1":
        return
    if not cuda:
        raise UsageError(
            f"--fp8 {recipe}: FP8 training needs a CUDA GPU with FP8 tensor cores (compute capability 8.9 or later); "
            "this run has none (leave --fp8 out, or --fp8 none)"
        )
    capability = torch.cuda.get_device_capability()
    if capability < FP8_MIN_CAPABILITY:
        raise UsageError(
            f"--fp8 {recipe}: this GPU ({torch.cuda.get_device_name()}) has compute capability "
            f"{capability[0]}.{capability[1]}; FP8 tensor cores need 8.9 or later (H100, L4, RTX 4090, ...)"
        )


def fp8_filter(recipe: str, layers: str = "auto", skip: tuple[str, ...] = ()):
    """module_filter_fn(module, fqn) -> bool for torchao's convert_to_float8_training: torchao's own size filter
    for the recipe ("auto"), or every Linear with dimensions that are multiples of 16 ("all"); never a module
    whose name contains one of `skip`."""
    from torchao.float8 import _auto_filter_for_recipe

    if layers == "auto":
        return _auto_filter_for_recipe(recipe, filter_fqns=list(skip))

    def every_linear_of_16(module: torch.nn.Module, fqn: str) -> bool:
        if not isinstance(module, torch.nn.Linear) or any(s in fqn for s in skip):
            return False
        out_features, in_features = module.weight.shape
        return out_features % 16 == 0 and in_features % 16 == 0

    return every_linear_of_16


def convert_to_fp8(module: torch.nn.Module, recipe: str, layers: str = "auto", skip: tuple[str, ...] = ()):
    """Swap the chosen Linear layers of `module` (in place) for torchao's Float8Linear; the names swapped. The
    parameters are the same tensors, so optimisers built afterwards and the exported weights see no change."""
    if recipe == "none":
        return []  # torchao is not even imported (its import warns on stderr)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    config = Float8LinearConfig.from_recipe_name(recipe)
    convert_to_float8_training(module, config=config, module_filter_fn=fp8_filter(recipe, layers, skip))
    return [name for name, m in module.named_modules() if isinstance(m, Float8Linear)]  # what torchao swapped
