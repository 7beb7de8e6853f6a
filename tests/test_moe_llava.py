"""MoE-LLaVA: importing released checkpoints, the MoE-Tuning recipes, routing inspection.

The import tests write tiny checkpoints in the release's exact layout (config fields, DeepSpeed
expert/gate names, projector and tower prefixes, Qwen v1 fused attention) from random HF host
models, convert them through the CLI, and compare logits with an independent computation: the
HF host model whose MoE FFNs are replaced by a hand-written per-token top-2 mixture over the
release's tensors, fed with embeddings spliced by hand from HF CLIP + the projector.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_model, tiny_model_dict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedTokenizerFast,
)

from minigem.checkpoints.native import load_model, save_model
from minigem.cli import main
from minigem.config import ModelConfig, load_recipe
from minigem.data.records import Message
from minigem.data.synth import world_texts

E, LAYERS, MOE_LAYERS = 4, 3, [0, 2]
EOS = "<|endoftext|>"
HOST = {  # release config fields (as MoE-LLaVA writes them) and the HF config of the same model
    "stablelm": (
        {"intermediate_size": 64, "hidden_size": 32, "num_hidden_layers": LAYERS, "num_attention_heads": 2,
         "num_key_value_heads": 2, "hidden_act": "silu", "rope_pct": 0.25, "rope_theta": 10000,
         "max_position_embeddings": 256, "norm_eps": 1e-5, "use_qkv_bias": True,
         "tie_word_embeddings": False},
        {"model_type": "stablelm", "intermediate_size": 64, "hidden_size": 32, "num_hidden_layers": LAYERS,
         "num_attention_heads": 2, "num_key_value_heads": 2, "partial_rotary_factor": 0.25,
         "max_position_embeddings": 256, "layer_norm_eps": 1e-5, "use_qkv_bias": True,
         "tie_word_embeddings": False},
    ),
    "phi": (
        {"intermediate_size": 64, "hidden_size": 32, "num_hidden_layers": LAYERS, "num_attention_heads": 2,
         "hidden_act": "gelu_new", "partial_rotary_factor": 0.5, "rope_theta": 10000.0, "rope_scaling": None,
         "max_position_embeddings": 256, "layer_norm_eps": 1e-5, "qk_layernorm": False,
         "resid_pdrop": 0.0, "embd_pdrop": 0.0, "tie_word_embeddings": False},
        {"model_type": "phi", "intermediate_size": 64, "hidden_size": 32, "num_hidden_layers": LAYERS,
         "num_attention_heads": 2, "partial_rotary_factor": 0.5, "max_position_embeddings": 256,
         "tie_word_embeddings": False},
    ),
    "qwen": (  # Qwen v1: intermediate_size counts w1 + w2
        {"intermediate_size": 128, "hidden_size": 32, "num_hidden_layers": LAYERS, "num_attention_heads": 2,
         "kv_channels": 16, "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000, "rotary_pct": 1.0,
         "seq_length": 256, "max_position_embeddings": 256, "no_bias": True, "use_dynamic_ntk": True,
         "use_logn_attn": True, "tie_word_embeddings": False},
        {"model_type": "qwen2", "intermediate_size": 64, "hidden_size": 32, "num_hidden_layers": LAYERS,
         "num_attention_heads": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
         "max_position_embeddings": 256, "tie_word_embeddings": False},
    ),
}
QWEN_V1 = {"gate_proj": "w2", "up_proj": "w1", "down_proj": "c_proj"}


# ----------------------------------------------------------------------------- release writer


@pytest.fixture(scope="module")
def release_tokenizer(tmp_path_factory) -> Path:
    """A tiny BPE tokenizer like the hosts': eos <|endoftext|>, no <image> token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(world_texts(), trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)
    path = tmp_path_factory.mktemp("release-tokenizer")
    fast.save_pretrained(path)
    return path


def _v1_name(key: str) -> str:
    """An HF Qwen2 weight name -> the Qwen v1 name the release uses."""
    key = key.replace("model.embed_tokens.", "transformer.wte.").replace("model.norm.", "transformer.ln_f.")
    key = key.replace("model.layers.", "transformer.h.").replace(".input_layernorm.", ".ln_1.")
    key = key.replace(".post_attention_layernorm.", ".ln_2.").replace(".self_attn.o_proj.", ".attn.c_proj.")
    for new, old in QWEN_V1.items():
        key = key.replace(f".{new}.", f".{old}.")
    return key


def write_release(root: Path, host: str, tokenizer_dir: Path, *, vocab_pad: int, tower: str,
                  naming: str, fmt: str, residual: bool = False, seed: int = 0) -> dict:
    """A tiny MoE-LLaVA checkpoint directory; returns what the reference computation needs."""
    torch.manual_seed(seed)
    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    release_fields, hf_fields = HOST[host]
    vocab = len(tok) + vocab_pad
    lm = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(vocab_size=vocab, **hf_fields), dtype=torch.float32)
    for p in lm.parameters():  # larger weights than HF's init: routing and logits vary
        nn.init.normal_(p, std=0.2)
    vcfg = ({"hidden_size": 64, "intermediate_size": 64, "num_attention_heads": 1} if tower == "inferred"
            else {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2})
    clip = CLIPVisionModel(CLIPVisionConfig(num_hidden_layers=2, image_size=16, patch_size=8, **vcfg)).eval()
    proj = nn.Sequential(nn.Linear(clip.config.hidden_size, 32), nn.GELU(), nn.Linear(32, 32))
    moe = {}  # layer -> (router weight [E, H], [expert modules], residual (mlp, coefficient) | None)
    for i in MOE_LAYERS:
        experts = [copy.deepcopy(lm.model.layers[i].mlp) for _ in range(E)]
        for ex in experts:
            for p in ex.parameters():
                nn.init.normal_(p, std=0.2)
        res = (copy.deepcopy(lm.model.layers[i].mlp), nn.Linear(32, 2)) if residual else None
        moe[i] = (torch.randn(E, 32), experts, res)

    sd = {k: v for k, v in lm.state_dict().items()
          if not any(k.startswith(f"model.layers.{i}.mlp.") for i in MOE_LAYERS)}
    for i, (wg, experts, res) in moe.items():
        sd[f"model.layers.{i}.mlp.deepspeed_moe.gate.wg.weight"] = wg
        for j, ex in enumerate(experts):
            for n, t in ex.state_dict().items():
                sd[f"model.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{j}.{n}"] = t
        if res is not None:
            sd.update({f"model.layers.{i}.mlp.mlp.{n}": t for n, t in res[0].state_dict().items()})
            sd.update({f"model.layers.{i}.mlp.coefficient.{n}": t for n, t in res[1].state_dict().items()})
    if host == "qwen":  # fuse q/k/v into c_attn, rename everything to Qwen v1
        for i in range(LAYERS):
            for part in ("weight", "bias"):
                qkv = [sd.pop(f"model.layers.{i}.self_attn.{n}_proj.{part}") for n in "qkv"]
                sd[f"model.layers.{i}.attn.c_attn.{part}"] = torch.cat(qkv)
        sd = {_v1_name(k): v for k, v in sd.items()}
    base = "transformer" if host == "qwen" else "model"
    llava = naming == "llava"
    for n, t in proj.state_dict().items():
        sd[f"{base}.mm_projector.{'' if llava else 'image_spatial_proj.'}{n}"] = t
    tower_dir = root.parent / f"{root.name}-clip"
    clip.save_pretrained(tower_dir)
    if tower != "separate":
        inner = "vision_tower.vision_tower" if llava else "image_tower.image_tower"
        sd.update({f"{base}.{inner}.vision_model.{n}": t for n, t in clip.state_dict().items()})

    root.mkdir(parents=True)
    sd = {k: v.contiguous() for k, v in sd.items()}
    if fmt == "shards":
        keys = sorted(sd)
        halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, ks in halves.items():
            save_file({k: sd[k] for k in ks}, str(root / name), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: n for n, ks in halves.items() for k in ks}}
        (root / "model.safetensors.index.json").write_text(json.dumps(index))
    elif fmt == "bin":
        torch.save(sd, root / "pytorch_model.bin")
    else:
        save_file(sd, str(root / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(root)

    tower_name = str(tower_dir) if tower == "inside" else "openai/clip-vit-large-patch14-336"
    config = {
        **release_fields, "vocab_size": vocab, "model_type": f"moe_llava_{host}",
        "architectures": [f"EvalMoELLaVA{host.capitalize()}ForCausalLM"],
        "mm_hidden_size": clip.config.hidden_size, "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "tokenizer_model_max_length": 256, "tokenizer_padding_side": "right",
        ("mm_vision_tower" if llava else "mm_image_tower"): tower_name,
        ("mm_projector_type" if llava else "image_projector_type"): "mlp2x_gelu",
        "moe": {"moe_enable": True, "moe_mode": "sparse", "moe_layers_idx": MOE_LAYERS, "ep_size": 1,
                "num_experts": [E] * len(MOE_LAYERS), "top_k_experts": 2, "capacity_factor": 1.5,
                "eval_capacity_factor": 2.0, "min_capacity": 0, "use_residual": residual,
                "router_aux_loss_coef": 0.01, "train_modules": []},
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))
    return {"lm": lm.eval(), "clip": clip, "proj": proj, "moe": moe, "tower_dir": tower_dir}


class ReferenceMoE(nn.Module):
    """Per-token top-2 of softmax(x @ wg^T), gates renormalised, [+ residual mix]."""

    def __init__(self, wg: torch.Tensor, experts: list[nn.Module], res) -> None:
        super().__init__()
        self.wg, self.experts, self.res = wg, experts, res
        self.picks: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = torch.zeros_like(flat)
        for t in range(flat.shape[0]):
            probs = torch.softmax(flat[t].float() @ self.wg.float().T, dim=-1)
            a, b = torch.argsort(probs, descending=True)[:2].tolist()
            self.picks.append((a, b))
            ga, gb = probs[a] / (probs[a] + probs[b]), probs[b] / (probs[a] + probs[b])
            y = ga * self.experts[a](flat[t:t + 1])[0] + gb * self.experts[b](flat[t:t + 1])[0]
            if self.res is not None:
                c = torch.softmax(self.res[1](flat[t]), dim=-1)
                y = y * c[0] + self.res[0](flat[t:t + 1])[0] * c[1]
            out[t] = y
        return out.reshape(x.shape)


@torch.no_grad()
def reference_logits(ref: dict, input_ids: torch.Tensor, image_id: int, pixels: torch.Tensor):
    feats = ref["clip"](pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # [1, N, C]
    w = ref["proj"]
    visual = F.linear(F.gelu(F.linear(feats, w[0].weight, w[0].bias)), w[2].weight, w[2].bias)
    lm = copy.deepcopy(ref["lm"])
    mods = {}
    for i, (wg, experts, res) in ref["moe"].items():
        lm.model.layers[i].mlp = mods[i] = ReferenceMoE(wg, experts, res)
    mask = input_ids == image_id
    embeds = lm.get_input_embeddings()(input_ids.masked_fill(mask, 0))
    embeds[mask] = visual.reshape(-1, visual.shape[-1])
    return lm(inputs_embeds=embeds).logits, mods


# ----------------------------------------------------------------------------- import


@pytest.fixture(scope="module")
def stablelm_release(tmp_path_factory, release_tokenizer) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("stablelm") / "MoE-LLaVA-StableLM-tiny"
    ref = write_release(root, "stablelm", release_tokenizer, vocab_pad=8, tower="inside",
                        naming="release", fmt="shards")
    return root, ref


CASES = {  # host -> (vocab padding, tower source, naming, weight format, use_residual)
    "phi": (0, "separate", "llava", "bin", True),
    "qwen": (5, "inferred", "release", "single", False),
}


def _convert(src: Path, dst: Path, *extra: str) -> int:
    return main(["convert", "--from", "moe-llava", str(src), str(dst), *extra])


@pytest.mark.parametrize("host", ["stablelm", *CASES])
def test_import_matches_reference(host, stablelm_release, release_tokenizer, tmp_path, capsys):
    if host == "stablelm":
        src, ref = stablelm_release
        extra: list[str] = []
    else:
        pad, tower, naming, fmt, residual = CASES[host]
        src = tmp_path / f"MoE-LLaVA-{host}-tiny"
        ref = write_release(src, host, release_tokenizer, vocab_pad=pad, tower=tower, naming=naming,
                            fmt=fmt, residual=residual, seed=1)
        extra = ["--vision-tower", str(ref["tower_dir"])] if tower == "separate" else []
    assert _convert(src, tmp_path / "out", *extra) == 0, capsys.readouterr().err
    model = load_model(tmp_path / "out")
    moe = model.config.moe
    assert (moe.num_experts, moe.top_k, moe.layers, moe.capacity_factor, moe.eval_capacity_factor) == (
        E, 2, MOE_LAYERS, 1.5, 2.0)
    assert moe.shared_expert == (host == "phi")

    from PIL import Image

    image = Image.new("RGB", (24, 16), (200, 30, 60))
    ids = model.encode_prompt([Message("user", "<image>\nwhat colour is the circle?")], 1)
    assert model.tokenizer.eos_token == EOS
    text = model.template.render_text([Message("user", "hi")], add_generation_prompt=True,
                                      tokenizer=model.tokenizer)
    assert text.endswith(" USER: hi ASSISTANT:")
    pixels = model.processor([image])["pixel_values"]
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        ours = model(input_ids, pixel_values=pixels).logits
    want, mods = reference_logits(ref, input_ids, model.image_token_id, pixels)
    vocab = want.shape[-1]
    assert ours.shape[-1] == vocab + (1 if host == "phi" else 0)  # phi: <image> grew the vocab
    torch.testing.assert_close(ours[..., :vocab], want, atol=1e-5, rtol=0)
    for m in mods.values():  # the comparison exercised real routing: several expert pairs
        assert len({tuple(sorted(p)) for p in m.picks}) > 1


def test_import_named_template(stablelm_release, tmp_path, capsys):
    src, ref = stablelm_release
    assert _convert(src, tmp_path / "bad", "--template", "nope") == 2
    assert "nope" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert _convert(src, tmp_path / "out", "--template", "vicuna_v1") == 0
    model = load_model(tmp_path / "out")
    assert model.config.template == "vicuna_v1"
    assert {"<s>", "</s>", "<image>"} <= set(model.tokenizer.all_special_tokens)
    # the three new tokens fit in the release's padded vocabulary: no rows were added
    rows = model.language_model.get_input_embeddings().num_embeddings
    assert rows == ref["lm"].config.vocab_size >= len(model.tokenizer)


def _rewrite_weights(src: Path, dst: Path, edit) -> None:
    """Copy a sharded release to `dst` with its weights edited (written as one safetensors file)."""
    shutil.copytree(src, dst)
    index = dst / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    sd = {}
    for s in shards:
        sd.update(load_file(str(dst / s)))
        (dst / s).unlink()
    index.unlink()
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"))


def test_import_weight_errors(stablelm_release, tmp_path, capsys):
    src, _ = stablelm_release
    prefix = "model.layers.2.mlp.deepspeed_moe.experts.deepspeed_experts."

    def drop_expert(sd):
        for k in [k for k in sd if k.startswith(prefix + "3.")]:
            del sd[k]

    _rewrite_weights(src, tmp_path / "a", drop_expert)
    assert _convert(tmp_path / "a", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "decoder layer 2 holds experts [0, 1, 2]" in err and "missing [3]" in err

    def drop_one_add_stray(sd):
        del sd[prefix + "1.up_proj.weight"]
        sd["model.extra_head.weight"] = torch.zeros(2)

    _rewrite_weights(src, tmp_path / "b", drop_one_add_stray)
    assert _convert(tmp_path / "b", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "missing (1): language_model.model.layers.2.mlp.experts.1.up_proj.weight" in err
    assert "unexpected (1): language_model.model.extra_head.weight" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit, message", [
    ({"moe": {"num_experts": [4, 8]}}, "moe.num_experts=[4, 8]: minigem uses one expert count"),
    ({"moe": {"top_k_experts": 1}}, "moe.top_k_experts=1: only top-2 converts exactly"),
    ({"moe": {"moe_layers_idx": [0, 7]}}, "layer index 7 is out of range"),
    ({"model_type": "moe_llava_mpt"}, "model_type 'moe_llava_mpt' is not a MoE-LLaVA model"),
    ({"mm_image_tower": "openai/clip-vit-large-patch14-336", "drop_tower": True},
     "holds no vision tower weights and mm_image_tower 'openai/clip-vit-large-patch14-336' is not a local"),
])
def test_import_config_errors(edit, message, stablelm_release, tmp_path, capsys):
    src, _ = stablelm_release
    bad = tmp_path / "bad"
    if edit.pop("drop_tower", False):
        _rewrite_weights(src, bad, lambda sd: [sd.pop(k) for k in list(sd) if ".image_tower." in k])
    else:
        shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    for key, val in edit.items():
        cfg[key] = {**cfg[key], **val} if isinstance(val, dict) else val
    (bad / "config.json").write_text(json.dumps(cfg))
    assert _convert(bad, tmp_path / "out") == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- recipes

RECIPES = {  # recipe -> tiny host LM built from config
    "moe-llava-stablelm-1.6b": ("stablelm", {"use_qkv_bias": True}),
    "moe-llava-qwen-1.8b": ("qwen2", {}),
    "moe-llava-phi2-2.7b": ("phi", {}),
}
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from minigem.chat import train_tokenizer

    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(world_texts(), vocab_size=300).save_pretrained(path)
    return path


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_runs_every_stage(name, tokenizer_dir, tmp_path, monkeypatch):
    path = REPO / "recipes" / f"{name}.yaml"
    recipe = load_recipe(path)  # as shipped
    assert [s.train for s in recipe.training.stages] == [["projector"], ["projector", "llm"], ["moe"]]
    assert [s.upcycle for s in recipe.training.stages] == [False, False, True]
    assert [(s.lr, s.batch_size * s.grad_accum, s.epochs) for s in recipe.training.stages] == [
        (1e-3, 256, 1), (2e-5, 128, 1), (2e-5, 128, 1)]
    m = recipe.model.moe
    assert (m.num_experts, m.top_k, m.layers, m.aux_loss_coef, m.capacity_factor, m.eval_capacity_factor) == (
        4, 2, "sparse", 0.01, 1.5, 2.0)

    arch, extra = RECIPES[name]
    llm = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 2, "max_position_embeddings": 256, **extra}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 16, "patch_size": 8}
    overrides = ["model.llm.path=null", f"model.llm.arch={arch}", f"model.llm.config={json.dumps(llm)}",
                 "model.vision.path=null", f"model.vision.config={json.dumps(vision)}",
                 f"model.tokenizer={tokenizer_dir}", "model.max_length=96", "model.system_prompt=''",
                 f"training.output_dir={tmp_path / 'run'}", "training.bf16='off'",
                 "training.gradient_checkpointing=false"]
    for stage in recipe.training.stages:
        data = {"synth": {"n": 4, "seed": 1, "image_size": 96}, "template": stage.data.template}
        overrides += [f"training.stages.{stage.name}.{k}" for k in (
            f"data={json.dumps(data)}", "steps=1", "epochs=null", "batch_size=2", "grad_accum=1")]

    import minigem.llm.moe as moe_mod
    import minigem.training.loop as loop

    trainable: list[set[str]] = []
    names: list[set[str]] = []
    upcycled: list[bool] = []

    def spy_stage(model, stage):
        n = real_stage(model, stage)
        trainable.append({k for k, p in model.named_parameters() if p.requires_grad})
        names.append({k for k, _ in model.named_parameters()})
        return n

    def spy_moe(lm, cfg):
        dense = {i: copy.deepcopy(layer.mlp.state_dict()) for i, layer in enumerate(lm.model.layers)}
        indices = real_moe(lm, cfg)
        for i in indices:
            for ex in lm.model.layers[i].mlp.experts:
                got = ex.state_dict()
                upcycled.append(all(torch.equal(got[k], dense[i][k]) for k in dense[i]))
        spy_moe.dense = dense
        return indices

    real_stage, real_moe = loop.apply_stage, moe_mod.apply_moe
    monkeypatch.setattr(loop, "apply_stage", spy_stage)
    monkeypatch.setattr(moe_mod, "apply_moe", spy_moe)
    assert main(["train", str(path), *overrides]) == 0

    assert len(trainable) == 3 and upcycled and all(upcycled)
    assert trainable[0] == {"connector.projector.0.weight", "connector.projector.0.bias",
                            "connector.projector.2.weight", "connector.projector.2.bias"}
    assert trainable[1] == {k for k in names[1] if k.startswith(("language_model.", "connector.projector."))}
    assert not any(".mlp.experts." in k for k in names[1])  # stage II is dense
    assert trainable[2] == {k for k in names[2] if ".mlp.router." in k or ".mlp.experts." in k}
    assert any(".mlp.router." in k for k in trainable[2])
    # the experts started as the stage-II FFN: the checkpoint written at the stage II/III boundary
    (boundary,) = (tmp_path / "run" / "checkpoints").glob("stage2-step*")
    sd = load_file(str(boundary / "model.safetensors"))
    for k, v in spy_moe.dense[0].items():
        assert torch.equal(sd[f"language_model.model.layers.0.mlp.{k}"], v)
    final = load_model(tmp_path / "run" / "final")
    routers = [k for k, _ in final.language_model.named_parameters() if k.endswith(".mlp.router.weight")]
    assert final.config.moe is not None and sorted(int(k.split(".")[2]) for k in routers) == [0]


# ----------------------------------------------------------------------------- routing


@pytest.fixture
def tiny_moe_dir(tiny_tokenizer, tmp_path) -> Path:
    cfg = ModelConfig.model_validate({**tiny_model_dict(init_std=0.5), "moe": {"num_experts": 4, "top_k": 2,
                                                                                "layers": "all"}})
    return save_model(build_tiny_model(cfg, tiny_tokenizer), tmp_path / "moe-model")


def test_inspect_routing(tiny_moe_dir, tiny_data, tmp_path, capsys):
    png = tmp_path / "plots" / "routing.png"
    assert main(["inspect-routing", "--model", str(tiny_moe_dir), "--data", str(tiny_data),
                 "--limit", "5", "--out", str(png), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["records"] == 5 and report["top_k"] == 2 and report["num_experts"] == 4
    assert report["tokens"]["image"] == 5 * 4 and report["tokens"]["text"] > 0
    assert sorted(report["layers"]) == ["0", "1"]
    for kinds in report["layers"].values():
        for kind in ("image", "text"):
            assert len(kinds[kind]) == 4 and abs(sum(kinds[kind]) - 1) < 1e-9
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_routing_needs_moe(tiny_saved_model, tiny_data, tmp_path, capsys):
    assert main(["inspect-routing", "--model", str(tiny_saved_model), "--data", str(tiny_data),
                 "--out", str(tmp_path / "r.png")]) == 2
    assert "the model has no MoE layers" in capsys.readouterr().err
    assert not (tmp_path / "r.png").exists()
