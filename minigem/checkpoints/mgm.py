"""Mini-Gemini (MGM, dvlab-research release) checkpoints -> native minigem checkpoints.

``import_mgm(src, dst)`` reads a released MGM directory (config.json with ``model_type``
``mgm`` / ``mgm_gemma`` / ``mgm_mixtral`` plus the host LLM's own fields and the ``mm_*`` /
``image_*`` fields; safetensors, single file or sharded; the tokenizer) and writes a native
checkpoint with a ``patch_mining`` connector and a timm ConvNeXt HR tower.

Weight names:

    MGM                                                   native
    model.embed_tokens / model.layers.* / model.norm      language_model.model.*
    lm_head.*                                             language_model.lm_head.*
    model.mm_projector.{0,2}.*                            connector.projector.{0,2}.*
    model.vlm_uni_{query,aux,val}_projector.{0,1}.*       connector.vlm_uni_{...}_projector.{0,1}.*
    model.vision_tower.vision_tower.vision_model.*        vision_tower.model.*
    model.vision_tower_aux.{vision_stem,vision_stages}.*  vision_tower_aux.{vision_stem,vision_stages}.*

Towers missing from the weights come from ``--vision-tower DIR`` (an HF CLIPVisionModel
directory) and ``--vision-tower-aux PATH`` (a timm / open_clip checkpoint file or directory;
``visual.trunk.`` is handled by convnext.py). The ConvNeXt size (dims, depths) is read from
the weight shapes, so any timm ConvNeXt converts.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from minigem.checkpoints import hf_llava, moe_llava
from minigem.checkpoints.native import (
    check_destination,
    hf_config_values,
    load_state,
    read_foreign_config,
    save_model,
)
from minigem.config import ModelConfig, validate
from minigem.errors import CheckpointError

log = logging.getLogger(__name__)

HOSTS = {"mgm": "llama", "mgm_gemma": "gemma", "mgm_mixtral": "mixtral"}  # model_type -> HF arch
TEMPLATES = {"mgm": "vicuna_v1", "mgm_gemma": "gemma", "mgm_mixtral": "mistral_instruct"}
_SKIP_FIELDS = moe_llava._SKIP_FIELDS
_MINING = ("vlm_uni_query_projector", "vlm_uni_aux_projector", "vlm_uni_val_projector")
_CONVNEXT_NAMES = ("convnext_xxlarge", "convnext_xlarge", "convnext_large", "convnext_base",
                   "convnext_small", "convnext_tiny", "convnext_nano", "convnext_pico",
                   "convnext_femto", "convnext_atto")


# ----------------------------------------------------------------------------- config


def read_release_config(src: Path) -> tuple[dict[str, Any], str]:
    """config.json -> (raw dict, HF arch of the host LLM), with format checks."""
    raw = read_foreign_config(src)
    mt = raw.get("model_type")
    if mt not in HOSTS:
        raise CheckpointError(
            f"{src}/config.json: model_type {mt!r} is not a Mini-Gemini model minigem can convert "
            f"(valid: {', '.join(HOSTS)})"
        )
    moe_llava.refuse_image_tokens(raw, src)
    return raw, HOSTS[mt]


def host_config(raw: dict[str, Any], arch: str, where: str):
    from transformers import AutoConfig

    known = set(AutoConfig.for_model(arch).to_dict()) | {"rope_theta"}
    values = {k: v for k, v in raw.items() if k in known and k not in _SKIP_FIELDS
              and not k.startswith(("mm_", "image_"))}
    return moe_llava.build_host_config(arch, values, raw, where)


# ----------------------------------------------------------------------------- weights


def to_native_key(key: str) -> str | None:
    """A release weight name -> ours; None for names that are not part of the model."""
    if key.endswith("rotary_emb.inv_freq"):
        return None
    if key.startswith("model.vision_tower.vision_tower."):
        rest = key[len("model.vision_tower.vision_tower."):].removeprefix("vision_model.")
        return "vision_tower.model." + rest
    if key.startswith("model.vision_tower_aux."):
        from minigem.vision.convnext import mgm_aux_key_to_timm, timm_key_to_mgm

        try:
            return "vision_tower_aux." + timm_key_to_mgm(mgm_aux_key_to_timm(key))
        except KeyError:
            return key  # reported as unexpected
    if key.startswith("model.mm_projector."):
        rest = key[len("model.mm_projector."):]
        if rest in ("weight", "bias"):
            return f"connector.projector.0.{rest}"
        return "connector.projector." + rest
    for name in _MINING:
        if key.startswith(f"model.{name}."):
            return "connector." + key[len("model."):]
    if key.startswith("lm_head."):
        return "language_model." + key
    if key.startswith("model."):
        return "language_model." + key
    return key  # unknown: reported as unexpected


def map_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, val in weights.items():
        ours = to_native_key(key)
        if ours is not None:
            out[ours] = val
    return out


def split_prefix(native: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    keys = [k for k in native if k.startswith(prefix)]
    return {k[len(prefix):]: native.pop(k) for k in keys}


def read_hr_weights(path: Path) -> dict[str, torch.Tensor]:
    """A timm / open_clip / MGM ConvNeXt checkpoint (file or dir) -> HRTower names."""
    from minigem.vision.convnext import _read_state_dict, _to_tower_keys

    state = _to_tower_keys(_read_state_dict(Path(path)))
    if not state:
        raise CheckpointError(f"--vision-tower-aux: {path} holds no ConvNeXt trunk keys "
                              "(stem.*/stages.*, visual.trunk.*, vision_stem.*/vision_stages.*)")
    return state


def infer_convnext(hr: dict[str, torch.Tensor], name: str | None, where: str) -> tuple[str, dict[str, Any]]:
    """(timm name, create_model kwargs) from the HR tower weight shapes."""
    dims, depths = [], []
    for s in range(4):
        blocks = {int(m.group(1)) for k in hr if (m := re.match(rf"vision_stages\.{s}\.blocks\.(\d+)\.", k))}
        w = hr.get(f"vision_stages.{s}.blocks.0.conv_dw.weight")
        if not blocks or w is None:
            raise CheckpointError(f"{where}: the HR tower weights lack stage {s} (vision_stages.{s}.blocks.0.conv_dw)")
        dims.append(int(w.shape[0]))
        depths.append(max(blocks) + 1)
    timm_name = next((n for n in _CONVNEXT_NAMES if isinstance(name, str) and n in name), "convnext_large")
    return timm_name, {"dims": dims, "depths": depths}


# ----------------------------------------------------------------------------- import


def choose_template(raw: dict[str, Any], hf, tokenizer) -> str:
    if tokenizer.bos_token == "<|begin_of_text|>":  # a Llama-3 tokenizer (MGM-8B)
        return "llama_3"
    return TEMPLATES[raw["model_type"]]


def native_config(raw: dict[str, Any], hf, vision: dict[str, Any], aux_name: str,
                  aux_kwargs: dict[str, Any], template: str, where: str) -> ModelConfig:
    text = hf_config_values(hf)
    arch = text.pop("model_type")
    proj = raw.get("mm_projector_type", "mlp2x_gelu")
    if proj not in ("linear", "mlp2x_gelu"):
        raise CheckpointError(f"{where}: mm_projector_type {proj!r} is not supported (linear, mlp2x_gelu)")
    feature = raw.get("mm_vision_select_feature", "patch")
    if feature != "patch":
        raise CheckpointError(f"{where}: mm_vision_select_feature {feature!r}: patch mining needs `patch`")
    mm_hidden = raw.get("mm_hidden_size")
    if mm_hidden is not None and mm_hidden != vision.get("hidden_size"):
        raise CheckpointError(f"{where}: mm_hidden_size {mm_hidden} does not match the vision tower's "
                              f"hidden size {vision.get('hidden_size')}")
    channels = sum(aux_kwargs["dims"])
    mm_aux = raw.get("mm_hidden_size_aux")
    if mm_aux is not None and mm_aux != channels:
        raise CheckpointError(
            f"{where}: mm_hidden_size_aux {mm_aux} does not match the HR tower's channels {channels} "
            f"(dims {aux_kwargs['dims']})"
        )
    aspect = raw.get("image_aspect_ratio", "pad")
    if aspect != "pad":
        log.warning("%s: image_aspect_ratio %r is processed as `pad`", where, aspect)
    return validate(ModelConfig, {
        "vision": {"config": vision, "select_layer": raw.get("mm_vision_select_layer", -2),
                   "select_feature": "patch", "image_aspect": "pad"},
        "vision_aux": {"type": "convnext", "timm_name": aux_name, "config": aux_kwargs,
                       "image_size": raw.get("image_size_aux", 768),
                       "image_grid": raw.get("image_grid", 1),
                       "image_global": bool(raw.get("image_global", False))},
        "connector": {"type": "patch_mining", "projector": proj},
        "llm": {"arch": arch, "config": text},
        "template": template,
        "max_length": raw.get("tokenizer_model_max_length") or 2048,
    }, f"the converted {where}")


def import_mgm(src: str | Path, dst: str | Path, vision_tower: str | Path | None = None,
               vision_tower_aux: str | Path | None = None, template: str | None = None) -> Path:
    """Convert a Mini-Gemini release directory into a native checkpoint; returns `dst`."""
    from transformers import AutoTokenizer

    from minigem.chat import get_template
    from minigem.model import VisionLanguageModel

    src, dst = Path(src), Path(dst)
    where = f"{src}/config.json"
    raw, arch = read_release_config(src)
    check_destination(src, dst)
    if template is not None:
        get_template(template)
    hf = host_config(raw, arch, where)
    native = map_weights(hf_llava.read_weights(src))
    missing = [n for n in _MINING if not any(k.startswith(f"connector.{n}.") for k in native)]
    if missing:
        raise CheckpointError(
            f"{src}: the checkpoint holds no patch-mining weights ({', '.join(f'model.{n}' for n in missing)} "
            "missing): a stage-1 projector-only or plain LLaVA checkpoint cannot be converted as MGM"
        )
    lr = split_prefix(native, "vision_tower.model.")
    vision, lr = moe_llava.resolve_tower(raw, lr, Path(vision_tower) if vision_tower else None, where)
    lr = {k.removeprefix("vision_model."): v for k, v in lr.items()}
    hr = split_prefix(native, "vision_tower_aux.")
    if vision_tower_aux is not None:
        if hr:
            log.info("using the checkpoint's HR tower weights, not %s", vision_tower_aux)
        else:
            hr = read_hr_weights(Path(vision_tower_aux))
    if not hr:
        aux = raw.get("mm_vision_tower_aux")
        if isinstance(aux, str) and Path(aux).exists():
            hr = read_hr_weights(Path(aux))
        else:
            raise CheckpointError(
                f"{where}: the checkpoint holds no HR tower weights and mm_vision_tower_aux {aux!r} is "
                "not a local path: pass --vision-tower-aux PATH (a timm/open_clip ConvNeXt checkpoint)"
            )
    aux_name, aux_kwargs = infer_convnext(hr, raw.get("mm_vision_tower_aux"), where)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, config=hf)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{src}: cannot load the tokenizer: {err}") from None
    if template is None:
        template = choose_template(raw, hf, tokenizer)
    cfg = native_config(raw, hf, vision, aux_name, aux_kwargs, template, where)
    model = VisionLanguageModel.build(cfg, tokenizer)
    native.update({f"vision_tower.model.{k}": v for k, v in lr.items()})
    native.update({f"vision_tower_aux.{k}": v for k, v in hr.items()})
    moe_llava.pad_vocab(model, native)
    load_state(model, native, str(src))
    model.eval()
    save_model(model, dst, extra={"converted_from": "mgm"})
    return dst
