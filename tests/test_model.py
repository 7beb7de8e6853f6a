"""VisionLanguageModel: visual token counts, splicing, loss vs a full-logits reference, what
trains in a stage, frozen towers, and the LLM families it composes with."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TOKENS_PER_IMAGE, build_tiny_model, tiny_model_dict
from PIL import Image

from minigem.chat import IGNORE_INDEX
from minigem.config import ModelConfig, StageConfig
from minigem.data.collate import SampleEncoder, collate
from minigem.data.records import Message, Sample
from minigem.errors import DataError
from minigem.training.stages import apply_stage


def _images(n: int) -> list[Image.Image]:
    colors = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (250, 250, 0), (90, 10, 160)]
    return [Image.new("RGB", (16 + 4 * k, 16), colors[k % len(colors)]) for k in range(n)]


def _ids(model, *parts) -> list[int]:
    """parts: text (str) or an int n = one image's n visual-token slots."""
    out: list[int] = []
    for p in parts:
        if isinstance(p, int):
            out += [model.image_token_id] * (p * model.tokens_per_image)
        else:
            out += model.tokenizer.encode(p, add_special_tokens=False)
    return out


def test_visual_token_count(tiny_model):
    m = tiny_model
    assert m.tokens_per_image == TOKENS_PER_IMAGE == 4
    pix = m.processor(_images(3))["pixel_values"]
    assert pix.shape == (3, 3, 16, 16)
    with torch.no_grad():
        vis = m.encode_images(pix)
    assert vis.shape == (3, 4, 32)  # [n_images, tokens, llm hidden]
    ids = m.encode_prompt([Message("user", "<image> and <image>: same?")], num_images=2)
    assert ids.count(m.image_token_id) == 2 * 4


def test_cls_patch_adds_a_token(tiny_tokenizer):
    d = tiny_model_dict()
    d["vision"]["select_feature"] = "cls_patch"
    m = build_tiny_model(ModelConfig.model_validate(d), tiny_tokenizer)
    assert m.tokens_per_image == 5
    with torch.no_grad():
        assert m.encode_images(m.processor(_images(2))["pixel_values"]).shape == (2, 5, 32)


def test_image_token_mismatch_errors(tiny_model):
    m = tiny_model
    pix = m.processor(_images(2))["pixel_values"]
    ids = torch.tensor([_ids(m, "Look: ", 1, " ok")])
    with pytest.raises(DataError) as err:
        m.embed(ids, pix)
    assert str(err.value) == "image tokens (4) do not match the images given (2 images x 4 tokens)"
    with pytest.raises(DataError) as err:
        m.embed(ids, None)
    assert str(err.value) == "input has 4 image tokens but no images were given"
    with pytest.raises(DataError) as err:
        m.chat(_images(1), "<image> vs <image>?", max_new_tokens=2)
    assert str(err.value) == "the prompt has 2 <image> placeholders but 1 images were given"
    with pytest.raises(DataError) as err:
        m.chat(None, "what is <image>?", max_new_tokens=2)
    assert str(err.value) == "the prompt has 1 <image> placeholders but 0 images were given"


def test_images_spliced_at_their_positions(tiny_model):
    """Any number of images per sample, at any position; text embeddings untouched."""
    m = tiny_model
    rows = [
        _ids(m, 1, "What color is the circle?", 1, "and", 1),  # 3 images: start, middle, end
        _ids(m, "How many objects are there?"),  # text only
        _ids(m, "Is there a red square?", 1),  # 1 image at the end
    ]
    width = max(map(len, rows))
    pad = m.tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    pix = m.processor(_images(4))["pixel_values"]
    with torch.no_grad():
        emb = m.embed(ids, pix)
        visual = m.encode_images(pix)  # [4, T, D]
        text = m.language_model.get_input_embeddings()(ids)
    assert emb.shape == (3, width, 32)
    k = 0  # images are consumed in row-major slot order
    for b, row in enumerate(rows):
        pos = 0
        while pos < width:
            if pos < len(row) and row[pos] == m.image_token_id:
                torch.testing.assert_close(emb[b, pos : pos + 4], visual[k], rtol=0, atol=0)
                pos, k = pos + 4, k + 1
            else:
                torch.testing.assert_close(emb[b, pos], text[b, pos], rtol=0, atol=0)
                pos += 1
    assert k == 4
    # the three images of row 0 are distinct (a swap would be caught)
    assert not torch.allclose(visual[0], visual[1])


def test_text_only_forward_and_chat(tiny_model):
    m = tiny_model
    ids = torch.tensor([_ids(m, "USER: Hello ASSISTANT:")])
    with torch.no_grad():
        out = m(ids)
        ref = m.language_model(input_ids=ids).logits
    assert out.logits.shape == (1, ids.shape[1], len(m.tokenizer))
    torch.testing.assert_close(out.logits, ref)
    assert out.loss is None and out.aux_loss is None
    assert isinstance(m.chat(None, "How many objects are there?", max_new_tokens=3), str)


def _batch(model) -> dict:
    enc = SampleEncoder.for_model(model)
    samples = [
        Sample("a", [Message("user", "<image>\nWhat color is the circle?"), Message("assistant", "red"),
                     Message("user", "Where is it?"), Message("assistant", "top left")], _images(1)),
        Sample("b", [Message("user", "How many objects are there?"), Message("assistant", "3")]),
        Sample("c", [Message("user", "<image> <image>\nIs there a blue diamond?"),
                     Message("assistant", "There are 2 objects: a large blue diamond at the center.")],
               _images(2)),
    ]
    return collate([enc(s) for s in samples], pad_id=model.tokenizer.pad_token_id)


def test_loss_matches_full_logits_reference(tiny_model):
    m = tiny_model
    batch = _batch(m)
    labels = batch["labels"]
    with torch.no_grad():
        out = m(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], labels=labels)
        embeds = m.embed(batch["input_ids"], batch["pixel_values"])
        full = m.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    ref = F.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), labels[:, 1:].reshape(-1),
                          ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    assert out.lm_loss is out.loss
    # logits only at positions some row supervises (the next token is a label)
    keep = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(-1)
    assert out.logits.shape == (3, len(keep), full.shape[-1])
    assert len(keep) < labels.shape[1] - 1
    real = batch["attention_mask"][:, keep].bool()  # pads have other position ids: skip them
    torch.testing.assert_close(out.logits[real], full[:, keep][real], rtol=1e-5, atol=1e-5)


def test_loss_is_finite_and_backprops(tiny_model):
    m = tiny_model
    apply_stage(m, _stage(["connector", "llm"]))
    batch = _batch(m)
    out = m(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], labels=batch["labels"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert m.connector.projector[0].weight.grad.abs().sum() > 0


def _stage(train: list[str]) -> StageConfig:
    return StageConfig(name="s", train=train, data={"synth": {"n": 1}}, steps=1)


@pytest.mark.parametrize("train", [["connector"], ["vision", "connector"], ["llm"], ["vision"],
                                   ["projector"]])
def test_gradients_reach_only_trained_components(tiny_model, train):
    m = tiny_model
    n = apply_stage(m, _stage(train))
    batch = _batch(m)
    out = m(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], labels=batch["labels"])
    out.loss.backward()
    trains = {"vision": "vision" in train, "connector": "connector" in train or "projector" in train,
              "llm": "llm" in train}
    prefix = {"vision_tower.": "vision", "connector.": "connector", "language_model.": "llm"}
    count = 0
    for name, p in m.named_parameters():
        comp = next(c for pre, c in prefix.items() if name.startswith(pre))
        assert p.requires_grad == trains[comp], name
        if trains[comp]:
            count += p.numel()
        else:
            assert p.grad is None, name
    assert n == count > 0
    # gradient flows into every trained component (through the frozen ones)
    for comp, on in trains.items():
        if on:
            pre = next(k for k, c in prefix.items() if c == comp)
            grads = [p.grad for k, p in m.named_parameters() if k.startswith(pre)]
            assert any(g is not None and g.abs().sum() > 0 for g in grads), comp


def test_stage_with_missing_component_fails(tiny_model):
    from minigem.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        apply_stage(tiny_model, _stage(["vision_aux"]))
    assert str(err.value) == "stage trains 'vision_aux' but the model has no high-res tower"
    with pytest.raises(ConfigError) as err:
        apply_stage(tiny_model, _stage(["moe"]))
    assert str(err.value) == "stage trains 'moe' but the model has no MoE layers"


def test_frozen_tower_stays_in_eval_mode(tiny_model):
    m = tiny_model
    apply_stage(m, _stage(["connector", "llm"]))
    m.train()
    assert m.training and m.connector.training and m.language_model.training
    assert not m.vision_tower.training
    assert not any(mod.training for mod in m.vision_tower.modules())
    m.eval()
    m.train(True)
    assert not m.vision_tower.training
    apply_stage(m, _stage(["vision"]))  # a trained tower does go to train mode
    m.train()
    assert m.vision_tower.training
    m.eval()
    assert not m.vision_tower.training and not m.language_model.training


LLM_CONFIGS = {
    "llama": {},
    "qwen2": {},
    "mistral": {"sliding_window": None},
    "gemma": {"head_dim": 16},
    "phi": {},
}


@pytest.mark.parametrize("arch", list(LLM_CONFIGS))
def test_llm_families(tiny_tokenizer, arch, tmp_path):
    d = tiny_model_dict()
    cfg = {k: v for k, v in d["llm"]["config"].items() if k != "num_key_value_heads" or arch != "phi"}
    cfg.update(LLM_CONFIGS[arch])
    if arch == "phi":
        cfg["num_key_value_heads"] = 2
    d["llm"] = {"arch": arch, "config": cfg}
    m = build_tiny_model(ModelConfig.model_validate(d), tiny_tokenizer)
    assert m.language_model.config.model_type == arch
    assert m.language_model.get_input_embeddings().num_embeddings >= len(m.tokenizer)
    batch = _batch(m)
    with torch.no_grad():
        out = m(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], labels=batch["labels"])
    assert torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(torch.log(torch.tensor(float(len(m.tokenizer)))).item(), rel=0.5)
    text = m.chat(_images(1)[0], "What color is the circle?", max_new_tokens=3)
    assert isinstance(text, str)
    # the checkpoint's frozen HF config rebuilds this family exactly
    from minigem.checkpoints.native import load_model, save_model

    loaded = load_model(save_model(m, tmp_path / arch))
    assert loaded.language_model.config.model_type == arch
    with torch.no_grad():
        again = loaded(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], labels=batch["labels"])
    torch.testing.assert_close(again.logits, out.logits, rtol=0, atol=0)


def test_connector_pool_averages_the_token_grid(tiny_tokenizer):
    """pool 2 on a 4x4 grid (32 px, patch 8): 16 tokens -> 4, each the mean of its 2x2 block."""
    from minigem.connectors.base import pool_grid
    from minigem.vision.base import VisionFeatures

    d = tiny_model_dict()
    d["vision"]["config"]["image_size"] = 32
    d["connector"]["pool"] = 2
    m = build_tiny_model(ModelConfig.model_validate(d), tiny_tokenizer)
    assert m.tokens_per_image == 4
    x = torch.randn(2, 16, 32)
    pooled = pool_grid(x, 2)
    grid = x.reshape(2, 4, 4, 32)
    assert torch.allclose(pooled[:, 1], grid[:, 0:2, 2:4].mean(dim=(1, 2)), atol=1e-6)  # top right
    assert torch.allclose(pooled[:, 2], grid[:, 2:4, 0:2].mean(dim=(1, 2)), atol=1e-6)  # bottom left
    with torch.no_grad():
        out = m.connector(VisionFeatures(x, None))
        assert torch.allclose(out, m.connector.projector(pooled), atol=1e-6)
        assert m.encode_images(m.processor(_images(3))["pixel_values"]).shape == (3, 4, 32)


def test_connector_pool_concat_is_space_to_depth(tiny_tokenizer):
    """pool_mode concat: each 2x2 block's four features side by side (row-major), so the
    projector sees 4C channels and no detail inside the block is averaged away."""
    from minigem.connectors.base import pool_grid
    from minigem.vision.base import VisionFeatures

    x = torch.randn(2, 16, 8)
    grid = x.reshape(2, 4, 4, 8)
    cat = pool_grid(x, 2, "concat")
    assert cat.shape == (2, 4, 32)
    # token 1 = top-right block: patches (0,2), (0,3), (1,2), (1,3)
    want = torch.cat([grid[:, 0, 2], grid[:, 0, 3], grid[:, 1, 2], grid[:, 1, 3]], dim=-1)
    torch.testing.assert_close(cat[:, 1], want, rtol=0, atol=0)
    # the mean of the four slices is the avg pool
    torch.testing.assert_close(cat.reshape(2, 4, 4, 8).mean(2), pool_grid(x, 2), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="unknown pool mode 'max'"):
        pool_grid(x, 2, "max")

    d = tiny_model_dict()
    d["vision"]["config"]["image_size"] = 32
    d["connector"].update(pool=2, pool_mode="concat")
    m = build_tiny_model(ModelConfig.model_validate(d), tiny_tokenizer)
    vision_dim = m.vision_tower.hidden_size
    assert m.connector.projector[0].in_features == 4 * vision_dim and m.tokens_per_image == 4
    with torch.no_grad():
        feats = torch.randn(3, 16, vision_dim)
        out = m.connector(VisionFeatures(feats, None))
        torch.testing.assert_close(out, m.connector.projector(pool_grid(feats, 2, "concat")))


def test_connector_pos_embed_adds_a_learned_vector_per_token(tiny_tokenizer, tmp_path):
    """pos_embed: a trainable [T, C_in] parameter added to every view's (pooled) tokens; it
    is saved with the checkpoint, and a grid of another size is a clear error."""
    from minigem.checkpoints.native import load_model, save_model
    from minigem.vision.base import VisionFeatures

    d = tiny_model_dict()
    d["vision"]["config"]["image_size"] = 32
    d["connector"].update(pool=2, pool_mode="concat", pos_embed=True)
    torch.manual_seed(0)
    m = build_tiny_model(ModelConfig.model_validate(d), tiny_tokenizer)
    vision_dim = m.vision_tower.hidden_size
    pe = m.connector.pos_embed
    assert pe.shape == (4, 4 * vision_dim) and pe.requires_grad
    assert "connector.pos_embed" in dict(m.named_parameters())
    feats = torch.randn(3, 16, vision_dim)
    with torch.no_grad():
        out = m.connector(VisionFeatures(feats, None))
        from minigem.connectors.base import pool_grid

        torch.testing.assert_close(out, m.connector.projector(pool_grid(feats, 2, "concat") + pe))
        # the same features at another token sees another embedding: position is in the value
        assert not torch.allclose(out[:, 0], m.connector.projector(pool_grid(feats, 2, "concat") + pe[1])[:, 0])
    loaded = load_model(save_model(m, tmp_path / "m"))
    torch.testing.assert_close(loaded.connector.pos_embed, pe, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"pos_embed is \(4, \d+\) .* are \(9, \d+\)"):
        with torch.no_grad():
            m.connector(VisionFeatures(torch.randn(1, 36, vision_dim), None))


def test_connector_pool_rejects_a_grid_it_cannot_divide(tiny_tokenizer):
    d = tiny_model_dict()  # 16 px, patch 8: a 2x2 grid
    d["connector"]["pool"] = 3
    m = build_tiny_model(ModelConfig.model_validate(d), tiny_tokenizer)
    with pytest.raises(ValueError, match="pool=3 needs a square grid"):
        with torch.no_grad():
            m.encode_images(m.processor(_images(1))["pixel_values"])
