"""Choosing bf16 autocast: on GPUs that support it; on CPUs only where it is measured faster."""

from __future__ import annotations

import functools
import time

import torch


@functools.lru_cache(maxsize=1)
def cpu_bf16_faster() -> bool:
    """Time a 512x512 matmul in bf16 and fp32 (~10 ms); CPUs without bf16 units lose badly."""
    a = torch.randn(512, 512)
    timings = {}
    for dt in (torch.float32, torch.bfloat16):
        x = a.to(dt)
        x @ x
        t = time.perf_counter()
        for _ in range(3):
            x @ x
        timings[dt] = time.perf_counter() - t
    return timings[torch.bfloat16] < 0.8 * timings[torch.float32]


def use_bf16(setting: str, device: torch.device) -> bool:
    if setting == "on":
        return True
    if setting == "off":
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_bf16_faster()
    return False
