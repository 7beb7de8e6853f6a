"""Shared fixtures for the core suite: a tiny tokenizer, config, model and synthetic dataset.

Everything is small enough for a 2-core CPU: CLIP hidden 32 / 2 layers on 16x16 images with
8x8 patches (4 visual tokens per image), a llama with hidden 32 / 2 layers, and a BPE
tokenizer of at most 300 symbols trained on the synthetic world's texts.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from minigem.chat import train_tokenizer
from minigem.config import ModelConfig
from minigem.data.synth import world_texts, write_dataset

TINY_VISION: dict[str, Any] = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "image_size": 16, "patch_size": 8,
}
TINY_LLAMA: dict[str, Any] = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
TOKENS_PER_IMAGE = (16 // 8) ** 2


def tiny_model_dict(**llm: Any) -> dict[str, Any]:
    """The raw mapping of the tiny ModelConfig (the `model:` section of a recipe)."""
    return {
        "vision": {"config": dict(TINY_VISION), "select_layer": -1},
        "connector": {"type": "mlp2x_gelu"},
        "llm": {"arch": "llama", "config": dict(TINY_LLAMA), **llm},
        "template": "vicuna_v1",
        "system_prompt": "",
        "max_length": 256,
    }


@pytest.fixture(scope="session")
def _tiny_tokenizer_session():
    return train_tokenizer(world_texts(), vocab_size=300)


@pytest.fixture
def tiny_tokenizer(_tiny_tokenizer_session):
    """A fresh copy per test (building a model may add special tokens to it)."""
    return copy.deepcopy(_tiny_tokenizer_session)


@pytest.fixture
def tiny_model_config() -> ModelConfig:
    # init_std 0.1: peaked next-token distributions, so greedy decoding has no near-ties.
    return ModelConfig.model_validate(tiny_model_dict(init_std=0.1))


def build_tiny_model(cfg: ModelConfig, tokenizer, seed: int = 0):
    from minigem.model import VisionLanguageModel

    torch.manual_seed(seed)
    return VisionLanguageModel.build(cfg, tokenizer).eval()


@pytest.fixture
def tiny_model(tiny_model_config, tiny_tokenizer):
    return build_tiny_model(tiny_model_config, tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """data.json of 12 synthetic records (96 px images) written by write_dataset. Read-only."""
    return write_dataset(tmp_path_factory.mktemp("tiny-data"), n=12, seed=0, image_size=96)


@pytest.fixture
def tiny_saved_model(tiny_model, tmp_path) -> Path:
    from minigem.checkpoints.native import save_model

    return save_model(tiny_model, tmp_path / "model")


def tiny_recipe(tmp_path: Path, stages: list[dict], name: str = "recipe.yaml",
                **training: Any) -> Path:
    """Write a recipe YAML with the tiny model (tokenizer trained at build time)."""
    model = tiny_model_dict()
    model["tokenizer_train"] = {"corpus": "synth", "vocab_size": 300}
    model["max_length"] = 128
    data = {
        "model": model,
        "training": {"output_dir": str(tmp_path / "run"), "seed": 0, "bf16": "off",
                     "log_every": 1, "save_every": 1000, **training, "stages": stages},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
