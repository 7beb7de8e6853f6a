"""Serving throughput and latency at several concurrency levels, against `minigem serve`.

Starts the server as a subprocess on 127.0.0.1 (the bundled model, or --model; with neither,
a random-weight model of the bundled architecture), then runs closed-loop clients: C
workers, each sending its next request as soon as the last one is answered. Every request
carries one image and a question; answers are capped at --max-tokens. The levels run
round-robin --rounds times (so every level sees the same background load); prints per level
the median requests/s and tokens/s over rounds, p50/p99 latency over all requests, the
server's CPU time per request (user + system, all its threads; Linux only: less sensitive
to other load on the machine than the wall-clock numbers) and the batched / sequential
throughput ratio.

    python benchmarks/bench_serve.py [--model DIR] [--levels 1,8,32] [--requests 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minigem.serving.testing import free_port, png_data_url  # noqa: E402

QUESTIONS = ["What color is the circle?", "How many objects are there?", "Describe the image.",
             "Where is the red square?"]


def model_dir(arg: str | None, tmp: Path, random_weights: bool) -> tuple[str | None, str]:
    from minigem.checkpoints.native import BUNDLED

    if arg:
        return arg, arg
    if (BUNDLED / "config.json").is_file() and not random_weights:
        return None, "bundled tiny-shapes"
    from minigem.checkpoints.native import save_model
    from minigem.config import load_recipe
    from minigem.training.build import build_for_recipe

    model = build_for_recipe(load_recipe(ROOT / "recipes" / "tiny-shapes.yaml"))
    return str(save_model(model, tmp / "tiny-shapes-random")), "tiny-shapes architecture, random weights"


def start_server(model: str | None, port: int, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "minigem.cli", "serve", "--port", str(port), "--max-batch",
           str(args.max_batch), "--max-queue", "1024", "--timeout", "600"]
    if model:
        cmd += ["--model", model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).raise_for_status()
            return proc
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise SystemExit("the server did not come up in 300 s") from None
            time.sleep(0.3)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (nan where /proc is missing)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bodies(max_tokens: int, n: int = 24) -> list[bytes]:
    """Request bodies, encoded once (the client should cost the machine as little as it can)."""
    out = []
    for k in range(n):
        image = png_data_url(((37 * k) % 256, 120, 200), (48 + 16 * (k % 3), 48))
        out.append(json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image}},
            {"type": "text", "text": QUESTIONS[k % len(QUESTIONS)]}]}],
            "max_tokens": max_tokens, "temperature": 0}).encode())
    return out


async def run_level(url: str, concurrency: int, n: int, max_tokens: int) -> dict:
    latencies: list[float] = []
    tokens = 0
    todo = iter(range(n))
    payloads = bodies(max_tokens)
    headers = {"content-type": "application/json"}

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        for k in todo:
            t0 = time.perf_counter()
            r = await client.post("/v1/chat/completions", content=payloads[k % len(payloads)],
                                  headers=headers)
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"rps": n / wall, "tps": tokens / wall, "latencies": latencies, "tokens": tokens / n}


def summary(c: int, runs: list[dict]) -> dict:
    lat = sorted(x for r in runs for x in r["latencies"])
    return {"c": c, "rps": statistics.median(r["rps"] for r in runs),
            "tps": statistics.median(r["tps"] for r in runs), "tokens": runs[0]["tokens"],
            "p50": statistics.median(lat) * 1e3, "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3,
            "cpu": statistics.median(r["cpu"] for r in runs) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--requests", type=int, default=64, help="requests per level")
    ap.add_argument("--rounds", type=int, default=3, help="round-robin repeats of all levels")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="server torch threads")
    ap.add_argument("--random-weights", action="store_true",
                    help="the bundled architecture with random weights: answers run to --max-tokens "
                         "(a decode-heavy load; the bundled model answers in ~5 tokens)")
    args = ap.parse_args()
    levels = [int(c) for c in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model, what = model_dir(args.model, Path(tmp), args.random_weights)
        port = free_port()
        proc = start_server(model, port, args)
        url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(run_level(url, 2, 4, args.max_tokens))  # warm-up
            runs: dict[int, list[dict]] = {c: [] for c in levels}
            for _ in range(args.rounds):
                for c in levels:
                    cpu = cpu_seconds(proc.pid)
                    runs[c].append(asyncio.run(run_level(url, c, args.requests, args.max_tokens)))
                    runs[c][-1]["cpu"] = (cpu_seconds(proc.pid) - cpu) / args.requests
            rows = [summary(c, runs[c]) for c in levels]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"model: {what}; {args.requests} requests per level x {args.rounds} rounds, 1 image + question each, "
          f"max_tokens {args.max_tokens}, max batch {args.max_batch}, cpus {os.cpu_count()}")
    print(f"{'concurrency':>11} {'req/s':>8} {'tok/s':>8} {'tok/req':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'cpu ms/req':>10} {'x seq':>6}")
    base = rows[0]["rps"]
    for r in rows:
        print(f"{r['c']:>11} {r['rps']:>8.2f} {r['tps']:>8.1f} {r['tokens']:>8.1f} {r['p50']:>8.0f} "
              f"{r['p99']:>8.0f} {r['cpu']:>10.1f} {r['rps'] / base:>6.2f}")


if __name__ == "__main__":
    main()
