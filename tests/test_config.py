"""Configs: YAML recipes, dotted overrides, errors that name the key's path, the registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import tiny_model_dict

from minigem.config import (
    ModelConfig,
    RecipeConfig,
    StageConfig,
    apply_override,
    dump_yaml,
    load_recipe,
    validate,
)
from minigem.errors import ConfigError
from minigem.registry import Registry, RegistryError

REPO = Path(__file__).resolve().parent.parent
TINY_SHAPES = REPO / "recipes" / "tiny-shapes.yaml"


def _stage(**kw) -> dict:
    return {"name": "instruct", "train": ["connector"], "data": {"synth": {"n": 4}}, "steps": 2, **kw}


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _recipe(**training) -> dict:
    return {"model": tiny_model_dict(), "training": {"stages": [_stage()], **training}}


def test_bundled_recipe_loads():
    r = load_recipe(TINY_SHAPES)
    assert [s.name for s in r.training.stages] == ["contrastive", "instruct", "polish"]
    assert r.training.stages[0].kind == "contrastive"
    assert r.training.stages[2].train == ["vision", "connector", "llm"]
    assert r.training.stages[2].data.synth.mix["gen_context"] == 0.25
    assert r.training.stages[1].adam_beta2 == 0.95 and r.model.connector.pool == 2
    assert r.model.llm.config["initializer_range"] == 0.07
    assert r.model.llm.arch == "llama" and r.model.llm.config["hidden_size"] == 192
    assert r.model.tokenizer_train.vocab_size == 512


def test_yaml_round_trip(tmp_path):
    r = load_recipe(TINY_SHAPES)
    again = load_recipe(_write(tmp_path, yaml.safe_load(dump_yaml(r))))
    assert again == r


def test_overrides_by_index_by_name_and_nested():
    r = load_recipe(TINY_SHAPES, [
        "training.stages.instruct.lr=1e-4",
        "training.stages.0.batch_size=3",
        "model.llm.config.num_hidden_layers=2",
        "training.seed=7",
        "training.stages.contrastive.data.synth.seed=11",
    ])
    assert r.training.stages[1].lr == pytest.approx(1e-4)
    assert r.training.stages[0].batch_size == 3
    assert r.model.llm.config["num_hidden_layers"] == 2
    assert r.model.llm.config["hidden_size"] == 192  # siblings untouched
    assert r.training.seed == 7
    assert r.training.stages[0].data.synth.seed == 11
    # the rest keeps its values
    assert r.training.stages[0].lr == pytest.approx(1e-3)
    assert r.training.stages[1].batch_size == 32
    assert r.training.stages[1].data.synth.seed == 3


def test_override_creates_missing_sections():
    data = _recipe()
    apply_override(data, "model.moe.num_experts=8")
    r = validate(RecipeConfig, data)
    assert r.model.moe is not None and r.model.moe.num_experts == 8


def test_override_values_are_yaml_typed():
    data = _recipe()
    apply_override(data, "training.stages.0.train=[connector, llm]")
    apply_override(data, "model.llm.config.tie_word_embeddings=true")
    r = validate(RecipeConfig, data)
    assert r.training.stages[0].train == ["connector", "llm"]
    assert r.model.llm.config["tie_word_embeddings"] is True


@pytest.mark.parametrize("override, message", [
    ("training.stages.nope.lr=1",
     "override training.stages.nope: no list element named 'nope'; "
     "names: ['contrastive', 'instruct', 'polish']"),
    ("training.stages.5.lr=1", "override training.stages.5: index 5 out of range (len 3)"),
    ("noequals", "override 'noequals': expected KEY=VALUE (e.g. training.seed=1)"),
    ("training.seed.x=1", "override training.seed.x: training.seed is not a mapping"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError) as err:
        load_recipe(TINY_SHAPES, [override])
    assert str(err.value) == message


def test_unknown_key_names_full_path():
    with pytest.raises(ConfigError) as err:
        load_recipe(TINY_SHAPES, ["model.llm.colour=1"])
    assert str(err.value) == f"{TINY_SHAPES}: invalid config\n  model.llm.colour: unknown key"


def test_unknown_key_in_a_stage(tmp_path):
    data = _recipe()
    data["training"]["stages"][0]["learning_rate"] = 1e-3
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert str(err.value) == f"{path}: invalid config\n  training.stages.0.learning_rate: unknown key"


def test_wrong_type_names_path():
    with pytest.raises(ConfigError) as err:
        load_recipe(TINY_SHAPES, ["training.stages.instruct.lr=fast"])
    assert str(err.value) == (
        f"{TINY_SHAPES}: invalid config\n"
        "  training.stages.1.lr: Input should be a valid number, unable to parse string as a number"
    )


def test_bad_literal_names_path():
    with pytest.raises(ConfigError) as err:
        load_recipe(TINY_SHAPES, ["training.stages.0.train=[vision, eyes]"])
    msg = str(err.value)
    assert msg.startswith(f"{TINY_SHAPES}: invalid config\n  training.stages.0.train.1: Input should be ")
    assert "'connector'" in msg


def test_steps_and_epochs_are_exclusive():
    with pytest.raises(ConfigError) as err:
        load_recipe(TINY_SHAPES, ["training.stages.instruct.epochs=1"])
    assert str(err.value) == (
        f"{TINY_SHAPES}: invalid config\n"
        "  training.stages.1: Value error, set exactly one of `steps` or `epochs`"
    )
    with pytest.raises(ConfigError, match="set exactly one of `steps` or `epochs`"):
        validate(StageConfig, {k: v for k, v in _stage().items() if k != "steps"})
    assert validate(StageConfig, {**_stage(steps=None), "epochs": 0.5}).epochs == 0.5


def test_data_source_exclusive():
    with pytest.raises(ConfigError) as err:
        validate(StageConfig, _stage(data={"path": "x.json", "synth": {"n": 3}}), "stage")
    assert str(err.value) == (
        "stage: invalid config\n  data: Value error, set exactly one of `path` (LLaVA JSON) or `synth`"
    )


def test_llm_needs_a_source():
    d = tiny_model_dict()
    del d["llm"]["arch"]
    with pytest.raises(ConfigError) as err:
        validate(ModelConfig, d, "m")
    assert str(err.value) == (
        "m: invalid config\n  llm: Value error, set `path` (a local model directory) or `arch` (an HF model_type)"
    )


def test_missing_and_bad_recipe_files(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as err:
        load_recipe(missing)
    assert str(err.value) == f"{missing}: no such recipe file"
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(bad)
    assert str(err.value) == f"{bad}: expected a mapping at the top level"
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"^{broken}: not valid YAML: "):
        load_recipe(broken)


def test_empty_stage_list_fails():
    data = _recipe()
    data["training"]["stages"] = []
    with pytest.raises(ConfigError, match=r"training\.stages: List should have at least 1 item"):
        validate(RecipeConfig, data)


# ----------------------------------------------------------------------- HF config keys


def test_unknown_llm_config_key_fails_at_build(tiny_tokenizer):
    from minigem.model import VisionLanguageModel

    d = tiny_model_dict()
    d["llm"]["config"]["hidden_sise"] = 32
    cfg = validate(ModelConfig, d)  # free-form HF kwargs: accepted at load...
    with pytest.raises(ConfigError) as err:  # ...and rejected when the HF config is built
        VisionLanguageModel.build(cfg, tiny_tokenizer)
    assert str(err.value) == "model.llm.config: unknown LlamaConfig keys: hidden_sise"


def test_unknown_vision_config_key_fails_at_build(tiny_tokenizer):
    from minigem.model import VisionLanguageModel

    d = tiny_model_dict()
    d["vision"]["config"]["patch_sz"] = 4
    d["vision"]["config"]["layers"] = 1
    with pytest.raises(ConfigError) as err:
        VisionLanguageModel.build(validate(ModelConfig, d), tiny_tokenizer)
    assert str(err.value) == "model.vision.config: unknown CLIPVisionConfig keys: layers, patch_sz"


def test_unknown_llm_arch_fails_at_build(tiny_tokenizer):
    from minigem.model import VisionLanguageModel

    d = tiny_model_dict()
    d["llm"]["arch"] = "llamma"
    with pytest.raises(ConfigError) as err:
        VisionLanguageModel.build(validate(ModelConfig, d), tiny_tokenizer)
    assert str(err.value) == "model.llm.arch: unknown HF model_type 'llamma'"


def test_bad_select_layer_fails_at_build(tiny_tokenizer):
    from minigem.model import VisionLanguageModel

    d = tiny_model_dict()
    d["vision"]["select_layer"] = 5
    with pytest.raises(ConfigError) as err:
        VisionLanguageModel.build(validate(ModelConfig, d), tiny_tokenizer)
    assert str(err.value) == "model.vision.select_layer=5: the tower has 2 layers (valid: -3..2)"


def test_unknown_template_fails(tiny_tokenizer):
    from minigem.model import VisionLanguageModel

    d = tiny_model_dict()
    d["template"] = "vicuna"
    with pytest.raises(ConfigError, match=r"^unknown chat template 'vicuna'; valid: .*vicuna_v1"):
        VisionLanguageModel.build(validate(ModelConfig, d), tiny_tokenizer)


# ----------------------------------------------------------------------- registry


def test_registry_register_get_and_list():
    reg: Registry[type] = Registry("widget")
    reg.register("b")(int)
    reg.register("a")(str)
    assert reg.get("a") is str and reg.get("b") is int
    assert reg.keys() == ["a", "b"] and list(reg) == ["a", "b"]
    assert "a" in reg and "c" not in reg


def test_registry_duplicate_is_an_error():
    reg: Registry[type] = Registry("widget")
    reg.register("a")(int)
    with pytest.raises(RegistryError) as err:
        reg.register("a")(str)
    assert str(err.value) == "widget 'a' is already registered"
    assert reg.get("a") is int  # the first registration stands


def test_registry_unknown_lists_valid_keys():
    reg: Registry[type] = Registry("widget")
    with pytest.raises(RegistryError) as err:
        reg.get("x")
    assert str(err.value) == "unknown widget 'x'; valid: (none)"
    reg.register("b")(int)
    reg.register("a")(str)
    with pytest.raises(RegistryError) as err:
        reg.get("A")  # exact keys: no case folding
    assert str(err.value) == "unknown widget 'A'; valid: a, b"


def test_connector_registry_unknown():
    from minigem.connectors import CONNECTORS

    assert {"linear", "mlp2x_gelu"} <= set(CONNECTORS.keys())
    with pytest.raises(RegistryError, match=r"^unknown connector 'qformerx'; valid: .*mlp2x_gelu"):
        CONNECTORS.get("qformerx")


def test_llm_head_counts_checked_at_build(tiny_tokenizer):
    """6 query heads over 4 KV heads fails inside HF's first forward; we name it at build time."""
    from conftest import build_tiny_model

    d = tiny_model_dict()
    d["llm"]["config"].update(num_attention_heads=4, num_key_value_heads=3, hidden_size=48)
    with pytest.raises(ConfigError, match="num_attention_heads=4 must be a multiple of num_key_value_heads=3"):
        build_tiny_model(ModelConfig.model_validate(d), tiny_tokenizer)
