"""The `glyph` stage (minigem.training.glyph): HR tower + mining trained on per-object glyphs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tiny_model, mgm_config
from safetensors.torch import load_file

from minigem.checkpoints.native import load_model, save_model
from minigem.cli import main
from minigem.config import StageConfig, load_recipe
from minigem.data.synth import GLYPHS, make_scene, render
from minigem.training.glyph import GlyphHead, GlyphScenes, collate_glyphs

GLYPH = {"name": "mining", "kind": "glyph", "train": ["vision_aux", "mining"],
         "data": {"synth": {"n": 64, "seed": 3, "image_size": 96}},
         "eval_data": {"synth": {"n": 8, "seed": 9, "image_size": 96}},
         "lr": 1e-3, "batch_size": 4, "steps": 3}


KEEP = {**GLYPH, "name": "keep", "train": ["mining", "projector"],
        "glyph": {"read": "projector", "keep_weight": 1.0}, "lr": 3e-3}


def _recipe(tmp_path: Path, init: Path, stage: dict, **training) -> Path:
    data = {"training": {"output_dir": str(tmp_path / "run"), "seed": 0, "bf16": "off", "log_every": 1,
                         "save_every": 1000, "eval_every": 3, "init_from": str(init), **training,
                         "stages": [stage]}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "glyph.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def mgm_dir(tiny_tokenizer, tmp_path) -> Path:
    return save_model(build_tiny_model(mgm_config(), tiny_tokenizer, seed=2), tmp_path / "mgm")


def test_scenes_label_each_glyphed_cell(tiny_tokenizer):
    model = build_tiny_model(mgm_config(), tiny_tokenizer)
    cfg = StageConfig.model_validate(GLYPH).data.synth
    scenes = GlyphScenes(cfg, model.processor)
    item = scenes[5]
    scene = make_scene(random.Random(f"minigem-glyph/{cfg.seed}/5"), need_glyph=True)
    want = [-1] * 9
    for obj in scene.objects:
        if obj.glyph is not None:
            want[obj.cell] = GLYPHS.index(obj.glyph)
    assert item["glyphs"].tolist() == [want] and max(want) >= 0
    assert item["pixel_values_aux"].shape == (1, 3, 48, 48)  # rendered at 96, processed to HR 48
    batch = collate_glyphs([scenes[i] for i in range(3)])
    assert batch["glyphs"].shape == (3, 9) and batch["pixel_values"].shape[0] == 3
    # the head reads exactly the glyphed cells of the mined tokens
    head = GlyphHead(model)
    loss, acc = head(model, batch)
    from minigem.vision.base import VisionFeatures

    with torch.no_grad():
        mined = model.connector.mine(VisionFeatures(model.vision_tower(batch["pixel_values"]),
                                                    model.vision_tower_aux(batch["pixel_values_aux"])))
        keep = batch["glyphs"].flatten() >= 0
        want_loss = torch.nn.functional.cross_entropy(head.head(mined.flatten(0, 1)[keep]),
                                                      batch["glyphs"].flatten()[keep])
    torch.testing.assert_close(loss, want_loss)


def _train_changes_only(tmp_path: Path, init: Path, stage: dict, prefixes: tuple[str, ...]) -> list[dict]:
    """Run `stage` from `init`; every prefix's weights changed and nothing else did (neither the head
    nor anything it keeps is saved in the model). Returns the logged records."""
    assert main(["train", str(_recipe(tmp_path, init, stage))]) == 0
    before, after = load_file(str(init / "model.safetensors")), load_file(
        str(tmp_path / "run" / "final" / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert all(any(k.startswith(p) for k in changed) for p in prefixes), sorted(changed)
    assert all(k.startswith(prefixes) for k in changed), sorted(changed)
    assert before.keys() == after.keys()
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_glyph_stage_trains_the_hr_tower_and_mining_only(mgm_dir, tmp_path):
    # the LR tower, projector and LLM stay as they were
    recs = _train_changes_only(tmp_path, mgm_dir, GLYPH, ("vision_tower_aux.", "connector.vlm_uni_"))
    assert [r["step"] for r in recs if "glyph_acc" in r] == [1, 2, 3]
    ev = [r for r in recs if "eval_glyph_acc" in r]
    assert len(ev) == 1 and 0.0 <= ev[0]["eval_glyph_acc"] <= 1.0


def test_glyph_stage_learns(tiny_tokenizer):
    """On a fixed handful of scenes the head + mining + HR tower fit the glyphs (loss falls well
    below chance's ln 16): the gradient reaches the tower through the mining."""
    torch.manual_seed(0)
    model = build_tiny_model(mgm_config(), tiny_tokenizer)
    cfg = StageConfig.model_validate({**GLYPH, "data": {"synth": {"n": 6, "seed": 1, "image_size": 96}}}).data.synth
    batch = collate_glyphs([GlyphScenes(cfg, model.processor)[i] for i in range(6)])
    head = GlyphHead(model)
    params = [*head.parameters(), *model.vision_tower_aux.parameters(),
              *(p for n, p in model.connector.named_parameters() if n.startswith("vlm_uni_"))]
    opt = torch.optim.AdamW(params, lr=3e-3)
    model.train()
    first = None
    for _ in range(60):
        loss, acc = head(model, batch)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 2.0 and loss.item() < 0.5 * first and acc.item() > 0.5


def test_glyph_stage_errors(tiny_saved_model, mgm_dir, tmp_path, capsys):
    # an LR-only model has nothing to mine with
    assert main(["train", str(_recipe(tmp_path, tiny_saved_model, {**GLYPH, "train": ["connector"]}))]) == 2
    assert "needs a Mini-Gemini model" in capsys.readouterr().err
    # LLaVA JSON data has no per-object glyphs
    bad = {**GLYPH, "data": {"path": "x.json"}}
    assert main(["train", str(_recipe(tmp_path, mgm_dir, bad))]) == 2
    assert "draws its scenes from the synthetic world" in capsys.readouterr().err


@pytest.mark.parametrize("keep", [False, True])
def test_glyph_stage_resumes_exactly(mgm_dir, tmp_path, keep):
    """Interrupted after 2 of 4 steps and resumed, the stage ends where an uninterrupted run does
    (the head's weights travel in the checkpoint, and with `keep_weight` the starting projector
    the outputs are kept near; the scenes are a function of their index)."""
    stage = {**GLYPH, "steps": 4}
    if keep:
        stage = {**KEEP, "steps": 4}
    whole = _recipe(tmp_path / "a", mgm_dir, stage, eval_every=None)
    assert main(["train", str(whole)]) == 0
    cut = _recipe(tmp_path / "b", mgm_dir, stage, eval_every=None)
    assert main(["train", str(cut), "--stop-after", "2"]) == 0
    assert main(["train", str(cut), "--resume"]) == 0
    a = load_file(str(tmp_path / "a" / "run" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_tiny_mgm_recipe_runs_every_stage(tmp_path):
    """recipes/tiny-mgm.yaml: the bundled Mini-Gemini's six stages, each one step on a shrunken
    model, through the CLI; the result is a Mini-Gemini that chats."""
    path = Path(__file__).resolve().parents[1] / "recipes" / "tiny-mgm.yaml"
    recipe = load_recipe(path)
    st = recipe.training.stages
    assert [(s.name, s.kind, s.use_hr) for s in st] == [
        ("contrastive", "contrastive", True), ("llava", "lm", False), ("hr-contrastive", "contrastive", True),
        ("mining", "glyph", True), ("keep", "glyph", True), ("mgm", "lm", True)]
    assert [s.train for s in st] == [["vision"], ["connector", "llm"], ["vision_aux"], ["vision_aux", "mining"],
                                     ["mining", "projector"], ["vision", "connector", "llm"]]
    assert [s.lr_scale for s in st] == [{}] * 5 + [{"vision": 0.1}]
    assert st[2].contrastive.pool == "max" and st[2].data.synth.tasks == ["glyphs"]
    assert (st[3].glyph.read, st[4].glyph.read, st[4].glyph.keep_weight) == ("mined", "projector", 1.0)
    # the LR-only stage at the 128 px its LR tower was pretrained on; every HR stage at the HR tower's size
    assert st[0].data.synth.image_size == st[1].data.synth.image_size == 128
    assert all(s.data.synth.image_size == recipe.model.vision_aux.image_size == 96 for s in st[2:])
    assert recipe.model.connector.type == "patch_mining" and recipe.model.connector.pool == 2
    overrides = [
        f"training.output_dir={tmp_path / 'run'}", "training.bf16='off'",
        "model.tokenizer_train.vocab_size=300",
        'model.llm.config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, '
        '"num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 512}',
        "model.vision.config.hidden_size=32", "model.vision.config.intermediate_size=64",
        "model.vision.config.num_hidden_layers=1", "model.vision.config.num_attention_heads=2",
        'model.vision_aux.config={"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1]}',
        "training.stages.mining.eval_data.synth.n=2", "training.stages.keep.eval_data.synth.n=2",
    ]
    for s in st:
        overrides += [f"training.stages.{s.name}.steps=1", f"training.stages.{s.name}.batch_size=2"]
    assert main(["train", str(path), *overrides]) == 0
    model = load_model(tmp_path / "run" / "final")
    assert model.vision_tower_aux is not None and model.tokens_per_image == 9
    assert isinstance(model.chat(render(make_scene(random.Random(0)), 96), "What is written on the circle?",
                                 max_new_tokens=2), str)


def test_glyph_read_projector_keeps_the_lr_only_output(tiny_tokenizer):
    """`glyph: {read: projector, keep_weight: w}`: the head reads the projector's output for the
    glyphed cells, and the loss adds w x the relative MSE of that output, on every cell, against
    the starting projector's output for the LR token alone; the starting projector is frozen."""
    from minigem.vision.base import VisionFeatures

    torch.manual_seed(0)
    model = build_tiny_model(mgm_config(), tiny_tokenizer)
    cfg = StageConfig.model_validate(KEEP).data.synth
    batch = collate_glyphs([GlyphScenes(cfg, model.processor)[i] for i in range(3)])
    head = GlyphHead(model, "projector", keep_weight=2.0)
    assert head.head.in_features == model.language_model.config.hidden_size
    assert not any(p.requires_grad for p in head.start.parameters())
    with torch.no_grad():  # move the live projector away from the start, so the keep term is not 0
        for p in model.connector.projector.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss, _ = head(model, batch)
    with torch.no_grad():
        low = model.vision_tower(batch["pixel_values"])
        seen = model.connector(VisionFeatures(low, model.vision_tower_aux(batch["pixel_values_aux"])))
        keep = batch["glyphs"].flatten() >= 0
        ce = torch.nn.functional.cross_entropy(head.head(seen.flatten(0, 1)[keep]), batch["glyphs"].flatten()[keep])
        start = head.start(model.connector.pooled(low))
        rel = ((seen - start) ** 2).mean() / (start**2).mean()
    assert rel > 1e-3
    torch.testing.assert_close(loss, ce + 2.0 * rel)
    # without keep_weight: the cross-entropy alone
    loss0, _ = GlyphHead(model, "projector")(model, batch)
    assert GlyphHead(model, "projector").start is None and loss0.shape == ()


def test_keep_stage_trains_mining_and_projector_only(mgm_dir, tmp_path):
    recs = _train_changes_only(tmp_path, mgm_dir, KEEP, ("connector.projector.", "connector.vlm_uni_"))
    assert len([r for r in recs if "eval_glyph_acc" in r]) == 1


def test_glyph_config_errors():
    with pytest.raises(ValueError, match="set glyph.read: projector"):
        StageConfig.model_validate({**GLYPH, "glyph": {"keep_weight": 1.0}})
    with pytest.raises(ValueError, match="use_hr: false is for `lm` stages"):
        StageConfig.model_validate({**GLYPH, "use_hr": False})
