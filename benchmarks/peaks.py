"""The two denominators of MFU: the card's dense spec peak (a table, where the card is known) and
the best GEMM rate measured on this machine (max over square sizes and the model's own shapes)."""

import re
import time

import torch

# Dense (no 2:4 sparsity) tensor-core peaks in TFLOP/s. Source: NVIDIA's datasheets (H100 Tensor Core
# GPU; H200 Tensor Core GPU; A100 Tensor Core GPU), which quote "with sparsity" figures: dense is half.
# First match wins, so the PCIe / NVL variants (other clocks and power) come before plain H100/H200.
SPEC_PEAKS_TFLOPS = [
    (r"H100.*PCIe", "NVIDIA H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    (r"H100(?!.*NVL)", "NVIDIA H100 SXM", {"bf16": 989.0, "tf32": 494.7, "fp32": 67.0}),
    (r"H200(?!.*NVL)", "NVIDIA H200 SXM (H100 SXM compute)", {"bf16": 989.0, "tf32": 494.7, "fp32": 67.0}),
    (r"A100", "NVIDIA A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]
SPEC_SOURCE = "NVIDIA datasheets (H100, H200, A100 Tensor Core GPU), dense = half the quoted sparsity figure"


def spec_precision(dtype: torch.dtype) -> str:
    """Which peak an arm can reach: bf16; for fp32 what torch lets its matmuls use
    (torch.set_float32_matmul_precision: 'highest' fp32, 'high' TF32, 'medium' bf16)."""
    if dtype == torch.bfloat16:
        return "bf16"
    return {"highest": "fp32", "high": "tf32", "medium": "bf16"}[torch.get_float32_matmul_precision()]


def spec_peak(device_name: str | None, dtype: torch.dtype) -> dict | None:
    """{'card', 'precision', 'flops_per_sec', 'source'} from the table, or None for a card it does not
    know (a CPU included): no made-up peak."""
    if device_name is None:
        return None
    precision = spec_precision(dtype)
    for pattern, card, peaks in SPEC_PEAKS_TFLOPS:
        if re.search(pattern, device_name):
            return {
                "card": card,
                "device_name": device_name,
                "precision": precision,
                "flops_per_sec": peaks[precision] * 1e12,
                "source": SPEC_SOURCE,
            }
    return None


def model_gemm_shapes(tokens: int, dim: int, hidden: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of the blocks' forward linears at M = batch x tokens: qkv, proj, fc1, fc2."""
    return list(
        dict.fromkeys([(tokens, dim, 3 * dim), (tokens, dim, dim), (tokens, dim, hidden), (tokens, hidden, dim)])
    )


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gemm_rate(m: int, k: int, n: int, device: str, dtype: torch.dtype, seconds: float) -> float:
    """FLOP/s of (m, k) @ (k, n) over about `seconds`. The product count is fixed from a synced
    calibration first: on CUDA a loop that watches the clock would queue far more work than it times."""
    a = torch.randn(m, k, device=device, dtype=dtype)  # (M, K)
    b = torch.randn(k, n, device=device, dtype=dtype)  # (K, N)
    a @ b  # warm-up: kernel choice, allocator
    sync(device)
    start = time.perf_counter()
    a @ b
    sync(device)
    count = max(1, min(10_000, round(seconds / max(time.perf_counter() - start, 1e-9))))
    sync(device)
    start = time.perf_counter()
    for _ in range(count):
        a @ b
    sync(device)
    return 2 * m * k * n * count / (time.perf_counter() - start)


def gemm_round(shapes: list[tuple[int, int, int]], device: str, dtype: torch.dtype, seconds: float) -> list[dict]:
    """One reading per shape: what a repeat adds between the arms."""
    return [{"shape": list(s), "flops_per_sec": gemm_rate(*s, device, dtype, seconds)} for s in shapes]
