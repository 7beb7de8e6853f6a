"""Fine-tuning a native checkpoint: `training.init_from` through the CLI (dense, upcycled to MoE,
resumed, an imported Mini-Gemini), and the errors for what must come from the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import minigem
from minigem.cli import main
from minigem.config import load_recipe

INSTRUCT = {
    "name": "instruct", "train": ["connector", "llm"],
    "data": {"synth": {"n": 16, "seed": 4, "image_size": 96}},
    "lr": 1e-3, "batch_size": 4, "steps": 2,
}
MOE_STAGE = {
    "name": "moe", "train": ["moe"], "upcycle": True,
    "data": {"synth": {"n": 16, "seed": 5, "image_size": 96}},
    "lr": 1e-3, "batch_size": 4, "steps": 2,
}
MOE = {"num_experts": 4, "top_k": 2, "layers": "sparse"}


def _recipe(tmp_path: Path, stages: list[dict], model: dict | None = None, name: str = "ft.yaml",
            **training) -> Path:
    data: dict = {"training": {"output_dir": str(tmp_path / "run"), "seed": 0, "bf16": "off",
                               "log_every": 1, "save_every": 1000, **training, "stages": stages}}
    if model is not None:
        data["model"] = model
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


def _config(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())["model"]


def _fails(capsys, *argv: str) -> str:
    assert main(["train", *argv]) == 2
    return capsys.readouterr().err


def test_finetunes_a_saved_model_through_the_cli(tiny_saved_model, tmp_path):
    src = tiny_saved_model
    recipe = _recipe(tmp_path, [INSTRUCT], model={"max_length": 200, "system_prompt": "Be brief."})
    # the dotted override on the command line is how a user points a recipe at a checkpoint
    assert main(["train", str(recipe), f"training.init_from={src}"]) == 0
    final = tmp_path / "run" / "final"
    before, after = _weights(src), _weights(final)
    assert before.keys() == after.keys()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"connector", "language_model"}  # the vision tower was frozen
    want = {**_config(src), "max_length": 200, "system_prompt": "Be brief."}
    assert _config(final) == want  # the checkpoint's config + the allowed overrides
    assert (final / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()
    model = minigem.load(final)
    assert model.config.max_length == 200 and len(model.tokenizer) == len(minigem.load(src).tokenizer)
    assert isinstance(model.chat(None, "How many objects are there?", max_new_tokens=2), str)
    # the resolved recipe is the effective one and loads again as is
    saved = load_recipe(tmp_path / "run" / "recipe.yaml")
    assert saved.training.init_from == str(src)
    assert saved.model.model_dump(mode="json") == want


def test_upcycles_a_dense_checkpoint_to_moe(tiny_saved_model, tmp_path):
    recipe = _recipe(tmp_path, [MOE_STAGE], model={"moe": MOE}, init_from=str(tiny_saved_model))
    assert main(["train", str(recipe)]) == 0
    final = tmp_path / "run" / "final"
    cfg = _config(final)
    assert cfg["moe"]["num_experts"] == 4 and cfg["moe"]["top_k"] == 2
    assert {k: v for k, v in cfg.items() if k != "moe"} == {
        k: v for k, v in _config(tiny_saved_model).items() if k != "moe"}
    model = minigem.load(final)
    from minigem.llm.moe import moe_layers

    assert len(moe_layers(model)) == 1  # `sparse` on 2 layers: layer 0
    w, dense = _weights(final), _weights(tiny_saved_model)
    for k in dense:  # only the MoE layers trained: everything else is the checkpoint's
        if k in w:
            assert torch.equal(w[k], dense[k]), k
    experts = [k for k in w if ".experts." in k]
    assert experts and any(k.endswith("router.weight") for k in w)


def test_resume_with_init_from_is_bit_identical(tiny_saved_model, tmp_path):
    stages = [INSTRUCT, MOE_STAGE]
    (tmp_path / "a").mkdir()
    a = _recipe(tmp_path / "a", stages, model={"moe": MOE}, init_from=str(tiny_saved_model))
    assert main(["train", str(a)]) == 0
    (tmp_path / "b").mkdir()
    b = _recipe(tmp_path / "b", stages, model={"moe": MOE}, init_from=str(tiny_saved_model))
    assert main(["train", str(b), "--stop-after", "3"]) == 0  # inside the upcycled stage
    assert not (tmp_path / "b" / "run" / "final").exists()
    assert main(["train", str(b), "--resume"]) == 0
    wa, wb = _weights(tmp_path / "a" / "run" / "final"), _weights(tmp_path / "b" / "run" / "final")
    assert wa.keys() == wb.keys()
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []


def test_errors(tiny_saved_model, tmp_path, capsys):
    src = str(tiny_saved_model)
    err = _fails(capsys, str(_recipe(tmp_path, [INSTRUCT], model={"llm": {"config": {"hidden_size": 64}}},
                                     init_from=src)))
    assert "model.llm.config.hidden_size: comes from the checkpoint" in err and src in err
    assert "model.moe, model.template, model.system_prompt, model.max_length" in err
    err = _fails(capsys, str(_recipe(tmp_path, [INSTRUCT], model={"connector": {"type": "linear"}},
                                     init_from=src)))
    assert "model.connector.type: comes from the checkpoint" in err
    # a field equal to the checkpoint's is fine (a saved, resolved recipe loads again)
    ok = load_recipe(_recipe(tmp_path, [INSTRUCT], model={"connector": {"type": "mlp2x_gelu"}},
                             init_from=src))
    assert ok.model.llm.arch == "llama"
    missing = tmp_path / "nope"
    err = _fails(capsys, str(_recipe(tmp_path, [INSTRUCT])), f"training.init_from={missing}")
    assert "training.init_from" in err and f"{missing}: no such model directory" in err
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text('{"model_type": "llava"}')
    err = _fails(capsys, str(_recipe(tmp_path, [INSTRUCT], init_from=str(tmp_path / "foreign"))))
    assert f"{tmp_path / 'foreign'}: not a minigem checkpoint" in err
    err = _fails(capsys, str(_recipe(tmp_path, [INSTRUCT], model={"moe": MOE}, init_from=src)))
    assert "needs a stage with `upcycle: true`" in err
    err = _fails(capsys, str(_recipe(tmp_path, [MOE_STAGE], init_from=src)))
    assert "needs model.moe" in err
    err = _fails(capsys, str(_recipe(tmp_path, [INSTRUCT])))  # neither `model` nor init_from
    assert "training.init_from" in err


def _llava_json(folder: Path) -> Path:
    folder.mkdir()
    records = []
    for i, (name, rgb) in enumerate([("red", (220, 20, 20)), ("green", (20, 200, 20)),
                                     ("blue", (20, 20, 220)), ("red", (200, 40, 40))]):
        Image.new("RGB", (40, 28), rgb).save(folder / f"{i}.png")
        records.append({"id": f"r{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the image?"},
            {"from": "gpt", "value": name}]})
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def test_finetunes_an_imported_mini_gemini(tmp_path):
    pytest.importorskip("timm")
    from test_mgm_import import Release, write_release

    from minigem.chat import train_tokenizer
    from minigem.data.synth import world_texts

    tok = train_tokenizer(world_texts(), vocab_size=300)
    src = write_release(tmp_path / "release", Release(len(tok)), tok)
    native = tmp_path / "native"
    assert main(["convert", "--from", "mgm", str(src), str(native)]) == 0
    data = _llava_json(tmp_path / "data")
    stage = {"name": "finetune", "train": ["mining", "projector", "llm"], "data": {"path": str(data)},
             "lr": 1e-3, "batch_size": 2, "steps": 1}
    recipe = _recipe(tmp_path, [stage], model={"template": "vicuna_v1"})
    assert main(["train", str(recipe), f"training.init_from={native}"]) == 0
    final = tmp_path / "run" / "final"
    assert _config(final) == _config(native)
    before, after = _weights(native), _weights(final)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("language_model."))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("vision_tower"))
    model = minigem.load(final)
    assert model.config.connector.type == "patch_mining"
    assert isinstance(model.chat(Image.new("RGB", (40, 28), (220, 20, 20)), "What color is the image?",
                                 max_new_tokens=2), str)
