"""`model.ffn_widen`: function-preserving FFN widening (the dense control of the MoE ablation)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model

from minigem.checkpoints.native import load_model, save_model
from minigem.config import FFNWidenConfig
from minigem.errors import ConfigError
from minigem.llm.widen import widen_ffn


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, pixel_values=torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)),
                     ).logits


def _ids(model) -> torch.Tensor:
    text = model.tokenizer("the red circle is left of the square", add_special_tokens=False)["input_ids"]
    return torch.tensor([text[:3] + [model.image_token_id] * model.tokens_per_image + text])


@pytest.mark.parametrize("layers", ["sparse", "all"])
def test_widening_preserves_the_logits_and_reloads(tiny_model_config, tiny_tokenizer, tmp_path, layers):
    model = build_tiny_model(tiny_model_config, tiny_tokenizer)
    ids = _ids(model)
    before = _logits(model, ids)
    n0 = sum(p.numel() for p in model.parameters())
    cfg = FFNWidenConfig(factor=2, layers=layers)
    assert widen_ffn(model.language_model, cfg) == ([0] if layers == "sparse" else [0, 1])
    mlp = model.language_model.model.layers[0].mlp
    assert mlp.gate_proj.out_features == mlp.down_proj.in_features == 128  # 2 x 64
    assert model.language_model.model.layers[1].mlp.up_proj.out_features == (64 if layers == "sparse" else 128)
    added = sum(p.numel() for p in model.parameters()) - n0
    assert added == (1 if layers == "sparse" else 2) * 3 * 32 * 64  # one more FFN per widened layer
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-5, rtol=1e-5)
    # the copies of a unit carry different shares of its output: training can tell them apart
    d = mlp.down_proj.weight
    assert not torch.allclose(d[:, :64], d[:, 64:])
    model.config.ffn_widen = cfg
    loaded = load_model(save_model(model, tmp_path / "wide"))
    assert loaded.config.ffn_widen == cfg
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=0, rtol=0)


def test_widening_errors(tiny_model_config, tiny_tokenizer):
    model = build_tiny_model(tiny_model_config, tiny_tokenizer)
    with pytest.raises(ConfigError, match="layer index 5 is out of range"):
        widen_ffn(model.language_model, FFNWidenConfig(layers=[5]))
    model.language_model.model.layers[0].mlp = torch.nn.Identity()
    with pytest.raises(ConfigError, match="neither gate_proj/up_proj/down_proj nor fc1/fc2"):
        widen_ffn(model.language_model, FFNWidenConfig(layers=[1, 0]))
    assert model.language_model.model.layers[1].mlp.up_proj.out_features == 64  # untouched
