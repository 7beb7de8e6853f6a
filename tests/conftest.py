"""Shared fixtures for the core suite: a tiny tokenizer, config, model and synthetic dataset.

Everything is small enough for a 2-core CPU: CLIP hidden 32 / 2 layers on 16x16 images with
8x8 patches (4 visual tokens per image), a llama with hidden 32 / 2 layers, and a BPE
tokenizer of at most 300 symbols trained on the synthetic world's texts.

Also the helpers shared by several test modules (import them with ``from conftest import ...``,
never from another test module): the Mini-Gemini config ``mgm_config``, the tiny diffusers
pipeline ``build_tiny_sd``, the scripted answers ``scripted`` / ``ANSWER`` / ``SHOWN``, and the
module-scoped fixtures ``one_thread`` and ``model`` used by the serving tests.
"""

from __future__ import annotations

import copy
import importlib.util
import json
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


def load_script(name: str):
    """Import scripts/NAME.py (not a package) as a module, for tests of its functions."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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


# ----------------------------------------------------------------------------- Mini-Gemini


def mgm_config(hd: bool = False) -> ModelConfig:
    """A tiny random Mini-Gemini: 3x3 LR tokens with M = 4 (HR 48), or HD 5 x 2x2 tokens (HR 64)."""
    lr = 16 if hd else 24  # patch 8: 2x2 or 3x3 tokens per view
    return ModelConfig.model_validate({
        "vision": {"config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                              "num_attention_heads": 2, "image_size": lr, "patch_size": 8},
                   "select_layer": -1},
        "vision_aux": {"timm_name": "convnext_tiny",
                       "config": {"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1]},
                       "image_size": 64 if hd else 48, "image_grid": 2 if hd else 1,
                       "image_global": hd},
        "connector": {"type": "patch_mining"},
        "llm": {"arch": "llama", "config": dict(TINY_LLAMA), "init_std": 0.1},
        "template": "vicuna_v1", "system_prompt": "", "max_length": 256,
    })


# ----------------------------------------------------------------------------- serving


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for the whole module (``pytestmark = usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    """The tiny serving model (``minigem.serving.testing.tiny_checkpoint``), loaded per module."""
    from minigem.checkpoints.native import load_model
    from minigem.serving.testing import tiny_checkpoint

    return load_model(tiny_checkpoint())


# ----------------------------------------------------------------------------- image generation

ANSWER = "Here it is: <h>a green triangle on white</h>"
PROMPT = "a green triangle on white"
SHOWN = "Here it is: a green triangle on white"


def scripted(model, script: str):
    """The model's answers read ``script`` (3 characters per generated token)."""
    model.tokenizer.decode = lambda ids, **kw: script[:3 * len(ids)]
    return model


def build_tiny_sd(root: Path) -> Path:
    """A random StableDiffusionPipeline (UNet/VAE width 8-16, 1-layer CLIP text encoder)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (root / "vocab").mkdir(parents=True)
    (root / "vocab/vocab.json").write_text(json.dumps(vocab))
    (root / "vocab/merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(root / "vocab/vocab.json"), str(root / "vocab/merges.txt"),
                              model_max_length=16)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16, projection_dim=16,
        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
        norm_num_groups=4, attention_head_dim=2)
    vae = AutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "sd")
    return root / "sd"
