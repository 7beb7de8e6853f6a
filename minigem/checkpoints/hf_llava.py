"""HF LLaVA (`LlavaForConditionalGeneration`) checkpoints <-> native minigem checkpoints.

``import_hf_llava(src, dst)`` reads an HF LLaVA directory (config.json with
``model_type: llava``, safetensors single-file or sharded, tokenizer, chat template,
preprocessor config) and writes a native checkpoint. ``export_hf_llava(src, dst)`` writes
the directory transformers, vLLM, SGLang and lmms-eval load without extra code.

Weight names (``{p}`` = the causal LM's base prefix, ``model`` for Llama/Qwen/Mistral...):

    HF (transformers >= 4.52 in memory)  HF (released / legacy)           native
    model.vision_tower.*                 vision_tower[.vision_model].*    vision_tower.model.*
    model.multi_modal_projector.linear_1 multi_modal_projector.linear_1   connector.projector.0
    model.multi_modal_projector.linear_2 multi_modal_projector.linear_2   connector.projector.2
    model.language_model.*               language_model.{p}.*             language_model.{p}.*
    lm_head.weight                       language_model.lm_head.weight    language_model.lm_head.weight

Import accepts every column; export writes the released layout (what llava-hf checkpoints ship).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from minigem.checkpoints.native import (
    atomic_dir,
    check_destination,
    hf_config_values,
    load_model,
    load_state,
    read_foreign_config,
    read_json,
    save_model,
    state_dict_for_save,
)
from minigem.config import ModelConfig, validate
from minigem.errors import CheckpointError, ConfigError, DataError

log = logging.getLogger(__name__)

_PROJ_HF = ("linear_1", "linear_2")  # HF projector layers, in order
_PROJ_OURS = ("0", "2")  # nn.Sequential indices of Linear, GELU, Linear
_STRATEGY = {"default": "patch", "full": "cls_patch"}  # HF vision_feature_select_strategy -> ours
_PROBE = "minigem-probe-text"


# ----------------------------------------------------------------------------- key mapping


def to_native_key(key: str, lm_prefix: str = "model") -> str | None:
    """An HF LLaVA weight name (any layout) -> ours, or None when it is not a LLaVA weight."""
    for head in ("model.", ""):
        if key.startswith(head + "vision_tower."):
            rest = key[len(head + "vision_tower."):]
            rest = rest.removeprefix("vision_model.")  # CLIPVisionModel's old inner prefix
            return "vision_tower.model." + rest
        if key.startswith(head + "multi_modal_projector."):
            layer, _, rest = key[len(head + "multi_modal_projector."):].partition(".")
            if layer not in _PROJ_HF:
                return None
            return f"connector.projector.{_PROJ_OURS[_PROJ_HF.index(layer)]}.{rest}"
    if key.startswith("model.language_model."):  # transformers >= 4.52: the base model
        return f"language_model.{lm_prefix}." + key[len("model.language_model."):]
    if key.startswith("lm_head."):
        return "language_model." + key
    if key.startswith("language_model."):  # released layout: the whole causal LM
        return key
    return None


def to_hf_key(key: str) -> str:
    """A native weight name -> the released HF LLaVA layout."""
    if key.startswith("vision_tower.model."):
        rest = key[len("vision_tower.model."):].removeprefix("vision_model.")
        return "vision_tower.vision_model." + rest
    if key.startswith("connector.projector."):
        idx, _, rest = key[len("connector.projector."):].partition(".")
        return f"multi_modal_projector.{_PROJ_HF[_PROJ_OURS.index(idx)]}.{rest}"
    if key.startswith("language_model."):
        return key
    raise CheckpointError(f"weight {key!r} has no place in an HF LLaVA checkpoint")


# ----------------------------------------------------------------------------- reading


def read_llava_config(src: Path):
    """config.json -> a validated transformers LlavaConfig (only what minigem can hold)."""
    from transformers import LlavaConfig

    raw = read_foreign_config(src)
    if raw.get("model_type") != "llava":
        raise CheckpointError(
            f"{src}/config.json: model_type is {raw.get('model_type')!r}, expected 'llava' "
            "(an HF LlavaForConditionalGeneration checkpoint)"
        )
    try:
        hf = LlavaConfig.from_dict(raw)
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{src}/config.json: not a valid LlavaConfig: {err}") from None
    where = f"{src}/config.json"
    if hf.vision_config.model_type != "clip_vision_model":
        raise CheckpointError(
            f"{where}: vision_config.model_type {hf.vision_config.model_type!r} is not supported "
            "(minigem's LLaVA tower is a CLIP ViT: 'clip_vision_model')"
        )
    if hf.projector_hidden_act != "gelu":
        raise CheckpointError(
            f"{where}: projector_hidden_act {hf.projector_hidden_act!r} is not supported "
            "(minigem's mlp2x_gelu projector uses exact 'gelu')"
        )
    if not isinstance(hf.vision_feature_layer, int):
        raise CheckpointError(
            f"{where}: vision_feature_layer {hf.vision_feature_layer} selects several layers; "
            "minigem's CLIP tower takes one layer (an int)"
        )
    if hf.vision_feature_select_strategy not in _STRATEGY:
        raise CheckpointError(
            f"{where}: vision_feature_select_strategy {hf.vision_feature_select_strategy!r} "
            f"is not one of {sorted(_STRATEGY)}"
        )
    return hf


def read_weights(src: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards listed in model.safetensors.index.json."""
    single, index = src / "model.safetensors", src / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map")
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not (src / shard).is_file():
                raise CheckpointError(f"{index}: shard {shard} is missing from {src}")
            out.update(load_file(str(src / shard)))
        return out
    if (src / "pytorch_model.bin").is_file() or (src / "pytorch_model.bin.index.json").is_file():
        raise CheckpointError(
            f"{src}: only safetensors weights are read (re-save with "
            "LlavaForConditionalGeneration.from_pretrained(...).save_pretrained(...))"
        )
    raise CheckpointError(f"{src}: no model.safetensors or model.safetensors.index.json")


def read_chat_template(src: Path, tokenizer) -> str | None:
    """The checkpoint's own chat template: chat_template.json > .jinja > the tokenizer's."""
    if (src / "chat_template.json").is_file():
        source = read_json(src / "chat_template.json").get("chat_template")
    elif (src / "chat_template.jinja").is_file():
        source = (src / "chat_template.jinja").read_text()
    else:
        source = tokenizer.chat_template  # may be None, a string or {name: template}
    if isinstance(source, dict):
        source = source.get("default")
    return source if isinstance(source, str) and source.strip() else None


def read_image_settings(src: Path, image_size: int) -> dict[str, Any]:
    """preprocessor_config.json -> VisionConfig fields (mean, std, aspect).

    LLaVA ``pad`` (LlavaImageProcessor ``do_pad``) and a plain resize to height x width
    (``square``) are reproduced exactly. HF's default resize-shortest-edge + centre crop has
    no native equivalent: it maps to ``pad``, the way LLaVA-1.5 was trained (square images
    give the same pixels either way).
    """
    path = src / "preprocessor_config.json"
    if not path.is_file():
        log.warning("%s: no preprocessor_config.json; using CLIP mean/std and `pad`", src)
        return {}
    pp = read_json(path)
    out: dict[str, Any] = {}
    for key in ("image_mean", "image_std"):
        val = pp.get(key)
        if isinstance(val, int | float):
            val = [val] * 3
        if val is not None:
            if len(val) != 3:
                raise CheckpointError(f"{path}: {key} must have 3 values, got {val}")
            out[key] = tuple(float(v) for v in val)
    size = pp.get("size") or {}
    crop = pp.get("crop_size") or {}
    square = isinstance(size, dict) and "height" in size and not pp.get("do_center_crop", False)
    out["image_aspect"] = "square" if square and not pp.get("do_pad") else "pad"
    side = (size.get("height") if square else crop.get("height") if isinstance(crop, dict) else crop)
    if side is not None and side != image_size:
        log.warning("%s: images are processed at %s px but the tower takes %s px; using %s",
                    path, side, image_size, image_size)
    return out


# ----------------------------------------------------------------------------- import


def native_config(hf, tokenizer, template: str, image: dict[str, Any]) -> ModelConfig:
    """The native ModelConfig holding an HF LlavaConfig."""
    vision = hf_config_values(hf.vision_config)
    vision.pop("model_type", None)
    text = hf_config_values(hf.text_config)
    arch = text.pop("model_type")
    text["tie_word_embeddings"] = bool(hf.tie_word_embeddings or hf.text_config.tie_word_embeddings)
    image_token = tokenizer.convert_ids_to_tokens(hf.image_token_index)
    if image_token is None or hf.image_token_index == tokenizer.unk_token_id:
        raise CheckpointError(
            f"image_token_index {hf.image_token_index} is not a token of the checkpoint's tokenizer"
        )
    return validate(ModelConfig, {
        "vision": {"config": vision, "select_layer": hf.vision_feature_layer,
                   "select_feature": _STRATEGY[hf.vision_feature_select_strategy], **image},
        "connector": {"type": "mlp2x_gelu"},
        "llm": {"arch": arch, "config": text},
        "template": template,
        "image_token": image_token,
    }, "the converted HF LLaVA config")


def map_weights(weights: dict[str, torch.Tensor], lm_prefix: str, bias: bool,
                llm_dim: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF tensors -> (native tensors, HF names that have no native place)."""
    out, foreign = {}, []
    for key, val in weights.items():
        ours = to_native_key(key, lm_prefix)
        if ours is None:
            foreign.append(key)
        else:
            out[ours] = val
    if not bias:  # multimodal_projector_bias=False: our Linear layers hold zero biases
        for idx in _PROJ_OURS:
            out[f"connector.projector.{idx}.bias"] = torch.zeros(llm_dim)
    return out, foreign


def _check_template(model) -> None:
    """Warn when the checkpoint's chat template cannot render plain-string messages."""
    from minigem.data.records import Message

    msgs = [Message("user", f"{model.config.image_token}\n{_PROBE}")]
    try:
        text = model.template.render_text(msgs, add_generation_prompt=True, tokenizer=model.tokenizer)
    except (ConfigError, DataError) as err:
        text, why = "", str(err)
    else:
        why = "the user's text is missing from its rendering"
    if _PROBE not in text:
        log.warning(
            "the checkpoint's chat_template does not work with minigem's string messages (%s); "
            "`minigem chat` prompts will be wrong until the template is replaced", why)


def import_hf_llava(src: str | Path, dst: str | Path) -> Path:
    """Convert an HF LlavaForConditionalGeneration directory into a native checkpoint."""
    from transformers import AutoTokenizer

    from minigem.model import VisionLanguageModel

    src, dst = Path(src), Path(dst)
    hf = read_llava_config(src)
    check_destination(src, dst)
    weights = read_weights(src)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{src}: cannot load the tokenizer: {err}") from None
    if len(tokenizer) > hf.text_config.vocab_size:
        raise CheckpointError(
            f"{src}: the tokenizer has {len(tokenizer)} tokens but text_config.vocab_size is "
            f"{hf.text_config.vocab_size}"
        )
    chat_template = read_chat_template(src, tokenizer)
    if chat_template is None:
        log.warning("%s: no chat template; using LLaVA-1.5's vicuna_v1", src)
        template = "vicuna_v1"
    else:
        tokenizer.chat_template = chat_template
        template = "jinja"
    cfg = native_config(hf, tokenizer, template, read_image_settings(src, hf.vision_config.image_size))
    model = VisionLanguageModel.build(cfg, tokenizer)
    lm_prefix = model.language_model.base_model_prefix
    native, foreign = map_weights(weights, lm_prefix, hf.multimodal_projector_bias,
                                  hf.text_config.hidden_size)
    if foreign:
        raise CheckpointError(
            f"{src}: weights do not match an HF LLaVA model.\n"
            f"  unexpected ({len(foreign)}): {', '.join(foreign[:12])}{' ...' if len(foreign) > 12 else ''}"
        )
    load_state(model, native, str(src))
    model.eval()
    if template == "jinja":
        _check_template(model)
    save_model(model, dst, extra={"converted_from": "hf-llava"})
    return dst


# ----------------------------------------------------------------------------- export


def _check_exportable(model) -> None:
    cfg = model.config
    problems = []
    if cfg.connector.type != "mlp2x_gelu":
        problems.append(f"connector {cfg.connector.type!r} (HF LLaVA has only the mlp2x_gelu projector)")
    if cfg.connector.pool != 1:
        problems.append(f"token pooling (connector.pool={cfg.connector.pool}; HF LLaVA has none)")
    if cfg.connector.pos_embed:
        problems.append("a visual position embedding (connector.pos_embed; HF LLaVA has none)")
    if cfg.vision_aux is not None:
        problems.append("a high-res tower (vision_aux)")
    if cfg.moe is not None:
        problems.append("MoE FFNs")
    if cfg.ffn_widen is not None:
        problems.append("widened FFNs (model.ffn_widen)")
    if model.language_model.base_model_prefix != "model":
        problems.append(f"LLM {model.language_model.config.model_type!r} (its weights are not under `model.`)")
    if problems:
        raise CheckpointError("cannot export to hf-llava: the model has " + "; ".join(problems))


def chat_template_source(model) -> str:
    """The model's template as an HF chat_template string."""
    if model.config.template == "jinja":
        source = model.tokenizer.chat_template
        if isinstance(source, dict):
            source = source.get("default")
        if not source:
            raise CheckpointError("the model uses the 'jinja' template but its tokenizer has none")
        return source
    tpl = model.template
    if model.config.system_prompt is not None:
        tpl = replace(tpl, default_system=model.config.system_prompt)
    return tpl.to_jinja()


def llava_config(model):
    """The transformers LlavaConfig describing `model`."""
    from transformers import LlavaConfig

    text = model.language_model.config
    hf = LlavaConfig(
        vision_config=model.vision_tower.model.config.to_dict(),
        text_config=text.to_dict(),
        image_token_index=model.image_token_id,
        image_seq_length=model.tokens_per_image,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full" if model.config.vision.select_feature == "cls_patch" else "default",
        vision_feature_layer=model.config.vision.select_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(text.tie_word_embeddings),
    )
    hf.architectures = ["LlavaForConditionalGeneration"]
    hf.dtype = str(model.dtype).removeprefix("torch.")
    return hf


def processor_files(model) -> dict[str, dict[str, Any]]:
    """preprocessor_config.json and processor_config.json contents."""
    side, vcfg = model.vision_tower.image_size, model.config.vision
    pad = vcfg.image_aspect == "pad"
    image = {
        # `pad` = LLaVA's expand-to-square with the mean colour (LlavaImageProcessor do_pad),
        # then resize; `square` = a direct resize to side x side.
        "image_processor_type": "LlavaImageProcessor" if pad else "CLIPImageProcessor",
        "do_pad": pad,
        "do_resize": True,
        "size": {"shortest_edge": side} if pad else {"height": side, "width": side},
        "resample": 3,  # bicubic
        "do_center_crop": pad,  # a no-op after padding: the image is already square
        "crop_size": {"height": side, "width": side},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(vcfg.image_mean),
        "image_std": list(vcfg.image_std),
        "do_convert_rgb": True,
        "processor_class": "LlavaProcessor",
    }
    processor = {
        "processor_class": "LlavaProcessor",
        "image_token": model.config.image_token,
        "patch_size": model.vision_tower.patch_size,
        "vision_feature_select_strategy": "full" if vcfg.select_feature == "cls_patch" else "default",
        # HF counts (S/P)^2 + this, minus 1 for "default": 1 = the CLS token CLIP adds.
        "num_additional_image_tokens": 1,
    }
    return {"preprocessor_config.json": image, "processor_config.json": processor}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def export_hf_llava(src: str | Path, dst: str | Path) -> Path:
    """Write a native checkpoint as an HF LlavaForConditionalGeneration directory."""
    src, dst = Path(src), Path(dst)
    model = load_model(src)
    _check_exportable(model)
    check_destination(src, dst)
    weights = {to_hf_key(k): v for k, v in state_dict_for_save(model).items()}
    tok = model.tokenizer
    tok.chat_template = chat_template_source(model)
    with atomic_dir(dst) as tmp:
        llava_config(model).save_pretrained(tmp)
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        _write_json(tmp / "chat_template.json", {"chat_template": tok.chat_template})
        for name, data in processor_files(model).items():
            _write_json(tmp / name, data)
        _write_json(tmp / "generation_config.json", {
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        })
    return dst
