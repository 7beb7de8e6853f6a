"""Padding-free training (minigem.llm.padfree): the packed forward gives the padded batch's loss
and gradients for every LLM family, with GQA and gradient checkpointing; unpacked calls (chat,
eval) are unchanged while it is switched on; bad batches and LLMs that bypass the attention
interface get clear errors; a recipe stage with `padding_free: true` trains like the padded one."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model, tiny_model_dict, tiny_recipe
from PIL import Image
from safetensors.torch import load_file

from minigem.cli import main
from minigem.config import ModelConfig, StageConfig
from minigem.data.collate import SampleEncoder, collate
from minigem.data.records import Message, Sample
from minigem.errors import ConfigError, DataError
from minigem.llm import padfree
from minigem.llm.backbone import enable_checkpointing
from minigem.training.stages import apply_stage

FAMILIES = {
    "llama-gqa": ("llama", {"num_key_value_heads": 1}),
    "qwen2": ("qwen2", {}),
    "mistral": ("mistral", {"sliding_window": 4096}),  # longer than any row: no effect
    "phi": ("phi", {}),
}


def _model(tokenizer, arch: str = "llama", **cfg):
    d = tiny_model_dict(init_std=0.1)
    d["llm"]["arch"] = arch
    d["llm"]["config"].update(cfg)
    m = build_tiny_model(ModelConfig.model_validate(d), tokenizer)
    apply_stage(m, StageConfig(name="s", train=["connector", "llm"], data={"synth": {"n": 1}}, steps=1))
    return m


def _batch(model, left: bool = False) -> dict:
    """Rows of very different lengths (one text-only, one with two images, multi-turn)."""
    img = [Image.new("RGB", (16 + 4 * k, 16), c) for k, c in enumerate([(255, 0, 0), (0, 0, 255)])]
    samples = [
        Sample("a", [Message("user", "<image>\nWhat color is the circle?"), Message("assistant", "red"),
                     Message("user", "Where is it?"), Message("assistant", "top left")], img[:1]),
        Sample("b", [Message("user", "How many?"), Message("assistant", "3")]),
        Sample("c", [Message("user", "<image> <image>\nIs there a blue diamond?"),
                     Message("assistant", "There are 2 objects: a large blue diamond at the center.")],
               img),
    ]
    enc = SampleEncoder.for_model(model)
    return collate([enc(s) for s in samples], pad_id=model.tokenizer.pad_token_id, left=left)


def _loss_and_grads(m, batch, padding_free: bool):
    out = m(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
            labels=batch["labels"], padding_free=padding_free)
    params = [p for p in m.parameters() if p.requires_grad]
    return out.loss.detach(), torch.autograd.grad(out.loss, params)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_loss_and_gradients_match_the_padded_batch(tiny_tokenizer, family):
    arch, cfg = FAMILIES[family]
    m = _model(tiny_tokenizer, arch, **cfg)
    batch = _batch(m)
    assert batch["attention_mask"].float().mean() < 0.8  # there is padding to skip
    loss, grads = _loss_and_grads(m, batch, False)
    loss_pf, grads_pf = _loss_and_grads(m, batch, True)
    assert m.language_model.config._attn_implementation == padfree.NAME
    torch.testing.assert_close(loss_pf, loss, rtol=1e-5, atol=1e-6)
    for g, g_pf in zip(grads, grads_pf, strict=True):
        torch.testing.assert_close(g_pf, g, rtol=1e-4, atol=1e-6)


def test_moe_llm_packs_too(tiny_tokenizer):
    """Routing is per token, so the LM loss matches; the balancing loss now skips the pads."""
    d = tiny_model_dict(init_std=0.1)
    d["moe"] = {"num_experts": 4, "top_k": 2, "layers": "all"}
    m = build_tiny_model(ModelConfig.model_validate(d), tiny_tokenizer).train()
    batch = _batch(m)
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    padded = m(*args, labels=batch["labels"])
    packed = m(*args, labels=batch["labels"], padding_free=True)
    torch.testing.assert_close(packed.lm_loss, padded.lm_loss, rtol=1e-5, atol=1e-6)
    assert packed.aux_loss is not None and torch.isfinite(packed.aux_loss)
    assert packed.loss == packed.lm_loss + packed.aux_loss


def test_packing_survives_gradient_checkpointing(tiny_tokenizer):
    m = _model(tiny_tokenizer)
    batch = _batch(m)
    _, grads = _loss_and_grads(m, batch, False)
    enable_checkpointing(m.language_model)
    _, grads_pf = _loss_and_grads(m, batch, True)  # the recomputation must see the packing
    for g, g_pf in zip(grads, grads_pf, strict=True):
        torch.testing.assert_close(g_pf, g, rtol=1e-4, atol=1e-6)


def test_unpacked_calls_are_unchanged_while_switched_on(tiny_tokenizer):
    m = _model(tiny_tokenizer).eval()
    left = _batch(m, left=True)  # generation's left padding: the mask must still apply
    with torch.no_grad():
        before = m(left["input_ids"], left["attention_mask"], left["pixel_values"]).logits
        answer = m.chat(Image.new("RGB", (16, 16), "red"), "What color is it?", max_new_tokens=4)
        prev = padfree.enable(m.language_model)
        after = m(left["input_ids"], left["attention_mask"], left["pixel_values"]).logits
        assert m.chat(Image.new("RGB", (16, 16), "red"), "What color is it?", max_new_tokens=4) == answer
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    padfree.disable(m.language_model, prev)
    assert m.language_model.config._attn_implementation == prev == "sdpa"


def test_bad_batches_and_llms_that_bypass_the_interface(tiny_tokenizer, monkeypatch):
    m = _model(tiny_tokenizer)
    left = _batch(m, left=True)
    with pytest.raises(DataError, match="row 1 of the batch is not right-padded"):
        m(left["input_ids"], left["attention_mask"], left["pixel_values"], labels=left["labels"],
          padding_free=True)
    batch = _batch(m)
    with pytest.raises(ValueError, match="needs labels"):
        m(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], padding_free=True)
    # an LLM whose attention does not go through HF's interface would mix the packed sequences
    b = _model(tiny_tokenizer)  # not switched yet (m was, by the calls above)
    monkeypatch.setattr(b.language_model, "set_attn_implementation", lambda name: None)
    with pytest.raises(ConfigError, match="do not call HF's attention interface"):
        b(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], labels=batch["labels"],
          padding_free=True)
    short = _model(tiny_tokenizer, "mistral", sliding_window=8)  # a window that would apply
    with pytest.raises(ConfigError, match="sliding window of 8 tokens, shorter than the batch's"):
        short(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], labels=batch["labels"],
              padding_free=True)
    # StableLM's decoder layers (transformers 5.x) do not pass forward keywords on to attention
    s = _model(tiny_tokenizer, "stablelm")
    with pytest.raises(ConfigError, match="StableLmForCausalLM's attention layers"):
        s(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], labels=batch["labels"],
          padding_free=True)


def test_padding_free_is_for_lm_stages():
    with pytest.raises(ValueError, match="padding_free is for `lm` stages"):
        StageConfig(name="c", kind="contrastive", train=["vision"], data={"synth": {"n": 1}}, steps=1,
                    padding_free=True)


def test_a_padding_free_stage_trains_like_the_padded_one(tmp_path, monkeypatch):
    from minigem.model import VisionLanguageModel

    seen: list[bool] = []  # the padding_free flag of every training forward
    forward = VisionLanguageModel.forward

    def spy(self, *args, padding_free: bool = False, **kw):
        seen.append(padding_free)
        return forward(self, *args, padding_free=padding_free, **kw)

    monkeypatch.setattr(VisionLanguageModel, "forward", spy)
    stage = {"name": "instruct", "train": ["connector", "llm"], "lr": 1e-3, "batch_size": 4, "steps": 3,
             "data": {"synth": {"n": 32, "seed": 3, "image_size": 96,
                                "mix": {"color": 1, "conversation": 1}}}}
    runs = {}
    for pf in (False, True):
        d = tmp_path / str(pf)
        d.mkdir()
        seen.clear()
        assert main(["train", str(tiny_recipe(d, [{**stage, "padding_free": pf}]))]) == 0
        assert seen == [pf] * 3  # the option reached the model on every step
        runs[pf] = load_file(str(d / "run" / "final" / "model.safetensors"))
    start = tmp_path / "start"  # how far 3 steps move the weights, to size the tolerance
    start.mkdir()
    assert main(["train", str(tiny_recipe(start, [{**stage, "steps": 1, "lr": 1e-9}]))]) == 0
    init = load_file(str(start / "run" / "final" / "model.safetensors"))
    moved = max((runs[False][k] - init[k]).abs().max().item() for k in init)
    diff = max((runs[True][k] - runs[False][k]).abs().max().item() for k in init)
    assert moved > 1e-3
    # same training up to rounding (on this CPU packed GEMMs round differently from padded ones;
    # on an H100 the two runs came out bit-identical)
    assert diff < 0.01 * moved, (diff, moved)
