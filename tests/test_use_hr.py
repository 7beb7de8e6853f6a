"""`use_hr: false`: a Mini-Gemini trains (and runs) as its LR-only LLaVA."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import build_tiny_model, mgm_config

from minigem.checkpoints.native import save_model
from minigem.cli import main
from minigem.data.synth import make_scene, render

LLAVA = {"name": "llava", "use_hr": False, "train": ["connector", "llm"],
         "data": {"synth": {"n": 32, "seed": 3, "image_size": 96}},
         "lr": 1e-3, "batch_size": 2, "steps": 2}


def _recipe(tmp_path, init, stage) -> str:
    data = {"training": {"output_dir": str(tmp_path / "run"), "bf16": "off", "log_every": 1,
                         "init_from": str(init), "stages": [stage]}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_lr_only_equals_mining_with_nothing_mined(tiny_tokenizer):
    import random

    model = build_tiny_model(mgm_config(), tiny_tokenizer).eval()
    pix = model.processor([render(make_scene(random.Random(i)), 96) for i in range(2)])
    with torch.no_grad():
        with_hr = model.encode_images(pix["pixel_values"], pix["pixel_values_aux"])
        model.use_hr = False
        calls = []
        hook = model.vision_tower_aux.register_forward_pre_hook(lambda *a: calls.append(1))
        lr_only = model.encode_images(pix["pixel_values"], pix["pixel_values_aux"])
        hook.remove()
        assert calls == []  # the HR tower is not run
        model.use_hr = True
        for p in model.connector.vlm_uni_val_projector[1].parameters():
            p.zero_()
        zero_v = model.encode_images(pix["pixel_values"], pix["pixel_values_aux"])
    assert lr_only.shape == with_hr.shape == (2, model.tokens_per_image, model.language_model.config.hidden_size)
    assert not torch.allclose(lr_only, with_hr)
    torch.testing.assert_close(lr_only, zero_v)


def test_use_hr_false_stage_leaves_the_hr_path_alone(tiny_tokenizer, tmp_path):
    from minigem.config import load_recipe
    from minigem.training.loop import Trainer

    model = build_tiny_model(mgm_config(), tiny_tokenizer, seed=1)
    recipe = load_recipe(_recipe(tmp_path, save_model(model, tmp_path / "mgm"), LLAVA))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    Trainer(recipe, model).run()  # in process: the model's flag is visible afterwards
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert any(k.startswith("connector.projector.") for k in changed)
    assert any(k.startswith("language_model.") for k in changed)
    # the HR tower and the mining got no gradient; everything else may train
    assert not any(k.startswith(("vision_tower_aux.", "connector.vlm_uni_")) for k in changed), sorted(changed)
    assert model.use_hr  # the flag is the stage's: the model runs its HR path again after it


def test_use_hr_false_needs_a_hr_path(tiny_saved_model, tmp_path, capsys):
    assert main(["train", _recipe(tmp_path, tiny_saved_model, LLAVA)]) == 2
    assert "use_hr: false runs a Mini-Gemini as its LR-only LLaVA" in capsys.readouterr().err


def test_use_hr_is_for_lm_stages():
    from minigem.config import StageConfig

    with pytest.raises(ValueError, match="use_hr: false is for `lm` stages"):
        StageConfig.model_validate({**LLAVA, "kind": "contrastive"})


def test_eval_no_hr_scores_the_lr_only_llava(tiny_tokenizer, tiny_data, tmp_path, capsys):
    """`minigem eval --no-hr` answers as the LR-only LLaVA: the same predictions as the model with
    nothing mined (value projection zero), even when the HR tower is broken (NaN weights), which
    the HR path's answers show."""
    import copy
    import json

    model = build_tiny_model(mgm_config(), tiny_tokenizer, seed=2)
    nothing_mined = copy.deepcopy(model)
    with torch.no_grad():
        for p in nothing_mined.connector.vlm_uni_val_projector[1].parameters():
            p.zero_()
        for p in model.vision_tower_aux.parameters():
            p.fill_(float("nan"))
    broken_hr, reference = save_model(model, tmp_path / "a"), save_model(nothing_mined, tmp_path / "b")

    def predictions(path, *flags):
        out = tmp_path / f"{path.name}{''.join(flags)}.jsonl"
        args = ["eval", "--model", str(path), "--data", str(tiny_data),
                "--image-folder", str(tiny_data.parent), "--max-new-tokens", "4", "--predictions", str(out)]
        assert main(args + list(flags)) == 0
        return [json.loads(line)["prediction"] for line in out.read_text().splitlines()]

    want = predictions(reference)
    assert predictions(broken_hr, "--no-hr") == want
    assert predictions(broken_hr) != want  # the HR path is what --no-hr leaves out
    capsys.readouterr()


def test_eval_no_hr_needs_a_hr_path(tiny_saved_model, tiny_data, capsys):
    args = ["eval", "--model", str(tiny_saved_model), "--data", str(tiny_data),
            "--image-folder", str(tiny_data.parent), "--no-hr"]
    assert main(args) == 2
    assert "has no high-res path (not a Mini-Gemini)" in capsys.readouterr().err
