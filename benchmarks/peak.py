"""Measure this machine's matmul peak (GFLOP/s) in fp32 and bf16: the MFU denominator.

    python benchmarks/peak.py [--sizes 512 1024 2048] [--repeats 10]
"""

from __future__ import annotations

import argparse
import time

import torch


def matmul_gflops(n: int, dtype: torch.dtype, repeats: int, device: str = "cpu") -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    print(f"device {a.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'n':>6} {'fp32 GFLOP/s':>14} {'bf16 GFLOP/s':>14}")
    for n in a.sizes:
        reps = a.repeats if n <= 1024 or a.device == "cuda" else 3
        bf = matmul_gflops(n, torch.bfloat16, max(1, reps // 3) if a.device == "cpu" and n > 512 else reps, a.device)
        print(f"{n:>6} {matmul_gflops(n, torch.float32, reps, a.device):>14.1f} {bf:>14.1f}")


if __name__ == "__main__":
    main()
