"""Model FLOPs per token and MFU: the one place the formula lives.

Counted as the seed does: 6 x non-embedding parameters (forward + backward of every matmul
weight) plus, per attention layer, 12 x width x the tokens it attends to (QK^T and AV,
forward + backward), where width = heads x head_dim and the span is min(window, seq_len).
"""

from __future__ import annotations

# Dense bf16 tensor-core peak by device-name fragment, most specific first (vendor datasheets).
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("GH200", 989.5e12),
    ("H200", 989.5e12),
    ("H100", 989.5e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
]


def peak_flops(device_name: str | None) -> float | None:
    """bf16 peak of a known GPU, None for CPUs and unknown devices (then no MFU is reported)."""
    if not device_name:
        return None
    for fragment, flops in PEAK_BF16_FLOPS:
        if fragment in device_name:
            return flops
    return None


def count_params(model) -> tuple[int, int]:
    """(all parameters, parameters outside nn.Embedding tables), each tensor counted once."""
    import torch

    seen: set[int] = set()
    total = embedding = 0
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            if isinstance(module, torch.nn.Embedding):
                embedding += p.numel()
    return total, total - embedding


def flops_per_token(non_embedding_params: int, attention: list[tuple[int, int]] | None,
                    seq_len: int) -> float:
    """Training FLOPs per token; attention is one (width, window) pair per attention layer."""
    attn = sum(12 * width * min(window, seq_len) for width, window in attention or [])
    return 6 * non_embedding_params + attn


def mfu_percent(flops_token: float, tokens: int, seconds: float, peak: float | None) -> float | None:
    if not peak or seconds <= 0:
        return None
    return 100.0 * flops_token * tokens / seconds / peak
