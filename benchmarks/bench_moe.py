"""MoE FFN dispatch, side by side: minigem's sort-based SparseMoE vs one-hot GShard einsum vs a
per-expert masked loop vs the dense FFN with the same active parameters.

"Same active parameters": top-k of E routes each token through k expert FFNs of width F, so the
dense reference is ONE SwiGLU FFN of intermediate size k*F run on every token (same parameter
count touched per token, same matmul FLOPs). Its time is the floor a dispatch can approach.

The one-hot reference is DeepSpeed/GShard style (what MoE-LLaVA ships): a [T, E, C] dispatch mask,
einsum in, every expert on all C slots, einsum out. C = ceil(T/E * cf * k) with cf = 2.0 (MoE-LLaVA's
eval capacity factor), which for top-2 of 4 is C = T: no token can overflow, so all four
implementations compute the same output (checked before timing).

    .venv/bin/python benchmarks/bench_moe.py            # fp32 1024/2816, bf16 256/704
    .venv/bin/python benchmarks/bench_moe.py --quick    # tiny smoke run
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from transformers import AutoConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from minigem.config import MoEConfig
from minigem.llm.moe import SparseMoE

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def swiglu(hidden: int, ffn: int) -> nn.Module:
    return LlamaMLP(AutoConfig.for_model("llama", hidden_size=hidden, intermediate_size=ffn))


def route(moe: SparseMoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _, gates, top_i = moe.route(x)  # same fp32 router for every implementation
    return gates, top_i


def onehot_einsum(moe: SparseMoE, x: torch.Tensor, cf: float = 2.0) -> torch.Tensor:
    """GShard / DeepSpeed top-k: x [T, H] -> [T, H] through [T, E, C] dispatch/combine tensors."""
    t, e, k = x.shape[0], moe.num_experts, moe.top_k
    cap = math.ceil(t / e * cf * k)
    gates, top_i = route(moe, x)
    combine = x.new_zeros(t, e, cap, dtype=torch.float32)  # [T, E, C]
    filled = torch.zeros(e, dtype=torch.long, device=x.device)
    for j in range(k):  # first choices take slots before second choices (as DeepSpeed top2)
        mask = nn.functional.one_hot(top_i[:, j], e)  # [T, E]
        loc = (torch.cumsum(mask, 0) - 1 + filled) * mask  # slot per (token, expert)
        keep = (mask * (loc < cap)).float()
        combine += (
            gates[:, j, None, None]
            * keep[:, :, None]
            * nn.functional.one_hot(loc.clamp(max=cap - 1), cap).float()
        )
        filled += mask.sum(0)
    dispatch = (combine > 0).to(x.dtype)  # [T, E, C]
    xs = torch.einsum("tec,th->ech", dispatch, x)  # [E, C, H]
    ys = torch.stack([ex(xs[i]) for i, ex in enumerate(moe.experts)])  # [E, C, H]
    return torch.einsum("tec,ech->th", combine.to(x.dtype), ys)


def masked_loop(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """HF-eager style: per expert, torch.where over the routing mask (a host sync each)."""
    gates, top_i = route(moe, x)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for i, ex in enumerate(moe.experts):
        tok, slot = torch.where(top_i == i)
        if tok.numel():
            out.index_add_(0, tok, ex(x[tok]).float() * gates[tok, slot, None])
    return out.to(x.dtype)


def timeit(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time per function; calls interleaved round-robin after one warm-up each, so
    every implementation sees the same background load (the CPU is shared)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_gflops(dtype: torch.dtype, n: int) -> float:
    """Best square-GEMM rate, over the NN (a @ b) and NT (F.linear) layouts: CPU bf16 kernels
    differ a lot between the two, and nn.Linear uses NT."""
    a, b = (torch.randn(n, n, dtype=dtype, device=DEV) for _ in range(2))
    secs = timeit({"nn": lambda: a @ b, "nt": lambda: nn.functional.linear(a, b)}, 5)
    return 2 * n**3 / min(secs.values()) / 1e9


def bench(dtype: torch.dtype, hidden: int, ffn: int, tokens: int, args) -> list[str]:
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=args.experts, top_k=args.top_k)
    moe = SparseMoE(swiglu(hidden, ffn), hidden, cfg).eval()
    with torch.no_grad():  # distinct experts, so a wrong dispatch cannot pass the check
        for p in moe.experts.parameters():
            p.normal_(0, hidden**-0.5)
    moe = moe.to(DEV, dtype)
    dense = swiglu(hidden, args.top_k * ffn).to(DEV, dtype).eval()
    peak = peak_gflops(dtype, 1024 if dtype == torch.float32 else 512)
    rows = []
    for label, t, reps in (("prefill", tokens, args.repeats), ("decode", 1, 10 * args.repeats)):
        x = torch.randn(t, hidden, dtype=dtype, device=DEV)
        impls = {
            "sort (ours)": lambda x=x: moe(x),
            "one-hot einsum": lambda x=x: onehot_einsum(moe, x),
            "masked loop": lambda x=x: masked_loop(moe, x),
            f"dense {args.top_k}xF": lambda x=x: dense(x),
        }
        if args.no_onehot:
            del impls["one-hot einsum"]
        ref = moe(x).float()
        for name in set(impls) & {"one-hot einsum", "masked loop"}:
            err = (impls[name]().float() - ref).abs().max().item()
            assert err <= (1e-4 if dtype == torch.float32 else 5e-2) * ref.abs().max().item(), (
                name,
                err,
            )
        flops = 2 * t * args.top_k * 3 * hidden * ffn  # active expert matmuls
        secs = timeit(impls, reps)
        d, s = secs[f"dense {args.top_k}xF"], secs["sort (ours)"]
        for n, sec in secs.items():
            rows.append(
                f"| {label} T={t} | {str(dtype).split('.')[-1]} {hidden}/{ffn} | {n} | "
                f"{sec * 1e3:.2f} | {flops / sec / 1e9:.1f} | {100 * flops / sec / 1e9 / peak:.0f}% | "
                f"{sec / d:.2f}x | {sec / s:.2f}x |"
            )
        print("\n".join(rows[-len(impls) :]), flush=True)
    rows.append(
        f"| peak GEMM | {str(dtype).split('.')[-1]} | square, best of NN/NT | | {peak:.1f} | 100% | | |"
    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--bf16-hidden", type=int, default=256, help="bf16 width (CPU bf16 is slow)")
    ap.add_argument("--bf16-ffn", type=int, default=704)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-onehot", action="store_true", help="skip the (slow) one-hot reference")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.ffn, args.bf16_hidden, args.bf16_ffn = 64, 176, 64, 176
        args.tokens, args.repeats = 128, 2
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, E={args.experts}, "
        f"top-{args.top_k}"
    )
    head = [
        "| case | dtype H/F | impl | median ms | GFLOP/s | % peak | vs dense | vs sort |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(head))
    rows = []
    with torch.inference_mode():
        for name in args.dtypes.split(","):
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
            h, f = (args.hidden, args.ffn) if name == "fp32" else (args.bf16_hidden, args.bf16_ffn)
            rows += bench(dtype, h, f, args.tokens, args)
    print("\n" + "\n".join(head + rows))


if __name__ == "__main__":
    main()
