"""Which kernel runs the encoder's attention: torch's scaled_dot_product_attention, which timm's fused attention
calls, can be held to one backend ("auto" leaves the choice to torch).

MPP applies the choice inside its forward (MPP.sdpa_backend). Chosen around a call instead, it would not reach a
compiled model reliably: dynamo does not guard on that context, so a second compiled model of the same class
(another run in the same process, another benchmark arm) reuses the first one's graph, and with it the first
one's kernel. An attribute read inside forward is guarded on its value.
"""

import contextlib

from mpp.errors import UsageError

SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")


def check_sdpa_backend(name: str) -> None:
    if name not in SDPA_BACKENDS:
        raise UsageError(f"--sdpa-backend {name}: one of {', '.join(SDPA_BACKENDS)}")


def attention_kernel(name: str):
    """A context in which scaled_dot_product_attention uses only this backend ("auto": torch's choice)."""
    check_sdpa_backend(name)
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]
    return sdpa_kernel([backend])
