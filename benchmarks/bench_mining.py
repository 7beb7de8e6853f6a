"""Mini-Gemini HR feature assembly + patch info mining, side by side at the released sizes:
minigem (preallocated assembly; mining that never projects the map: the key Linear moved onto
the query, the value Linear after the weighted sum; at HD "ours" writes the views straight
from the stage maps as ``HRTower.forward(px, grid=2, global_view=True)`` does and
"ours-split" assembles the map and then calls ``split_hr_views``) vs a straightforward implementation
of the same math written here the way the release does it (upsample all stages + cat; HD
split with reshape/permute/.contiguous(); the whole map permuted to [B, N, M*M, C_hr];
separate LayerNorm+Linear for K and V; scores/softmax in the model dtype).

"ours" is the mining form the device picks (`default_form`: the CPU reads the map in place a
few token rows per step; a GPU reads 768 px and HD maps an image per step, its token rows as
one batched GEMM in the map's dtype). The other forms are timed as "ours-rows",
"ours-gathered" (each token's block copied out) and "ours-image" (`--both-forms`; always on a
GPU).

Sizes: N = 576 LR tokens x C = 1024; ConvNeXt-L stage maps 192/384/768/1536 channels
(C_hr = 2880). "768": HR 768 -> map 192x192, 1 view. "hd": HR 1536 -> map 384x384 split
into 5 views (global + 2x2), 5 x 576 tokens. Random weights and inputs, same seed for both.

Each variant runs in a fresh subprocess. Peak memory = the kernel's peak RSS (VmHWM, reset
through /proc/self/clear_refs just before the call) minus the RSS just before it: everything
the call allocates (torch's CPU allocator returns large blocks to the OS), inputs excluded.
Time: the first call (includes page faults of fresh allocations) and the best of the repeats.
"Mining vs KV@peak" divides the mining time by the K/V projection FLOPs
(2 x cells x C_hr x 2C) at this machine's measured matmul peak (measured in this script).

    .venv/bin/python benchmarks/bench_mining.py                 # 768 fp32+bf16, hd fp32
    .venv/bin/python benchmarks/bench_mining.py --hd-bf16       # also hd bf16 (~10 min)
    .venv/bin/python benchmarks/bench_mining.py --quick         # small smoke run
    python benchmarks/bench_mining.py --device cuda --hd-bf16   # on a GPU: all four cases

On a GPU (`--device cuda`) peak memory is the CUDA allocator's peak during the call minus what
was allocated just before it (torch.cuda.max_memory_allocated), times are wall times after
torch.cuda.synchronize(), and the matmul peak is measured on the GPU in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from minigem.connectors.patch_mining import PatchMiningConnector
from minigem.vision.base import VisionFeatures
from minigem.vision.convnext import assemble_stages
from minigem.vision.hd import split_hr_views

N, C, DIMS = 576, 1024, (192, 384, 768, 1536)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------- variants


def _now() -> tuple[float, float]:
    if torch.cuda.is_initialized():  # the benchmark runs on a GPU: wait for its kernels
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


def _phases(t0, t1, t2, t3) -> dict[str, float]:
    names = ("assemble", "split", "mine")
    out = {n: b[0] - a[0] for n, a, b in zip(names, (t0, t1, t2), (t1, t2, t3), strict=True)}
    out["mine_cpu"] = t3[1] - t2[1]
    out["total_cpu"] = t3[1] - t0[1]
    return out


def ours(conn, stages, q, hd: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """HRTower's assembly writing the HD views directly (tower(px, grid=2, global_view=True))."""
    t0 = _now()
    hr = assemble_stages(stages, 2, True) if hd else assemble_stages(stages)  # [V, 2880, h, w]
    t1 = _now()
    out = conn.mine(VisionFeatures(q, hr))  # [V, N, C]
    return out, _phases(t0, t1, t1, _now())


def ours_split(conn, stages, q, hd: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """Assembly, then split_hr_views (the map and its split alive at once)."""
    t0 = _now()
    hr = assemble_stages(stages)  # [1, 2880, H/4, W/4]
    t1 = _now()
    if hd:
        hr = split_hr_views(hr, 2, True)  # [5, 2880, H/8, W/8]
    t2 = _now()
    out = conn.mine(VisionFeatures(q, hr))  # [V, N, C]
    return out, _phases(t0, t1, t2, _now())


def _release_mine(conn, q: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    b, c_hr, h, _ = hr.shape
    side = math.isqrt(q.shape[1])
    m = h // side
    x = hr.permute(0, 2, 3, 1).reshape(b, side, m, side, m, c_hr)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, side * side, m * m, c_hr).contiguous()
    qp = conn.vlm_uni_query_projector(q)  # [B, N, C]
    k = conn.vlm_uni_aux_projector(x)  # [B, N, M*M, C]
    v = conn.vlm_uni_val_projector(x)
    att = qp[:, :, None] @ (k.transpose(-1, -2) / math.sqrt(k.shape[-1]))  # [B, N, 1, M*M]
    return q + (att.nan_to_num().softmax(-1) @ v).mean(2)


def reference(conn, stages, q, hd: bool) -> tuple[torch.Tensor, dict[str, float]]:
    t0 = _now()
    size = stages[0].shape[-2:]
    ups = [stages[0]] + [
        F.interpolate(s.float(), size=size, mode="bilinear", align_corners=False).to(s.dtype)
        for s in stages[1:]
    ]
    hr = torch.cat(ups, 1)
    del ups
    t1 = _now()
    if hd:
        glob = F.interpolate(hr.float(), scale_factor=0.5, mode="bilinear", align_corners=False)
        glob = glob.to(hr.dtype)
        b, c_hr, h, w = hr.shape
        crops = hr.reshape(b, c_hr, 2, h // 2, 2, w // 2).permute(0, 2, 4, 1, 3, 5)
        crops = crops.flatten(0, 2).contiguous()
        del hr
        t2 = _now()
        out = torch.cat([_release_mine(conn, q[:1], glob), _release_mine(conn, q[1:], crops)])
    else:
        t2 = _now()
        out = _release_mine(conn, q, hr)
    return out, _phases(t0, t1, t2, _now())


# ----------------------------------------------------------------------------- worker


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_tracker(device: str):
    """(start, stop) -> MiB allocated by the call at its peak, inputs excluded."""
    if device == "cuda":
        def start() -> int:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()

        def stop(base: int) -> float:
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / 2**20
        return start, stop

    def cpu_start() -> int:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current
        return _status_kb("VmRSS")

    def cpu_stop(base: int) -> float:
        return (_status_kb("VmHWM") - base) / 1024
    return cpu_start, cpu_stop


def worker(impl: str, size: str, dtype_name: str, repeats: int, quick: bool, out_path: str,
           device: str = "cpu", chunk_cells: int | None = None):
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    scale = 4 if quick else 1  # quick: 4x smaller maps and 4x fewer tokens
    side_hr = (768 if size == "768" else 1536) // scale
    n = N // (scale * scale) if quick else N
    conn = PatchMiningConnector("linear", C, C, sum(DIMS), chunk_cells=chunk_cells)
    with torch.no_grad():
        for name, p in conn.named_parameters():
            if ".0." in f".{name}" and p.ndim == 1:  # non-trivial LayerNorm affines
                p.add_(torch.randn_like(p) * 0.2)
    conn = conn.to(device=device, dtype=dtype).eval()
    if impl in ("ours-rows", "ours-gathered", "ours-image"):  # a form other than the device's default
        conn.form = impl.split("-")[1]
    gen = torch.Generator().manual_seed(1)
    stages = [
        torch.randn(1, d, side_hr // 2 ** (s + 2), side_hr // 2 ** (s + 2), generator=gen).to(dtype)
        for s, d in enumerate(DIMS)
    ]
    views = 5 if size == "hd" else 1
    q = torch.randn(views, n, C, generator=gen).to(dtype)
    stages, q = [t.to(device) for t in stages], q.to(device)
    start, stop = _peak_tracker(device)
    fn = {"ours-split": ours_split, "reference": reference}.get(impl, ours)
    runs = []
    with torch.no_grad():
        for i in range(1 + repeats):
            gc.collect()
            base = start()
            t = _now()[0]
            out, phases = fn(conn, stages, q, size == "hd")
            total = _now()[0] - t
            runs.append({"total": total, "peak_mib": stop(base), **phases})
            if i == 0:
                torch.save(out.float().cpu(), out_path)
            del out
    cells = views * (side_hr // 4 // (2 if size == "hd" else 1)) ** 2
    print(json.dumps({"runs": runs, "cells": cells}))


# ----------------------------------------------------------------------------- driver


def peak_gflops(dtype: torch.dtype, quick: bool, device: str = "cpu") -> tuple[float, float]:
    """Best matmul rate (GFLOP per wall second, per CPU second): fp32 on 4096^2 squares,
    bf16 on the K/V projection's own shape (x @ W^T, which has a fast oneDNN path here).
    On a GPU both use the K/V projection's shape at 64k rows (a whole HD chunk's worth)."""
    if device == "cuda":
        rows = 65536
        a = torch.randn(rows, 2880, device=device, dtype=dtype)
        w = torch.randn(2 * C, 2880, device=device, dtype=dtype)
        fn, flops = (lambda: F.linear(a, w)), 2 * rows * 2880 * 2 * C
    elif dtype == torch.float32:
        n = 1024 if quick else 4096
        a, b = torch.randn(n, n), torch.randn(n, n)
        fn, flops = (lambda: a @ b), 2 * n**3
    else:
        rows = 512 if quick else 2048
        a, w = torch.randn(rows, 2880).to(dtype), torch.randn(2 * C, 2880).to(dtype)
        fn, flops = (lambda: F.linear(a, w)), 2 * rows * 2880 * 2 * C
    fn()
    times = []
    for _ in range(10 if device == "cuda" else 3):
        w0, c0 = _now()
        fn()
        w1, c1 = _now()
        times.append((w1 - w0, c1 - c0))
    return flops / min(t[0] for t in times) / 1e9, flops / min(t[1] for t in times) / 1e9


def run_variant(impl, size, dtype_name, repeats, args, tmp: Path) -> dict:
    out = tmp / f"{impl}-{size}-{dtype_name}.pt"
    cmd = [sys.executable, __file__, "--worker", impl, size, dtype_name, str(repeats), str(out)]
    cmd += ["--threads", str(args.threads), "--device", args.device]
    cmd += ["--chunk-cells", str(args.chunk_cells)] if args.chunk_cells else []
    cmd += ["--quick"] if args.quick else []
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr}")
    data = json.loads(res.stdout.strip().splitlines()[-1])
    data["out"] = out
    return data


def report(size: str, dt: str, res: dict, peaks: dict, unit: float = 1.0) -> None:
    """One table row per implementation; times in seconds x `unit` (1000 on a GPU: ms)."""
    ref_out = torch.load(res["reference"]["out"])
    for impl in res:
        runs = res[impl]["runs"]
        best = min(runs, key=lambda r: r["total"])
        flops = 2 * res[impl]["cells"] * sum(DIMS) * 2 * C  # K/V projection
        kv_wall, kv_cpu = (flops / (p * 1e9) for p in peaks[dt])
        diff = (torch.load(res[impl]["out"]) - ref_out).abs().max() / ref_out.abs().max()
        t = {k: v * unit for k, v in best.items()}
        print(f"| {size} | {dt} | {impl} | {runs[0]['total'] * unit:.2f} | {t['total']:.2f} "
              f"| {t['assemble']:.2f} | {t['split']:.2f} | {t['mine']:.2f} "
              f"| {runs[0]['peak_mib']:.0f} | {best['mine'] / kv_wall:.2f}x "
              f"| {best['mine_cpu'] / kv_cpu:.2f}x | {best['total_cpu'] / kv_cpu:.2f}x "
              f"| {diff:.1e} |", flush=True)  # fmt: skip
    o, r = res["ours"]["runs"], res["reference"]["runs"]
    mem = r[0]["peak_mib"] / o[0]["peak_mib"]
    wall = min(x["total"] for x in r) / min(x["total"] for x in o)
    cpu = min(x["total_cpu"] for x in r) / min(x["total_cpu"] for x in o)
    print(f"| {size} | {dt} | **ours vs ref** | peak memory {mem:.2f}x lower; "
          f"time {wall:.2f}x (wall), {cpu:.2f}x (CPU) faster | | | | | | | | | |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=5, metavar=("IMPL", "SIZE", "DTYPE", "REPEATS", "OUT"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--hd-bf16", action="store_true", help="also run HD in bf16 (slow on CPU)")
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--sizes", nargs="+", choices=["768", "hd"], default=["768", "hd"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--chunk-cells", type=int, default=None,
                    help="PatchMiningConnector.chunk_cells (default: its own, 16384 for the "
                    "row-at-a-time form, 32768 for the gathered form)")
    ap.add_argument("--both-forms", action="store_true",
                    help="also time the mining forms that are not the device's default (GPU: "
                    "`ours-rows`, the map read in place a few token rows per step, and "
                    "`ours-gathered`, each token's block copied out; CPU: `ours-gathered` and "
                    "`ours-image`, an image per step as one batched GEMM); on by default on a GPU")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.worker:
        impl, size, dt, reps, out = a.worker
        worker(impl, size, dt, int(reps), a.quick, out, a.device, a.chunk_cells)
        return
    cases = [("768", "fp32", a.repeats), ("hd", "fp32", a.repeats)]
    bf_reps = a.repeats if a.device == "cuda" else 0  # CPU bf16 is slow here: one call
    cases += [] if a.no_bf16 else [("768", "bf16", bf_reps)] + ([("hd", "bf16", bf_reps)] if a.hd_bf16 else [])
    cases = [c for c in cases if c[0] in a.sizes]
    where = (torch.cuda.get_device_name() if a.device == "cuda"
             else f"cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"torch {torch.__version__}, threads {a.threads}, {where}, chunk_cells {a.chunk_cells or 'default'}")
    peaks = {name: peak_gflops(DTYPES[name], a.quick, a.device) for name in ("fp32", "bf16")}
    print("matmul peak GFLOP/s (wall; per CPU-second): "
          + ", ".join(f"{k} {w:.1f}; {c:.1f}" for k, (w, c) in peaks.items()))  # fmt: skip
    unit, u = (1000.0, "ms") if a.device == "cuda" else (1.0, "s")
    print(
        f"| size | dtype | impl | first {u} | best {u} | assemble {u} | split {u} | mine {u} | peak MiB "
        "| mine / KV@peak (wall) | mine / KV@peak (CPU) | total / KV@peak (CPU) | max rel diff |"
    )
    print("|---" * 13 + "|")
    with tempfile.TemporaryDirectory() as tmp:
        for size, dt, reps in cases:
            impls = ["ours", "ours-split", "reference"] if size == "hd" else ["ours", "reference"]
            if a.both_forms or a.device == "cuda":
                others = ["ours-rows", "ours-gathered"] if a.device == "cuda" else ["ours-gathered", "ours-image"]
                impls[1:1] = others
            res = {i: run_variant(i, size, dt, reps, a, Path(tmp)) for i in impls}
            report(size, dt, res, peaks, unit)


if __name__ == "__main__":
    main()
