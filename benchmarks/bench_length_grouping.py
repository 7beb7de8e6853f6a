"""Training steps with less compute on padding: batches grouped by length (`group_by_length`)
and padding-free packing (`padding_free`), each against the plain padded batch.

The bundled model (`minigem/assets/tiny-shapes`) and the instruct stage of
`recipes/tiny-shapes.yaml` (its data mix, batch size, optimiser), on this machine's CPU in
fp32: each step is the whole of what the trainer does per step (draw the records, encode,
collate, forward, backward, AdamW), fed by the trainer's own `ResumableBatchSampler`. The
cells run alternately (repeat r: plain, grouped, padding-free, both; each on its own next
batches) and each cell is the median over repeats, so all see the same background load.
Padding = pad positions / all positions of the padded batches (a padding-free step computes the
LLM on the real tokens only; its batches are the plain order's, so they pad as much).

    .venv/bin/python benchmarks/bench_length_grouping.py               # 5 repeats x 20 steps
    .venv/bin/python benchmarks/bench_length_grouping.py --repeats 1 --steps 5   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import minigem
from minigem.config import load_recipe
from minigem.data.collate import SampleEncoder, collate
from minigem.training.data import EncodedDataset, ResumableBatchSampler, open_source
from minigem.training.loop import make_optimizer
from minigem.training.stages import apply_stage

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-shapes.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="steps per cell and repeat")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    stage = next(s for s in load_recipe(RECIPE).training.stages if s.name == "instruct")
    model = minigem.load()
    apply_stage(model, stage)  # what the stage trains (connector + LLM), the tower frozen
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], stage)
    ds = EncodedDataset(open_source(stage.data), SampleEncoder.for_model(model))
    pad = model.tokenizer.pad_token_id or 0
    lengths = partial(ds.length, tokens_per_image=model.tokens_per_image)
    total = args.repeats * args.steps
    cells = {"plain": (None, False), "grouped": (lengths, False),
             "padding-free": (None, True), "grouped+pf": (lengths, True)}
    loaders = {
        name: iter(DataLoader(ds, collate_fn=partial(collate, pad_id=pad), batch_sampler=(
            ResumableBatchSampler(len(ds), stage.batch_size, 0, total=total + 1, lengths=lens))))
        for name, (lens, _) in cells.items()
    }
    times: dict[str, list[float]] = {k: [] for k in loaders}
    padding: dict[str, list[float]] = {k: [] for k in loaders}
    for name, it in loaders.items():  # warm-up step each
        out = model(**{k: v for k, v in next(it).items() if k != "category"}, padding_free=cells[name][1])
        out.loss.backward()
        opt.zero_grad()
    for _ in range(args.repeats):
        for name, it in loaders.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                batch = next(it)
                padding[name].append(1 - batch["attention_mask"].float().mean().item())
                out = model(**{k: v for k, v in batch.items() if k != "category"},
                            padding_free=cells[name][1])
                out.loss.backward()
                opt.step()
                opt.zero_grad()
            times[name].append((time.perf_counter() - t0) / args.steps)
    print(f"bundled model, instruct stage of {RECIPE.name}: batch {stage.batch_size}, "
          f"{args.threads} threads, {args.repeats} x {args.steps} steps, fp32")
    print(f"{'cell':>12} {'s/step':>8} {'steps/s':>8} {'padding':>8}")
    base = statistics.median(times["plain"])
    for name in loaders:
        t = statistics.median(times[name])
        print(f"{name:>12} {t:8.3f} {1 / t:8.2f} {statistics.mean(padding[name]):8.1%}"
              + (f"   {base / t:.2f}x plain" if name != "plain" else ""))


if __name__ == "__main__":
    main()
