"""minigem's VisionLanguageModel vs transformers' LlavaForConditionalGeneration, side by side.

Same config, same weights (the HF model is loaded from `export_hf_llava` of ours, and the
logits are checked equal before timing), same inputs, CPU fp32:

- training step: forward + backward + AdamW step, batch 8, one image per sample, projector
  and LLM trainable (LLaVA's instruct stage), loss on the answer tokens only;
- greedy generation, exactly N new tokens per row (HF: min_new_tokens = max_new_tokens; ours:
  a tokenizer without EOS, so nothing stops early), batch 1 and batch 8 (left-padded);
- batched generation of 8 prompts vs the same 8 one after another.

Ours and HF run alternately (repeat r: ours then HF), and each cell is the median over
repeats, so both see the same background load. MFU = model FLOPs (the work minigem needs:
`train_flops` / `gen_flops`, the same count for both sides) / time / the best 2048x2048 fp32
matmul rate measured in the run (before and after each config, same thread count).

    .venv/bin/python benchmarks/bench_core.py                          # tiny + small, 5 repeats
    .venv/bin/python benchmarks/bench_core.py --configs tiny --repeats 1  # smoke run
    .venv/bin/python benchmarks/bench_core.py --threads 1                 # on a loaded machine
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

from minigem.chat import IGNORE_INDEX, encode_segments
from minigem.checkpoints.hf_llava import export_hf_llava
from minigem.checkpoints.native import save_model
from minigem.config import ModelConfig
from minigem.data.records import Message
from minigem.generation.decode import GenerationConfig, generate, left_pad
from minigem.model import VisionLanguageModel
from minigem.training.build import train_world_tokenizer


@dataclass(frozen=True)
class Spec:
    name: str
    vit: tuple[int, int, int, int, int]  # layers, width, mlp, image, patch
    llm: tuple[int, int, int, int]  # layers, width, mlp, vocab (0 = the tokenizer's)
    select_layer: int


SPECS = {
    "tiny": Spec("tiny", (4, 128, 512, 48, 16), (4, 192, 512, 0), -1),  # the bundled model's sizes; patch 16 gives its 9 tokens (it: patch 8 + pool 2, which HF cannot load)
    "small": Spec("small", (12, 384, 1536, 224, 16), (12, 768, 2048, 32000), -2),
}
BATCH, NEW_TOKENS = 8, 32
QUESTIONS = ["What color is the circle?", "How many objects are there?", "Where is the red square?",
             "Is there a blue triangle in the picture?", "What shape is the green object?",
             "Describe the image.", "How many yellow diamonds are there in this image?", "What is it?"]


def build(spec: Spec, workdir: Path) -> tuple[VisionLanguageModel, LlavaForConditionalGeneration]:
    (vl, vd, vf, img, patch), (ll, ld, lf, vocab) = spec.vit, spec.llm
    text = {"hidden_size": ld, "intermediate_size": lf, "num_hidden_layers": ll,
            "num_attention_heads": ld // 64, "num_key_value_heads": ld // 64,
            "max_position_embeddings": 1024, "tie_word_embeddings": False}
    if vocab:
        text["vocab_size"] = vocab
    cfg = ModelConfig.model_validate({
        "vision": {"config": {"hidden_size": vd, "intermediate_size": vf, "num_hidden_layers": vl,
                              "num_attention_heads": vd // 64, "image_size": img, "patch_size": patch},
                   "select_layer": spec.select_layer},
        "llm": {"arch": "llama", "config": text},
        "tokenizer_train": {"vocab_size": 512}, "template": "vicuna_v1", "system_prompt": "",
    })
    torch.manual_seed(0)
    ours = VisionLanguageModel.build(cfg, train_world_tokenizer(cfg)).eval()
    save_model(ours, workdir / "native")
    export_hf_llava(workdir / "native", workdir / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(workdir / "hf").eval()
    return ours, hf


def train_batch(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    """BATCH samples: prompt with one image + a supervised answer, right-padded."""
    rows = []
    for i in range(BATCH):
        q = QUESTIONS[i % len(QUESTIONS)]
        msgs = [Message("user", f"<image>\n{q}"), Message("assistant", f"The answer to '{q}' is red.")]
        segs = model.template.render(msgs, tokenizer=model.tokenizer)
        rows.append(encode_segments(model.tokenizer, segs, "<image>", model.tokens_per_image))
    width = max(len(ids) for ids, _ in rows)
    pad = model.tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r, _ in rows])
    labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in rows])
    side = model.vision_tower.image_size
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "pixel_values": torch.randn(BATCH, 3, side, side, generator=torch.Generator().manual_seed(0))}


def trainer(model: torch.nn.Module, vision: torch.nn.Module, batch: dict) -> Callable[[], float]:
    vision.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    model.train()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        return loss.detach().item()

    return step


def prompts(model: VisionLanguageModel) -> tuple[list[list[int]], torch.Tensor]:
    ids = [model.encode_prompt([Message("user", f"<image>\n{q}")], 1) for q in QUESTIONS[:BATCH]]
    side = model.vision_tower.image_size
    return ids, torch.randn(BATCH, 3, side, side, generator=torch.Generator().manual_seed(1))


def ours_gen(model, ids, pix) -> Callable[[], None]:
    def run() -> None:
        outs = generate(model, ids, pix, None, GenerationConfig(max_new_tokens=NEW_TOKENS))
        assert all(len(o.token_ids) == NEW_TOKENS for o in outs)
    return run


def hf_gen(model, ids, pix, pad_id: int, eos_id: int) -> Callable[[], None]:
    x, mask = left_pad(ids, pad_id)

    @torch.inference_mode()
    def run() -> None:
        out = model.generate(input_ids=x, attention_mask=mask, pixel_values=pix, do_sample=False,
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             pad_token_id=pad_id, eos_token_id=eos_id)
        assert out.shape[1] == x.shape[1] + NEW_TOKENS
    return run


def sequential(runs: list[Callable[[], None]]) -> Callable[[], None]:
    def run() -> None:
        for r in runs:
            r()
    return run


def interleaved(pairs: dict[str, tuple[Callable, Callable]], repeats: int) -> dict[str, tuple[float, float]]:
    """Median seconds (ours, HF) per row; ours and HF alternate within each repeat."""
    times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in pairs}
    for a, b in pairs.values():  # warm-up
        a(), b()
    for _ in range(repeats):
        for name, fns in pairs.items():
            for side, fn in enumerate(fns):
                t0 = time.perf_counter()
                fn()
                times[name][side].append(time.perf_counter() - t0)
    return {k: (statistics.median(a), statistics.median(b)) for k, (a, b) in times.items()}


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """Best fp32 GFLOP/s of an n x n matmul."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def vision_flops(model: VisionLanguageModel, images: int) -> float:
    """Forward FLOPs of the patch embedding and the layers the tower runs."""
    tower = model.vision_tower
    cfg, d = tower.model.config, tower.hidden_size
    n = (tower.image_size // tower.patch_size) ** 2
    per_layer = 2 * (n + 1) * (4 * d * d + 2 * d * cfg.intermediate_size) + 4 * (n + 1) ** 2 * d
    return images * (2 * n * 3 * tower.patch_size**2 * d + tower.depth * per_layer)


def llm_params(model: VisionLanguageModel) -> tuple[int, int]:
    """(matmul weights of the projector and the LLM's layers, LM head weights)."""
    lm = model.language_model
    body = sum(m.weight.numel() for m in model.connector.modules() if isinstance(m, torch.nn.Linear))
    body += sum(m.weight.numel() for m in lm.model.layers.modules() if isinstance(m, torch.nn.Linear))
    return body, lm.lm_head.weight.numel()


def train_flops(model: VisionLanguageModel, batch: dict) -> float:
    """Fwd+bwd model FLOPs: frozen tower fwd; 6 N T for projector + LLM layers; 12 L d S^2
    attention; the LM head only where the loss needs logits (as minigem computes it)."""
    body, head = llm_params(model)
    cfg = model.language_model.config
    b, s = batch["input_ids"].shape
    kept = int((batch["labels"][:, 1:] != IGNORE_INDEX).any(0).sum())
    attn = 12 * cfg.num_hidden_layers * cfg.hidden_size * b * s * s
    return vision_flops(model, b) + 6 * body * b * s + attn + 6 * head * b * kept


def gen_flops(model: VisionLanguageModel, ids: list[list[int]]) -> float:
    """Prefill (tower, LLM over the prompt, head on its last token) + NEW_TOKENS - 1 decode steps."""
    body, head = llm_params(model)
    cfg = model.language_model.config
    ld = cfg.num_hidden_layers * cfg.hidden_size
    total = vision_flops(model, len(ids))
    for row in ids:
        s = len(row)
        total += 2 * body * s + 4 * ld * s * s + 2 * head
        total += sum(2 * body + 2 * head + 4 * ld * (s + k) for k in range(1, NEW_TOKENS))
    return total


Row = tuple[str, float, float, float, float | None]  # metric, work, secs ours, secs HF, FLOPs


def bench(spec: Spec, repeats: int) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        ours, hf = build(spec, Path(tmp))
    batch = train_batch(ours)
    ids, pix = prompts(ours)
    n_params = sum(p.numel() for p in ours.parameters()) / 1e6
    print(f"{spec.name}: {n_params:.1f}M params, train seq {batch['input_ids'].shape[1]} "
          f"({ours.tokens_per_image} image tokens), prompts {min(map(len, ids))}-{max(map(len, ids))} tokens")
    with torch.no_grad():
        a = ours(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
        b = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
               pixel_values=batch["pixel_values"]).logits
    real = batch["attention_mask"].bool()  # right padding: pad positions differ (position ids)
    torch.testing.assert_close(a[real], b[real], atol=1e-4, rtol=0)  # the same model on both sides
    pad, eos = ours.tokenizer.pad_token_id, hf.generation_config.eos_token_id
    ours.tokenizer = copy.deepcopy(ours.tokenizer)
    ours.tokenizer.eos_token = None  # nothing stops early: every row writes NEW_TOKENS
    steps = {"train": (trainer(ours, ours.vision_tower, batch), trainer(hf, hf.model.vision_tower, batch))}
    gens = {
        "gen b=1": (ours_gen(ours, ids[:1], pix[:1]), hf_gen(hf, ids[:1], pix[:1], pad, eos)),
        "gen b=8": (ours_gen(ours, ids, pix), hf_gen(hf, ids, pix, pad, eos)),
        "gen 8x b=1": (sequential([ours_gen(ours, ids[i:i + 1], pix[i:i + 1]) for i in range(BATCH)]),
                       sequential([hf_gen(hf, ids[i:i + 1], pix[i:i + 1], pad, eos) for i in range(BATCH)])),
    }
    t = interleaved(steps, repeats)
    ours.eval(), hf.eval()
    t.update(interleaved(gens, repeats))
    g8 = gen_flops(ours, ids)
    return [
        (f"{spec.name} train step b=8 (samples/s)", BATCH, *t["train"], train_flops(ours, batch)),
        (f"{spec.name} generate b=1 (tok/s)", NEW_TOKENS, *t["gen b=1"], gen_flops(ours, ids[:1])),
        (f"{spec.name} generate b=8 (tok/s)", BATCH * NEW_TOKENS, *t["gen b=8"], g8),
        (f"{spec.name} generate 8 x b=1 (tok/s)", BATCH * NEW_TOKENS, *t["gen 8x b=1"], g8),
        (f"{spec.name} batched 8 / sequential 8 (x)", 1.0, t["gen b=8"][0] / t["gen 8x b=1"][0],
         t["gen b=8"][1] / t["gen 8x b=1"][1], None),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,small")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    peaks = [matmul_peak()]
    rows: list[Row] = []
    for name in args.configs.split(","):
        rows += bench(SPECS[name], args.repeats)
        peaks.append(matmul_peak())
    peak = max(peaks)  # the best measure is the closest to the hardware's (the load varies)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 2048^2 matmul GFLOP/s "
          f"(best of 10, before/after each config): {', '.join(f'{p:.1f}' for p in peaks)}; peak = {peak:.1f}")
    print("\n| metric | ours | HF | ours/HF | MFU ours / HF |\n|---|---:|---:|---:|---:|")
    for metric, work, so, sh, flops in rows:
        o, h = work / so, work / sh
        mfu = "" if flops is None else f"{flops / so / 1e9 / peak:.1%} / {flops / sh / 1e9 / peak:.1%}"
        print(f"| {metric} | {o:.2f} | {h:.2f} | {o / h:.2f} | {mfu} |")


if __name__ == "__main__":
    main()
