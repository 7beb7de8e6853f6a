"""The three patch-mining forms at tiny-mgm's training size (batch 32, 9 LR tokens of 512
channels, a 240-channel 24 x 24 HR map; recipes/tiny-mgm.yaml): forward + backward time of the
connector per form, the numbers behind `default_form`'s choice for small maps
(docs/BENCHMARKS.md, "Small maps stay gathered").

    .venv/bin/python benchmarks/bench_mining_forms.py                 # this CPU
    python benchmarks/bench_mining_forms.py --device cuda             # a GPU
"""

from __future__ import annotations

import argparse
import time

import torch

from minigem.connectors.patch_mining import PatchMiningConnector, default_form
from minigem.vision.base import VisionFeatures


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args()
    dev = a.device
    torch.manual_seed(0)
    conn = PatchMiningConnector("mlp2x_gelu", 512, 192, 240).to(dev)
    q = torch.randn(a.batch, 9, 512, device=dev, requires_grad=True)
    hr = torch.randn(a.batch, 240, 24, 24, device=dev)

    def sync() -> None:
        if dev == "cuda":
            torch.cuda.synchronize()

    print(f"torch {torch.__version__}, {dev}, threads {torch.get_num_threads()}, "
          f"default form here: {default_form(dev == 'cuda', 24 * 24)}")
    for form in ("rows", "gathered", "image"):
        conn.form = form

        def step() -> None:
            conn.zero_grad()
            conn(VisionFeatures(q, hr)).square().mean().backward()

        for _ in range(3):
            step()
        sync()
        t = time.perf_counter()
        for _ in range(a.steps):
            step()
        sync()
        print(f"{form}: {(time.perf_counter() - t) / a.steps * 1e3:.2f} ms forward + backward")


if __name__ == "__main__":
    main()
