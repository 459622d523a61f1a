"""What MPP takes as images, and the check that a batch is what the caller declared.

inputs="pixels" (the default): uint8 in [0, 255] or float in [0, 1], as mpp's own loaders hand them out.
inputs="normalised": float (x - mean) / std, as timm's create_transform hands them out; un-normalised
(x * std + mean) for the targets, which are colours in [0, 1].

A float batch outside the declared range is refused, never clamped: targets computed from clamped
normalised values are wrong colours, and training on them raises no other error. Reading a batch's
minimum and maximum makes the host wait for the device, so check="auto" reads them on every batch
on the CPU (where nothing runs ahead) and on the first float batch on a GPU or TPU (a wrong
transform is wrong from its first batch), and never while torch.compile traces (a graph break).
"""

import torch

INPUTS = ("pixels", "normalised")
CHECKS = ("auto", "always", "never")
# How far outside [0, 1] an un-normalised value may fall: float rounding of x * std + mean.
TOLERANCE = 1e-3


def check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


class InputCheck:
    """Decides which batches are read back to the host and checked (see the module's docstring)."""

    def __init__(self, policy: str = "auto"):
        check_choice("check_inputs", policy, CHECKS)
        self.policy = policy
        self.checked_on_device = False

    def wanted(self, x: torch.Tensor) -> bool:
        if self.policy == "never" or torch.compiler.is_compiling():
            return False
        if self.policy == "always" or x.device.type == "cpu":
            return True
        first, self.checked_on_device = not self.checked_on_device, True
        return first


def check_range(pixels: torch.Tensor, inputs: str, mean: tuple, std: tuple) -> None:
    """Raises ValueError unless pixels (B, C, H, W), un-normalised where inputs='normalised', lie in [0, 1]
    (NaN included). One host read of the batch's minimum and maximum."""
    lo, hi = (float(v) for v in torch.aminmax(pixels.detach()))
    if lo >= -TOLERANCE and hi <= 1 + TOLERANCE:
        return
    if inputs == "pixels":
        raise ValueError(
            f"float images must be pixels in [0, 1] (inputs='pixels'), but this batch spans [{lo:.4g}, {hi:.4g}]; "
            "for images normalised with a mean and std (e.g. by timm's create_transform) create MPP with "
            "inputs='normalised'"
        )
    raise ValueError(
        f"these images, declared normalised (inputs='normalised', mean {mean}, std {std}), un-normalise to "
        f"[{lo:.4g}, {hi:.4g}], not [0, 1]: pass the input_mean and input_std they were normalised with, "
        "or inputs='pixels' for images in [0, 1]"
    )
