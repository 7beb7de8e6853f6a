"""Whole-model forward: Mini-Gemini (LR CLIP + HR ConvNeXt + patch mining) vs the LR-only LLaVA
with the same LR tower, projector width and LLM, at the released sizes, random weights.

Arms (batch 1, one image, a question of 64 words):

- lr:      CLIP ViT-L/14-336 -> 576 tokens -> mlp2x_gelu -> LLM (LLaVA);
- mgm:     + ConvNeXt-L at 768 px and patch info mining; the LLM still sees 576 tokens;
- mgm-hd:  HD token extension: 2x2 crops + a global view (5 x 576 tokens), ConvNeXt-L at 1536.

Timed: the image encoding (`encode_images`: towers + connector) and the prefill (embed +
LLM forward over the whole prompt, logits of the last position only: the time to the first
token). Peak memory: the CUDA allocator's peak on a GPU; on a CPU the peak RSS above the
RSS before the call. Each arm runs in a fresh subprocess, one after another; medians of the
repeats are reported.

    python benchmarks/bench_mgm_forward.py --device cuda --llm 2b          # GPU, bf16, MGM-2B sizes
    python benchmarks/bench_mgm_forward.py --device cuda --llm 7b          # Vicuna-7B host
    .venv/bin/python benchmarks/bench_mgm_forward.py --llm 2b --llm-layers 2 --dtype fp32 --arms lr,mgm
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from minigem.config import ModelConfig
from minigem.data.records import Message
from minigem.model import VisionLanguageModel
from minigem.training.build import train_world_tokenizer

CLIP_L_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
              "num_attention_heads": 16, "image_size": 336, "patch_size": 14}
LLMS = {  # released host LLM shapes (vocab kept: the embedding and LM head are real work)
    "2b": {"arch": "gemma", "config": {"hidden_size": 2048, "intermediate_size": 16384,
                                       "num_hidden_layers": 18, "num_attention_heads": 8,
                                       "num_key_value_heads": 1, "head_dim": 256,
                                       "vocab_size": 256000}},
    "7b": {"arch": "llama", "config": {"hidden_size": 4096, "intermediate_size": 11008,
                                       "num_hidden_layers": 32, "num_attention_heads": 32,
                                       "num_key_value_heads": 32, "vocab_size": 32000}},
}
QUESTION_TOKENS = 64


def build(arm: str, llm: str, layers: int | None) -> VisionLanguageModel:
    llm_cfg = json.loads(json.dumps(LLMS[llm]))
    llm_cfg["config"].update({"max_position_embeddings": 4096, "tie_word_embeddings": False})
    if layers:
        llm_cfg["config"]["num_hidden_layers"] = layers
    cfg = {
        "vision": {"config": CLIP_L_336, "select_layer": -2, "image_aspect": "square"},
        "llm": llm_cfg, "tokenizer_train": {"vocab_size": 512},
        "template": "vicuna_v1", "system_prompt": "", "max_length": 4096,
    }
    if arm != "lr":
        hd = arm == "mgm-hd"
        cfg["vision_aux"] = {"timm_name": "convnext_large", "image_size": 1536 if hd else 768,
                             "image_grid": 2 if hd else 1, "image_global": hd}
        cfg["connector"] = {"type": "patch_mining", "projector": "mlp2x_gelu"}
    config = ModelConfig.model_validate(cfg)
    torch.manual_seed(0)
    return VisionLanguageModel.build(config, train_world_tokenizer(config)).eval()


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def worker(arm: str, a: argparse.Namespace) -> dict:
    dev, dtype = torch.device(a.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    with dev:  # initialise the random weights where they will run (7B fp32 init on a CPU is slow)
        model = build(arm, a.llm, a.llm_layers)
    model = model.to(dev, dtype)
    words = " ".join(["word"] * QUESTION_TOKENS)
    ids = model.encode_prompt([Message("user", f"<image>\n{words}")], 1)
    x = torch.tensor([ids], device=dev)
    gen = torch.Generator().manual_seed(1)
    views = model.processor.views_per_image
    side = model.vision_tower.image_size
    pix = torch.randn(views, 3, side, side, generator=gen).to(dev, dtype)
    aux = None
    if model.vision_tower_aux is not None:
        hr = model.processor.hr_size
        aux = torch.randn(1, 3, hr, hr, generator=gen).to(dev, dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def encode() -> None:
        model.encode_images(pix, aux)

    def prefill() -> None:
        emb = model.embed(x, pix, aux)
        out = model.language_model(inputs_embeds=emb, logits_to_keep=1)
        assert out.logits.shape[1] == 1

    res = {"arm": arm, "seq": x.shape[1], "visual_tokens": model.tokens_per_image,
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    with torch.inference_mode():
        for name, fn in (("encode", encode), ("prefill", prefill)):
            fn()  # warm-up (cuDNN / oneDNN kernel choice)
            times = []
            for _ in range(a.repeats):
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - t0)
            res[f"{name}_ms"] = 1000 * statistics.median(times)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            prefill()
            torch.cuda.synchronize()
            res["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            Path("/proc/self/clear_refs").write_text("5")
            base = _rss_kb("VmRSS")
            prefill()
            res["peak_mib"] = (_rss_kb("VmHWM") - base) / 1024
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                    help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--llm", choices=sorted(LLMS), default="2b")
    ap.add_argument("--llm-layers", type=int, default=None, help="truncate the LLM (CPU runs)")
    ap.add_argument("--arms", default="lr,mgm,mgm-hd")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.dtype = a.dtype or ("bf16" if a.device == "cuda" else "fp32")
    if a.worker:
        print(json.dumps(worker(a.worker, a)))
        return
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, {a.dtype}, LLM {a.llm}"
          f"{f' truncated to {a.llm_layers} layers' if a.llm_layers else ''}, repeats {a.repeats}")
    rows = []
    for arm in a.arms.split(","):
        cmd = [sys.executable, __file__, "--worker", arm, "--device", a.device, "--dtype", a.dtype,
               "--llm", a.llm, "--repeats", str(a.repeats)]
        cmd += ["--llm-layers", str(a.llm_layers)] if a.llm_layers else []
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{arm} failed:\n{out.stderr}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = next((r for r in rows if r["arm"] == "lr"), rows[0])
    print("| arm | params M | visual tokens | prompt | encode ms | prefill ms | vs lr | peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['params_m']:.0f} | {r['visual_tokens']} | {r['seq']} "
              f"| {r['encode_ms']:.1f} | {r['prefill_ms']:.1f} "
              f"| {r['prefill_ms'] / base['prefill_ms']:.2f}x | {r['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
