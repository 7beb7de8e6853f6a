#!/usr/bin/env python
"""Can patch mining pass a glyph on? Direct-supervision probes on a frozen Mini-Gemini model.

    python scripts/probe_mining.py --model MGM_DIR [--variants mining,max,mean] [--steps 600]
    python scripts/probe_mining.py --model MGM_DIR --variants mining --train-hr --save DIR

MGM_DIR is a native Mini-Gemini checkpoint whose towers are kept frozen, e.g. the HR-pretrained
init that `scripts/ablate_mgm.py --hr-steps 1500 --hr-only` writes to OUT/runs/hr-pretrain/final.
Scenes of the synthetic world with glyphs are drawn at the model's HR size; both towers run once
and their features are kept in memory. Each glyphed object is one example: the LR token of its
grid cell (after the connector's pooling and position embedding: the mining's query) and that
token's M x M sub-region of the HR map. A variant reads the sub-region into one vector, a linear
head maps it to the glyph (chance 1/16), and only the variant and the head train (AdamW,
cross-entropy). Accuracy is measured on objects of held-out scenes. With --train-hr the HR tower
trains too; with --save (and the `mining` variant) the model with its tower and mining layers as
trained is written out: a glyph-supervised pretraining of tower + mining, the init that
`scripts/ablate_mgm.py --mgm-init DIR` starts its mgm arm from. A recipe does the `mining
--train-hr` job with a `kind: glyph` stage (minigem/training/glyph.py), on a fresh scene per example.

Variants:
- mining:     the model's own patch-mining layers (LayerNorm+Linear Q/K/V, one head, 1/sqrt(C)),
              value projection from zero as in the ablation's arm; the head reads Q + mined;
- projector:  the model's mining as it is (V not reset) and its projector, both training: the head
              reads what the LLM sees, and a second loss (--keep-weight) keeps the projector's
              output for the LR token alone where it was, or with --keep-on mined its output for
              every cell's LR token plus mined detail near that (with --save: an init for the arm);
- max / mean: per-channel max / mean over the sub-region (no mining; what pooling can read);
- attn[-opts]: the same attention written here, with options joined by '-': `noln` (no
              LayerNorm on the keys), `temp` (a learned inverse temperature, from 1), `h4`
              (4 heads), `vrand` (value projection at its random init, not zero), `big` (Q and K
              projections initialised 4x larger: scores 16x larger from the start).
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from minigem.checkpoints.native import load_model, save_model
from minigem.data.synth import GLYPHS, make_scene, render

SIDE = 3  # the world's grid: one LR token per cell


def sub_regions(high: torch.Tensor, image: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
    """HR map [n, C_hr, H, W] -> each object's sub-region [k, C_hr, M*M] (object k is in image
    image[k], grid cell cell[k])."""
    m = high.shape[-1] // SIDE
    blocks = high.unflatten(2, (SIDE, m)).unflatten(4, (SIDE, m))  # [n, C, 3, M, 3, M]
    blocks = blocks.permute(0, 2, 4, 1, 3, 5).flatten(1, 2).flatten(3)  # [n, 9, C, M*M]
    return blocks[image, cell]


def hr_regions(tower: nn.Module, pixels: torch.Tensor, image: torch.Tensor, cell: torch.Tensor,
               idx: torch.Tensor) -> torch.Tensor:
    """Sub-regions of objects idx from the HR tower run now (each scene once): the --train-hr path."""
    used, inverse = image[idx].unique(return_inverse=True)
    return sub_regions(tower(pixels[used]), inverse, cell[idx])


def features(model, n_scenes: int, seed: int, batch: int = 64, keep_pixels: bool = False,
             every_cell: bool = False):
    """Per glyphed object: (query [C], sub-region [C_hr, M*M], glyph id); with keep_pixels, the
    sub-region is replaced by (the HR pixels of every scene, object -> scene, object -> cell).
    With every_cell, every cell of every scene is an example (glyph id -1 where it shows none)."""
    hr_size = model.processor.hr_size
    rng = random.Random(seed)
    qs, regions, labels, pixels, image, cell = [], [], [], [], [], []
    with torch.no_grad():
        for b0 in range(0, n_scenes, batch):
            scenes = [make_scene(rng, need_glyph=True) for _ in range(min(batch, n_scenes - b0))]
            pix = model.processor([render(s, max(hr_size, 96)) for s in scenes])  # resized to hr_size
            low = model.connector.pooled(model.vision_tower(pix["pixel_values"]))  # [b, 9, C]
            if low.shape[1] != SIDE * SIDE:
                raise SystemExit(f"the probe needs one visual token per cell of the world's 3x3 grid; "
                                 f"this model has {low.shape[1]} per image")
            if every_cell:
                shown = [{o.cell: o.glyph for o in s.objects} for s in scenes]
                objs = [(i, c, shown[i].get(c)) for i in range(len(scenes)) for c in range(SIDE * SIDE)]
            else:
                objs = [(i, o.cell, o.glyph) for i, s in enumerate(scenes) for o in s.objects
                        if o.glyph is not None]
            idx = torch.tensor([i for i, _, _ in objs])
            cells = torch.tensor([c for _, c, _ in objs])
            qs.append(low[idx, cells])
            labels += [-1 if g is None else GLYPHS.index(g) for _, _, g in objs]
            if keep_pixels:
                image.append(idx + b0)
                cell.append(cells)
                pixels.append(pix["pixel_values_aux"])
            else:
                regions.append(sub_regions(model.vision_tower_aux(pix["pixel_values_aux"]), idx, cells))
    if keep_pixels:
        return torch.cat(qs), (torch.cat(pixels), torch.cat(image), torch.cat(cell)), torch.tensor(labels)
    return torch.cat(qs), torch.cat(regions), torch.tensor(labels)


class Attn(nn.Module):
    """Single- or multi-head attention of one query over its sub-region's cells."""

    def __init__(self, c: int, c_hr: int, opts: set[str]) -> None:
        super().__init__()
        self.heads = 4 if "h4" in opts else 1
        self.q = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, c))
        self.k = nn.Sequential(nn.Identity() if "noln" in opts else nn.LayerNorm(c_hr), nn.Linear(c_hr, c))
        self.v = nn.Sequential(nn.LayerNorm(c_hr), nn.Linear(c_hr, c))
        self.log_temp = nn.Parameter(torch.zeros(())) if "temp" in opts else None
        if "big" in opts:  # Q and K projections 4x their nn.Linear init: 16x larger scores
            with torch.no_grad():
                self.q[1].weight.mul_(4)
                self.k[1].weight.mul_(4)
        if "vrand" not in opts:
            nn.init.zeros_(self.v[1].weight)
            nn.init.zeros_(self.v[1].bias)
        self.attn: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        cells = region.transpose(1, 2)  # [b, M*M, C_hr]
        h = self.heads
        b, n, _ = cells.shape
        qq = self.q(q).view(b, h, 1, -1)
        k = self.k(cells).view(b, n, h, -1).transpose(1, 2)
        v = self.v(cells).view(b, n, h, -1).transpose(1, 2)
        scale = 1 / math.sqrt(qq.shape[-1])
        if self.log_temp is not None:
            scale = scale * self.log_temp.exp()
        self.attn = ((qq @ k.transpose(-1, -2)) * scale).softmax(-1)  # [b, h, 1, n]
        return q + (self.attn @ v).reshape(b, -1)


class ModelMining(nn.Module):
    """The checkpoint's own patch-mining layers on one token and its sub-region."""

    def __init__(self, model, zero_v: bool = True) -> None:
        super().__init__()
        conn = model.connector
        self.q, self.k, self.v = conn.vlm_uni_query_projector, conn.vlm_uni_aux_projector, conn.vlm_uni_val_projector
        self.conn = conn
        if zero_v:
            with torch.no_grad():
                self.v[1].weight.zero_()
                self.v[1].bias.zero_()
        self.attn: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        b, c_hr, mm = region.shape
        m = math.isqrt(mm)
        hr = region.view(b, c_hr, m, m)  # one token (already pooled) and its M x M block each
        parts = list(self.conn._chunks(q.unsqueeze(1), hr))  # chunks of whole images
        self.attn = torch.cat([a for *_, a in parts])  # [b, 1, M*M]
        return q + torch.cat([att for *_, att, _ in parts]).squeeze(1)


class Pool(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.attn = None

    def forward(self, q: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        return region.amax(-1) if self.kind == "max" else region.mean(-1)


class ThroughProjector(nn.Module):
    """The checkpoint's mining (as it is: V not reset) followed by its projector: the glyph head
    reads what the LLM would see."""

    def __init__(self, model) -> None:
        super().__init__()
        self.mining = ModelMining(model, zero_v=False)
        self.projector = model.connector.projector

    @property
    def attn(self) -> torch.Tensor | None:
        return self.mining.attn

    def forward(self, q: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        return self.projector(self.mining(q, region))


def build(variant: str, model, c: int, c_hr: int) -> tuple[nn.Module, int]:
    if variant == "mining":
        return ModelMining(model), c
    if variant == "projector":
        return ThroughProjector(model), model.language_model.config.hidden_size
    if variant in ("max", "mean"):
        return Pool(variant), c_hr
    name, *opts = variant.split("-")
    if name != "attn" or not set(opts) <= {"noln", "temp", "h4", "vrand", "big"}:
        raise SystemExit(f"unknown variant {variant!r}")
    return Attn(c, c_hr, set(opts)), c


def run(variant: str, model, train, test, args, keep_set=None) -> dict:
    torch.manual_seed(args.seed)
    q, reg, y = train
    tower = model.vision_tower_aux
    if args.train_hr:  # regions from the HR tower at every step, the tower training too
        tower.train()

        def region(idx):
            return hr_regions(tower, *reg, idx)
    else:
        def region(idx):
            return reg[idx]
    reader, dim = build(variant, model, q.shape[-1], tower.out_channels)
    head = nn.Linear(dim, len(GLYPHS))
    params = [*reader.parameters(), *head.parameters()]
    if args.train_hr:
        params += list(tower.parameters())
    for p in params:
        p.requires_grad_(True)
    kept = None  # idx -> (an output of the projector, where the starting projector put it)
    if variant == "projector":
        start = copy.deepcopy(reader.projector).requires_grad_(False)
        if keep_set is not None:  # what the LLM sees (LR + mined), any cell, vs. the LR token alone
            qk, rk = keep_set

            def kept(idx):
                kdx = torch.randint(len(qk), (len(idx),), generator=g)
                return reader(qk[kdx], rk[kdx]), start(qk[kdx])
        else:  # the projector's output for the glyphed objects' LR tokens alone

            def kept(idx):
                return reader.projector(q[idx]), start(q[idx])
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    t0, hits, curve = time.perf_counter(), [], []
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(y), (args.batch,), generator=g)
        logits = head(reader(q[idx], region(idx)))
        loss = F.cross_entropy(logits, y[idx])
        if kept is not None:  # relative MSE
            got, want = kept(idx)
            loss = loss + args.keep_weight * F.mse_loss(got, want) / want.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        hits.append((logits.argmax(-1) == y[idx]).float().mean().item())
        if step % args.report == 0:
            curve.append((step, sum(hits[-args.report:]) / args.report))
    tower.eval()
    with torch.no_grad():
        qt, rt, yt = test
        if args.train_hr:
            rt = torch.cat([hr_regions(tower, *rt, torch.arange(k, min(k + 64, len(yt))))
                            for k in range(0, len(yt), 64)])
        logits = head(reader(qt, rt))
        acc = (logits.argmax(-1) == yt).float().mean().item()
        att = reader.attn
        peak = att.amax(-1).mean().item() if att is not None else float("nan")
    return {"variant": variant, "test_acc": acc, "curve": curve, "attn_peak": peak,
            "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="native Mini-Gemini checkpoint directory")
    ap.add_argument("--variants", default="mining,max,mean")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train-scenes", type=int, default=3000)
    ap.add_argument("--test-scenes", type=int, default=500)
    ap.add_argument("--report", type=int, default=100, help="steps per point of the training curve")
    ap.add_argument("--train-hr", action="store_true",
                    help="train the HR tower too (through the reader), from the checkpoint's weights; "
                         "one variant per run")
    ap.add_argument("--save", metavar="DIR",
                    help="with --train-hr and the `mining` variant: write the model, its HR tower and "
                         "mining layers as trained here, as a native checkpoint (an init for "
                         "`ablate_mgm.py --mgm-init`)")
    ap.add_argument("--keep-weight", type=float, default=1.0,
                    help="`projector` variant: weight of keeping the projector's outputs (see --keep-on)")
    ap.add_argument("--keep-on", choices=["lr", "mined"], default="lr",
                    help="`projector` variant: keep the projector's output for the LR token alone "
                         "(lr), or for the LR token plus what the mining adds, i.e. what the LLM "
                         "sees, on every cell of --keep-scenes scenes (mined), near the starting "
                         "projector's output for the LR token alone")
    ap.add_argument("--keep-scenes", type=int, default=1000,
                    help="scenes whose every cell feeds the `--keep-on mined` loss")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.train_hr and len(variants) != 1:
        raise SystemExit("--train-hr trains the tower: give one variant")
    if args.save and not ((args.train_hr and variants == ["mining"]) or variants == ["projector"]):
        raise SystemExit("--save writes the model's own trained layers: use it with --train-hr --variants "
                         "mining, or with --variants projector")
    if args.keep_on == "mined" and (variants != ["projector"] or args.train_hr):
        raise SystemExit("--keep-on mined is for the `projector` variant alone, without --train-hr")
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    if model.vision_tower_aux is None or not hasattr(model.connector, "vlm_uni_query_projector"):
        raise SystemExit(f"{args.model}: not a Mini-Gemini (patch mining) checkpoint")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    t0 = time.perf_counter()
    train = features(model, args.train_scenes, seed=1000 + args.seed, keep_pixels=args.train_hr)
    test = features(model, args.test_scenes, seed=2000 + args.seed, keep_pixels=args.train_hr)
    keep_set = None
    if args.keep_on == "mined":
        keep_set = features(model, args.keep_scenes, seed=3000 + args.seed, every_cell=True)[:2]
    print(f"features: {len(train[2])} train / {len(test[2])} test objects, query {tuple(train[0].shape[1:])}"
          f"{', HR tower training' if args.train_hr else ''} ({time.perf_counter() - t0:.0f} s)", flush=True)
    print("| variant | test acc | train acc by step | mean peak attention | s |")
    print("|---|---:|---|---:|---:|")
    for v in variants:
        r = run(v, model, train, test, args, keep_set)
        curve = ", ".join(f"{s}: {a:.0%}" for s, a in r["curve"])
        print(f"| {v} | {r['test_acc']:.1%} | {curve} | {r['attn_peak']:.3f} | {r['seconds']:.0f} |", flush=True)
    if args.save:
        print(f"saved: {save_model(model.eval(), args.save)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
