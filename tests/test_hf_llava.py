"""HF LLaVA import/export: parity with transformers' LlavaForConditionalGeneration.

Tiny random models (CLIP 2x32 on 16 px, patch 8; Llama 2x48) with identical weights on both
sides: logits agree to 1e-5 in fp32 and greedy decoding gives the same tokens, for HF
directories in every key layout, and for native models exported back to HF.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from minigem.chat import get_template, train_tokenizer
from minigem.checkpoints.native import load_model, save_model
from minigem.cli import main
from minigem.config import ModelConfig
from minigem.data.records import Message
from minigem.generation.decode import GenerationConfig, generate
from minigem.model import VisionLanguageModel

TEXTS = [f"There is a {c} {s} at the {p}." for c in ("red", "green", "blue") for s in ("circle", "square")
         for p in ("top", "bottom", "left", "right")] + ["USER: ASSISTANT: What colour is it?"] * 3
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "image_size": 16, "patch_size": 8}
TEXT = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 128, "initializer_range": 0.2}
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=160)


def make_hf(tok, vocab: int | None = None, strategy: str = "default", layer: int = -2,
            seed: int = 0, bias: bool = True) -> LlavaForConditionalGeneration:
    text = LlamaConfig(**TEXT, vocab_size=vocab or len(tok), bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=text,
                      image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=4,
                      vision_feature_layer=layer, vision_feature_select_strategy=strategy,
                      multimodal_projector_bias=bias)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # CLIP's default init is tiny; make the tower matter
        for p in model.model.vision_tower.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def write_hf_dir(model, tok, path: Path, template: str | None = "vicuna_v1") -> Path:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    if template is not None:
        (path / "chat_template.json").write_text(json.dumps({"chat_template": get_template(template).to_jinja()}))
    side = VISION["image_size"]
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "LlavaImageProcessor", "do_pad": True, "do_resize": True,
        "size": {"shortest_edge": side}, "do_center_crop": True, "crop_size": {"height": side, "width": side},
        "image_mean": list(MEAN), "image_std": list(STD)}))
    return path


def prompt_ids(tok, n_image_tokens: int, text: str) -> list[int]:
    img = tok.convert_tokens_to_ids("<image>")
    return [tok.bos_token_id] + tok.encode("USER: ", add_special_tokens=False) + [img] * n_image_tokens \
        + tok.encode(f"\n{text} ASSISTANT:", add_special_tokens=False)


def batch(tok, n_image_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [prompt_ids(tok, n_image_tokens, "What colour is the circle?"),
            prompt_ids(tok, n_image_tokens, "Where is the red square now?")]
    width = min(len(r) for r in rows)
    ids = torch.tensor([r[:width] for r in rows])  # [2, S]
    torch.manual_seed(1)
    return ids, torch.randn(2, 3, VISION["image_size"], VISION["image_size"])


def assert_same_logits(hf, ours, tok) -> None:
    ids, pix = batch(tok, ours.tokens_per_image)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pix, attention_mask=torch.ones_like(ids)).logits
        got = ours(ids, attention_mask=torch.ones_like(ids), pixel_values=pix).logits
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def assert_same_greedy(hf, ours, tok, n: int = 10) -> None:
    """HF generate vs our decode loop on the same prompt ids: one by one and left-padded."""
    n_img = ours.tokens_per_image
    rows = [prompt_ids(tok, n_img, "What colour is the circle?"), prompt_ids(tok, n_img, "Where?")]
    _, pix = batch(tok, n_img)
    width = max(len(r) for r in rows)
    ids = torch.full((2, width), tok.pad_token_id)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
    ref = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=n,
                      do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    ref = [r[:r.index(tok.eos_token_id)] if tok.eos_token_id in r else r for r in ref[:, width:].tolist()]
    assert max(len(r) for r in ref) >= 3  # a real comparison, not two empty answers
    batched = generate(ours, rows, pix, None, GenerationConfig(max_new_tokens=n))
    assert [g.token_ids for g in batched] == ref
    for i, r in enumerate(rows):
        one = generate(ours, [r], pix[i:i + 1], None, GenerationConfig(max_new_tokens=n))
        assert one[0].token_ids == ref[i]


def convert(src: Path, dst: Path) -> VisionLanguageModel:
    assert main(["convert", "--from", "hf-llava", str(src), str(dst)]) == 0
    return load_model(dst)


# ----------------------------------------------------------------------------- import


def test_import_parity_logits_and_greedy(tok, tmp_path):
    hf = make_hf(tok, vocab=len(tok) + 16)  # padded vocabulary (as llava-1.5-hf: 32064 rows)
    ours = convert(write_hf_dir(hf, tok, tmp_path / "hf"), tmp_path / "native")
    assert ours.config.template == "jinja"
    assert ours.config.vision.image_mean == MEAN and ours.config.vision.image_aspect == "pad"
    assert ours.tokens_per_image == 4
    assert_same_logits(hf, ours, tok)
    assert_same_greedy(hf, ours, tok)
    # the checkpoint's own template renders the prompt; chat runs end to end
    assert isinstance(ours.chat(Image.new("RGB", (20, 12), "red"), "What colour?", max_new_tokens=3), str)


@pytest.mark.parametrize("strategy,layer,bias", [("full", -1, True), ("default", 1, False)])
def test_import_strategy_layer_bias(tok, tmp_path, strategy, layer, bias):
    hf = make_hf(tok, strategy=strategy, layer=layer, seed=2, bias=bias)
    ours = convert(write_hf_dir(hf, tok, tmp_path / "hf", template=None), tmp_path / "native")
    assert ours.tokens_per_image == (5 if strategy == "full" else 4)
    assert ours.config.template == "vicuna_v1"  # no template in the checkpoint: LLaVA-1.5's
    assert_same_logits(hf, ours, tok)


# llava-hf/llava-1.5-7b-hf's template: message contents are lists of {"type": ...} parts
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def test_import_warns_on_list_content_template(tok, tmp_path, caplog):
    src = write_hf_dir(make_hf(tok), tok, tmp_path / "hf", template=None)
    (src / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA_HF_TEMPLATE}))
    ours = convert(src, tmp_path / "native")
    assert ours.config.template == "jinja" and ours.tokenizer.chat_template == LLAVA_HF_TEMPLATE
    assert "does not work with minigem's string messages" in caplog.text


def _rewrite(path: Path, rename, shards: int = 1) -> None:
    """Rewrite the HF dir's weights under new names, in `shards` files."""
    state = {rename(k): v for k, v in load_file(str(path / "model.safetensors")).items()}
    (path / "model.safetensors").unlink()
    if shards == 1:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_import_released_layout_sharded(tok, tmp_path):
    """llava-hf's released names (vision_tower.vision_model.*, language_model.model.*), 2 shards."""
    hf = make_hf(tok, seed=3)
    src = write_hf_dir(hf, tok, tmp_path / "hf")
    _rewrite(src, lambda k: re.sub(r"^vision_tower\.", "vision_tower.vision_model.", k), shards=2)
    ours = convert(src, tmp_path / "native")
    assert_same_logits(hf, ours, tok)


def test_import_transformers5_names(tok, tmp_path):
    """model.vision_tower.*, model.multi_modal_projector.*, model.language_model.*, lm_head.weight."""
    hf = make_hf(tok, seed=4)
    src = write_hf_dir(hf, tok, tmp_path / "hf")
    (src / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(src / "model.safetensors"))
    ours = convert(src, tmp_path / "native")
    assert_same_logits(hf, ours, tok)


# ----------------------------------------------------------------------------- export


def native_model(tok, connector: str = "mlp2x_gelu", aspect: str = "pad",
                 pool: int = 1, pos_embed: bool = False) -> VisionLanguageModel:
    cfg = ModelConfig.model_validate({
        "vision": {"config": VISION, "select_layer": -2, "image_aspect": aspect,
                   "image_mean": MEAN, "image_std": STD},
        "connector": {"type": connector, "pool": pool, "pos_embed": pos_embed},
        "llm": {"arch": "llama", "config": {**TEXT, "tie_word_embeddings": False}},
        "template": "vicuna_v1",
    })
    torch.manual_seed(5)
    return VisionLanguageModel.build(cfg, copy.deepcopy(tok)).eval()


def test_export_parity_and_processor(tok, tmp_path):
    ours = native_model(tok)
    save_model(ours, tmp_path / "native")
    assert main(["export", "--to", "hf-llava", str(tmp_path / "native"), str(tmp_path / "hf")]) == 0
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert_same_logits(hf, ours, tok)
    assert_same_greedy(hf, ours, tok)

    # HF's processor expands <image> and preprocesses (pad to square) exactly as we do
    proc = AutoProcessor.from_pretrained(tmp_path / "hf")
    image = Image.new("RGB", (24, 14), (200, 30, 60))
    msgs = [Message("user", "<image>\nWhat colour is the circle?")]
    text = ours.template.render_text(msgs, add_generation_prompt=True)
    hf_in = proc(images=image, text=text, return_tensors="pt")
    assert hf_in["input_ids"][0].tolist() == ours.encode_prompt(msgs, 1)
    # (resampling differs by a grey level or two: torchvision vs PIL bicubic)
    torch.testing.assert_close(hf_in["pixel_values"], ours.processor([image])["pixel_values"], atol=0.05, rtol=0)
    # the exported chat template renders what our template renders
    chat = [{"role": "user", "content": "<image>\nWhat colour is the circle?"}]
    assert proc.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == text

    # and back: import the export, same weights
    back = convert(tmp_path / "hf", tmp_path / "back")
    assert_same_logits(hf, back, tok)


# ----------------------------------------------------------------------------- errors


def run_cli(args: list[str], capsys) -> str:
    assert main(args) == 2
    return capsys.readouterr().err


def test_error_missing_key(tok, tmp_path, capsys):
    src = write_hf_dir(make_hf(tok), tok, tmp_path / "hf")
    state = load_file(str(src / "model.safetensors"))
    del state["language_model.model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(src / "model.safetensors"))
    err = run_cli(["convert", "--from", "hf-llava", str(src), str(tmp_path / "out")], capsys)
    assert "weights do not match the model" in err
    assert "missing (1): language_model.model.layers.1.mlp.up_proj.weight" in err
    assert not (tmp_path / "out").exists()


def test_error_unexpected_key(tok, tmp_path, capsys):
    src = write_hf_dir(make_hf(tok), tok, tmp_path / "hf")
    state = load_file(str(src / "model.safetensors"))
    state["image_newline"] = torch.zeros(48)
    save_file(state, str(src / "model.safetensors"))
    err = run_cli(["convert", "--from", "hf-llava", str(src), str(tmp_path / "out")], capsys)
    assert "unexpected (1): image_newline" in err


@pytest.mark.parametrize("edit,message", [
    ({"model_type": "llama"}, "model_type is 'llama', expected 'llava'"),
    ({"projector_hidden_act": "relu"}, "projector_hidden_act 'relu' is not supported"),
    ({"vision_feature_layer": [-2, -5]}, "vision_feature_layer [-2, -5] selects several layers"),
])
def test_error_bad_config(tok, tmp_path, capsys, edit, message):
    src = write_hf_dir(make_hf(tok), tok, tmp_path / "hf")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **edit}))
    assert message in run_cli(["convert", "--from", "hf-llava", str(src), str(tmp_path / "out")], capsys)


def test_error_missing_dir_and_weights(tok, tmp_path, capsys):
    err = run_cli(["convert", "--from", "hf-llava", str(tmp_path / "nope"), str(tmp_path / "out")], capsys)
    assert f"{tmp_path / 'nope'}: no such model directory" in err
    src = write_hf_dir(make_hf(tok), tok, tmp_path / "hf")
    (src / "model.safetensors").unlink()
    err = run_cli(["convert", "--from", "hf-llava", str(src), str(tmp_path / "out")], capsys)
    assert "no model.safetensors or model.safetensors.index.json" in err


def test_error_export_linear_connector(tok, tmp_path, capsys):
    save_model(native_model(tok, connector="linear"), tmp_path / "native")
    err = run_cli(["export", "--to", "hf-llava", str(tmp_path / "native"), str(tmp_path / "hf")], capsys)
    assert "connector 'linear' (HF LLaVA has only the mlp2x_gelu projector)" in err
    assert not (tmp_path / "hf").exists()


def test_error_export_pooled_connector(tok, tmp_path, capsys):
    save_model(native_model(tok, pool=2), tmp_path / "native")
    err = run_cli(["export", "--to", "hf-llava", str(tmp_path / "native"), str(tmp_path / "hf")], capsys)
    assert "token pooling (connector.pool=2; HF LLaVA has none)" in err
    assert not (tmp_path / "hf").exists()


def test_error_export_position_embedding(tok, tmp_path, capsys):
    save_model(native_model(tok, pos_embed=True), tmp_path / "native")
    err = run_cli(["export", "--to", "hf-llava", str(tmp_path / "native"), str(tmp_path / "hf")], capsys)
    assert "a visual position embedding (connector.pos_embed; HF LLaVA has none)" in err
    assert not (tmp_path / "hf").exists()
