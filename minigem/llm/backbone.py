"""The language model: any HF causal LM, built from a config or loaded from a local directory."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from minigem.config import LLMConfig
from minigem.errors import CheckpointError, ConfigError


def llm_hf_config(cfg: LLMConfig) -> PretrainedConfig:
    """The HF config for `cfg`: a local directory's, or one built for `arch`, plus overrides."""
    values = dict(cfg.config)
    if cfg.path is not None:
        path = Path(cfg.path)
        if not (path / "config.json").is_file():
            raise CheckpointError(f"model.llm.path: {path} is not a model directory (no config.json)")
        hf = AutoConfig.from_pretrained(path)
        _check_keys(hf, values)
        for k, v in values.items():
            setattr(hf, k, v)
        return hf
    arch = cfg.arch or values.pop("model_type")
    values.pop("model_type", None)
    try:
        default = AutoConfig.for_model(arch)
    except ValueError:
        raise ConfigError(f"model.llm.arch: unknown HF model_type {arch!r}") from None
    _check_keys(default, values)
    return AutoConfig.for_model(arch, **values)


def _check_keys(hf: PretrainedConfig, values: dict) -> None:
    unknown = [k for k in values if not hasattr(hf, k)]
    if unknown:
        raise ConfigError(
            f"model.llm.config: unknown {type(hf).__name__} keys: {', '.join(sorted(unknown))}"
        )


def _check_heads(hf: PretrainedConfig) -> None:
    """Attention shapes HF only rejects deep inside the first forward, named up front."""
    heads = getattr(hf, "num_attention_heads", None)
    kv = getattr(hf, "num_key_value_heads", None)
    width = getattr(hf, "hidden_size", None)
    if not isinstance(heads, int) or heads <= 0:
        return
    if isinstance(kv, int) and (kv <= 0 or heads % kv):
        raise ConfigError(
            f"model.llm.config: num_attention_heads={heads} must be a multiple of "
            f"num_key_value_heads={kv}"
        )
    if isinstance(width, int) and getattr(hf, "head_dim", None) is None and width % heads:
        raise ConfigError(
            f"model.llm.config: hidden_size={width} must be divisible by num_attention_heads={heads}"
        )


def build_llm(cfg: LLMConfig, vocab_size: int | None = None) -> PreTrainedModel:
    """Build (random init) or load the causal LM; grow the vocabulary to `vocab_size` if needed."""
    hf = llm_hf_config(cfg)
    _check_heads(hf)
    if cfg.path is not None:
        model = AutoModelForCausalLM.from_pretrained(cfg.path, config=hf, dtype=torch.float32)
    else:
        if vocab_size is not None and "vocab_size" not in cfg.config:
            hf.vocab_size = vocab_size  # an explicit (e.g. padded, 32064) vocab is kept; grown below
        model = AutoModelForCausalLM.from_config(hf, dtype=torch.float32)
        if cfg.init_std is not None:
            _reinit(model, cfg.init_std)
    if vocab_size is not None and model.get_input_embeddings().num_embeddings < vocab_size:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    return model


def _reinit(model: torch.nn.Module, std: float) -> None:
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear | torch.nn.Embedding):
            torch.nn.init.normal_(mod.weight, std=std)
            if getattr(mod, "bias", None) is not None:
                torch.nn.init.zeros_(mod.bias)


def cache_kwarg(lm: torch.nn.Module) -> str:
    """The name of the KV-cache argument of ``lm.forward``: ``cache`` from transformers 5.24
    (``past_key_values`` is deprecated there and goes in 5.40), ``past_key_values`` before."""
    return _cache_kwarg(type(lm))


@functools.cache
def _cache_kwarg(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def output_cache(out: object) -> object | None:
    """The KV cache an HF model output carries, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def enable_checkpointing(lm: PreTrainedModel) -> None:
    """Activation (gradient) checkpointing, non-reentrant, under the name this transformers has
    (``activation_checkpointing_enable`` from 5.24, ``gradient_checkpointing_enable`` before)."""
    enable = getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable
    enable({"use_reentrant": False})
