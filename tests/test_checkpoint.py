"""Native checkpoints: round trip gives identical logits; atomic, self-contained directories;
clear messages for missing, partial and foreign checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from minigem.checkpoints.native import load_model, save_model
from minigem.errors import CheckpointError, ConfigError


def _logits(model) -> torch.Tensor:
    imgs = [Image.new("RGB", (20, 12), (200, 40, 40))]
    ids = model.encode_prompt(model.user_messages("What color is the circle?", 1), 1)
    with torch.no_grad():
        return model(torch.tensor([ids]), pixel_values=model.processor(imgs)["pixel_values"]).logits


def test_round_trip_gives_identical_logits(tiny_model, tmp_path):
    path = save_model(tiny_model, tmp_path / "ckpt")
    loaded = load_model(path)
    assert not loaded.training
    torch.testing.assert_close(_logits(loaded), _logits(tiny_model), rtol=0, atol=0)
    own, back = tiny_model.state_dict(), loaded.state_dict()
    assert own.keys() == back.keys()
    assert all(torch.equal(own[k], back[k]) for k in own)
    assert loaded.config.llm.arch == "llama" and loaded.config.template == "vicuna_v1"
    assert loaded.config.vision.select_layer == tiny_model.config.vision.select_layer
    assert loaded.config.system_prompt == "" and loaded.config.max_length == 256
    # the tokenizer comes back too: same ids, same specials
    assert len(loaded.tokenizer) == len(tiny_model.tokenizer)
    assert loaded.image_token_id == tiny_model.image_token_id
    assert loaded.tokenizer.pad_token_id == tiny_model.tokenizer.pad_token_id
    text = "USER: <image>\nWhat color is the circle? ASSISTANT: red</s>"
    assert loaded.tokenizer.encode(text) == tiny_model.tokenizer.encode(text)
    kw = {"max_new_tokens": 6}
    q = ([Image.new("RGB", (16, 16), (0, 0, 255))], "Where is the blue square?")
    assert loaded.chat(*q, **kw) == tiny_model.chat(*q, **kw)


def test_directory_layout_and_no_temp_dirs(tiny_model, tmp_path):
    path = save_model(tiny_model, tmp_path / "ckpt")
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no .ckpt.tmp-* left behind
    meta = json.loads((path / "config.json").read_text())
    assert meta["format"] == "minigem"
    m = meta["model"]
    # self-contained: the full HF configs inlined, no paths to elsewhere
    assert m["llm"]["arch"] == "llama" and m["llm"]["path"] is None and m["tokenizer"] is None
    assert m["llm"]["config"]["hidden_size"] == 32 and m["llm"]["config"]["vocab_size"] >= len(tiny_model.tokenizer)
    assert m["vision"]["config"]["patch_size"] == 8 and m["vision"]["path"] is None
    # overwrite in place: still exactly one directory, with the new weights
    with torch.no_grad():
        tiny_model.connector.projector[0].bias.fill_(0.5)
    save_model(tiny_model, path)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert (load_file(str(path / "model.safetensors"))["connector.projector.0.bias"] == 0.5).all()


def test_failed_save_leaves_the_old_checkpoint(tiny_model, tmp_path, monkeypatch):
    from minigem.checkpoints import native

    path = save_model(tiny_model, tmp_path / "ckpt")
    before = (path / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(native, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(tiny_model, path)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert (path / "model.safetensors").read_bytes() == before


def _err(path) -> str:
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    return str(err.value)


def test_missing_directory(tmp_path):
    assert _err(tmp_path / "nope") == f"{tmp_path / 'nope'}: no such model directory"


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert _err(tmp_path) == f"{tmp_path}: not a model directory (no config.json)"


def test_foreign_configs(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "architectures": ["x"]}))
    assert _err(tmp_path) == (
        f"{tmp_path}: not a minigem checkpoint (an HF LLaVA checkpoint: use `minigem convert --from hf-llava`)"
    )
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "mgm", "mm_vision_tower": "openai/clip-vit-large-patch14-336"}))
    assert _err(tmp_path) == (
        f"{tmp_path}: not a minigem checkpoint "
        "(looks like a Mini-Gemini/LLaVA checkpoint: use `minigem convert --from mgm`)"
    )
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert _err(tmp_path) == f"{tmp_path}: not a minigem checkpoint"
    (tmp_path / "config.json").write_text("{not json")
    assert _err(tmp_path).startswith(f"{tmp_path / 'config.json'}: not valid JSON: ")


def test_bad_model_section(tiny_saved_model):
    cfg = tiny_saved_model / "config.json"
    meta = json.loads(cfg.read_text())
    meta["model"]["connector"]["type"] = "wormhole"
    cfg.write_text(json.dumps(meta))
    with pytest.raises(ConfigError) as err:
        load_model(tiny_saved_model)
    msg = str(err.value)
    assert msg.startswith(f"{cfg}: invalid config\n  connector.type: Input should be 'linear', ")
    assert "'mlp2x_gelu'" in msg


def test_missing_weights_file(tiny_saved_model):
    (tiny_saved_model / "model.safetensors").unlink()
    assert _err(tiny_saved_model) == f"{tiny_saved_model}: no model.safetensors"


def test_missing_and_unexpected_keys_are_listed(tiny_saved_model):
    wfile = tiny_saved_model / "model.safetensors"
    weights = load_file(str(wfile))
    del weights["connector.projector.2.weight"]
    weights["connector.extra.weight"] = torch.zeros(2)
    save_file(weights, str(wfile))
    assert _err(tiny_saved_model) == (
        f"{wfile}: weights do not match the model.\n"
        "  missing (1): connector.projector.2.weight\n"
        "  unexpected (1): connector.extra.weight"
    )


def test_shape_mismatch(tiny_saved_model):
    wfile = tiny_saved_model / "model.safetensors"
    weights = load_file(str(wfile))
    weights["connector.projector.0.bias"] = torch.zeros(7)
    save_file(weights, str(wfile))
    assert _err(tiny_saved_model) == (
        f"{wfile}: connector.projector.0.bias has shape (7,), model expects (32,)"
    )


def test_missing_tokenizer(tiny_saved_model):
    for f in tiny_saved_model.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            f.unlink()
    assert _err(tiny_saved_model).startswith(f"{tiny_saved_model}: cannot load the tokenizer")


def test_tied_embeddings_round_trip(tiny_tokenizer, tmp_path):
    from conftest import build_tiny_model, tiny_model_dict

    from minigem.config import ModelConfig

    d = tiny_model_dict()
    d["llm"]["config"]["tie_word_embeddings"] = True
    model = build_tiny_model(ModelConfig.model_validate(d), tiny_tokenizer)
    path = save_model(model, tmp_path / "tied")
    keys = load_file(str(path / "model.safetensors")).keys()
    assert "language_model.lm_head.weight" not in keys  # stored once
    loaded = load_model(path)
    lm = loaded.language_model
    assert lm.lm_head.weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)
