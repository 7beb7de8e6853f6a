"""MoE-LLaVA (PKU-YuanGroup release) checkpoints -> native minigem checkpoints.

``import_moe_llava(src, dst)`` reads a released MoE-LLaVA directory (config.json with
``model_type: moe_llava_{stablelm,phi,qwen,...}``, the LLaVA ``mm_*`` fields and the nested
``moe`` dict; safetensors or ``pytorch_model*.bin``, single file or sharded; the tokenizer)
and writes a native checkpoint: the host LM as its HF class, the DeepSpeed MoE layers as
`SparseMoE` modules, no DeepSpeed needed. Dense ``llava_*`` (stage I/II) checkpoints convert too.

Weight names (``{p}`` = the release's base-model prefix: ``model``; ``transformer`` for Qwen v1):

    MoE-LLaVA                                                   native
    {p}.layers.{i}.mlp.deepspeed_moe.gate.wg.weight             language_model.model.layers.{i}.mlp.router.weight
    {p}.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{j}.*   ... .mlp.experts.{j}.*
    {p}.layers.{i}.mlp.mlp.*, .mlp.coefficient.* (use_residual) ... .mlp.shared_expert.*, .mlp.shared_coef.*
    {p}.mm_projector[.image_spatial_proj].{0,2}.*               connector.projector.{0,2}.*
    {p}.image_tower.image_tower[.vision_model].*                vision_tower.model.*
      (LLaVA naming {p}.vision_tower.vision_tower.* too; or a separate --vision-tower DIR)
    {p}.* (the rest of the host LM), lm_head.*                  language_model.model.*, language_model.lm_head.*

Qwen v1 (``transformer.h.{i}``, custom code) becomes HF Qwen2: ``c_attn`` is split into
``q/k/v_proj``; ``c_proj``, ``w2``/``w1``/``mlp.c_proj``, ``ln_1``/``ln_2``/``ln_f``, ``wte``
become ``o_proj``, ``gate/up/down_proj``, the norms and ``embed_tokens`` (exact up to Qwen v1's
``seq_length``; its dynamic-NTK / log-n long-context tricks are not reproduced).

Routing differs from the release only where the release is nondeterministic or lossy: no Gumbel
noise on the second choice (DeepSpeed adds it even at eval), and the top-2 gates are renormalised
before, not after, capacity dropping (identical when nothing is dropped; with 4 experts, top-2
and the released eval capacity factor 2.0 the capacity is every token, so eval never drops).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minigem.checkpoints import hf_llava
from minigem.checkpoints.native import (
    check_destination,
    hf_config_values,
    load_state,
    read_foreign_config,
    read_json,
    save_model,
)
from minigem.config import ModelConfig, MoEConfig, validate
from minigem.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_SKIP_FIELDS = {"model_type", "architectures", "transformers_version", "_name_or_path",
                "torch_dtype", "dtype", "auto_map", "use_cache", "moe"}
_MODES = {"sparse": "sparse", "first_half": "first_half", "second_half": "second_half",
          "dense": "all", "all": "all"}  # release moe_mode -> MoEConfig.layers
_ASPECT = {"pad": "pad"}  # anything else is CLIP's resize + centre crop: mapped to pad (warned)


@dataclass(frozen=True)
class Host:
    """How one MoE-LLaVA host LM maps onto an HF architecture."""

    arch: str  # the HF model_type minigem builds
    prefix: str = "model"  # the release's base-model prefix
    renames: dict[str, str] = field(default_factory=dict)  # release config field -> HF field
    defaults: dict[str, Any] = field(default_factory=dict)  # release-class defaults differing from HF's


HOSTS: dict[str, Host] = {
    # StableLM-2 via the release's StableLMEpoch code: the same weights as HF StableLm.
    "stablelm": Host("stablelm", renames={"rope_pct": "partial_rotary_factor", "norm_eps": "layer_norm_eps"},
                     defaults={"use_qkv_bias": True, "partial_rotary_factor": 0.25}),
    "phi": Host("phi"),  # the release vendors transformers' Phi: identical names and fields
    "qwen": Host("qwen2", prefix="transformer"),  # Qwen v1: see qwen_v1_config / _qwen_v1_key
    "qwen1_5": Host("qwen2"),
    "llama": Host("llama"),
    "mistral": Host("mistral"),
}


# ----------------------------------------------------------------------------- config


def read_release_config(src: Path) -> tuple[dict[str, Any], str]:
    """config.json -> (raw dict, host family such as 'stablelm'), with format checks."""
    raw = read_foreign_config(src)
    mt = str(raw.get("model_type"))
    family = mt.removeprefix("moe_").removeprefix("llava_") if mt.startswith(("moe_llava_", "llava_")) else None
    if family not in HOSTS:
        valid = ", ".join(f"moe_llava_{h}" for h in HOSTS)
        raise CheckpointError(
            f"{src}/config.json: model_type {raw.get('model_type')!r} is not a MoE-LLaVA model "
            f"minigem can convert (valid: {valid}, or their dense llava_* forms)"
        )
    refuse_image_tokens(raw, src)
    return raw, family


def refuse_image_tokens(raw: dict[str, Any], src: Path) -> None:
    """LLaVA-family releases trained with <im_start>/<im_patch> tokens are not supported."""
    for flag in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if raw.get(flag):
            raise CheckpointError(f"{src}/config.json: {flag}=true is not supported")


def host_config(raw: dict[str, Any], family: str, where: str):
    """The HF config of the host LM (an HF architecture minigem builds)."""
    from transformers import AutoConfig

    host = HOSTS[family]
    if family == "qwen":
        values = qwen_v1_config(raw, where)
    else:
        known = set(AutoConfig.for_model(host.arch).to_dict()) | {"rope_theta", "partial_rotary_factor"}
        values = dict(host.defaults)
        for key, val in raw.items():
            key = host.renames.get(key, key)
            if key in known and key not in _SKIP_FIELDS:
                values[key] = val
    return build_host_config(host.arch, values, raw, where)


def build_host_config(arch: str, values: dict[str, Any], raw: dict[str, Any], where: str):
    """``AutoConfig.for_model(arch, **values)`` after the checks every release importer makes."""
    from transformers import AutoConfig

    if raw.get("rope_scaling"):
        raise CheckpointError(f"{where}: rope_scaling {raw['rope_scaling']} is not supported")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if key not in values:
            raise CheckpointError(f"{where}: the host LM's {key} is missing")
    try:
        return AutoConfig.for_model(arch, **values)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: not a valid {arch} config: {err}") from None


def qwen_v1_config(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """Qwen v1 (QWenConfig) fields -> HF Qwen2 config kwargs."""
    try:
        hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
        values = {
            "vocab_size": raw["vocab_size"], "hidden_size": hidden,
            "intermediate_size": raw["intermediate_size"] // 2,  # Qwen v1 counts w1 + w2
            "num_hidden_layers": raw["num_hidden_layers"], "num_attention_heads": heads,
            "num_key_value_heads": heads, "hidden_act": "silu",
            "rms_norm_eps": raw.get("layer_norm_epsilon", 1e-6),
            "rope_theta": float(raw.get("rotary_emb_base", 10000)),
            "max_position_embeddings": raw.get("seq_length", raw.get("max_position_embeddings", 8192)),
            "tie_word_embeddings": bool(raw.get("tie_word_embeddings", False)),
        }
    except KeyError as err:
        raise CheckpointError(f"{where}: the Qwen config lacks {err.args[0]}") from None
    if raw.get("rotary_pct", 1.0) != 1.0:
        raise CheckpointError(f"{where}: rotary_pct={raw['rotary_pct']} is not supported (Qwen2 rotates all dims)")
    if raw.get("kv_channels", hidden // heads) * heads != hidden:
        raise CheckpointError(f"{where}: kv_channels * num_attention_heads != hidden_size")
    if raw.get("no_bias", True) is not True:
        raise CheckpointError(f"{where}: no_bias=false (biased FFN/output projections) is not supported")
    return values


def moe_config(raw: dict[str, Any], num_layers: int, where: str) -> MoEConfig | None:
    """The nested `moe` dict -> MoEConfig (None for a dense checkpoint)."""
    from minigem.llm.moe import moe_layer_indices

    moe = raw.get("moe")
    if moe is None or (isinstance(moe, dict) and not moe.get("moe_enable", True)):
        return None
    if not isinstance(moe, dict):
        raise CheckpointError(f"{where}: `moe` must be a JSON object")
    for key in ("num_experts", "top_k_experts"):
        if key not in moe:
            raise CheckpointError(f"{where}: moe.{key} is missing")
    idx = moe.get("moe_layers_idx")
    if idx:
        layers: str | list[int] = [int(i) for i in idx]
    else:
        mode = moe.get("moe_mode", "sparse")
        if mode not in _MODES:
            raise CheckpointError(f"{where}: moe.moe_mode {mode!r} is not one of {', '.join(_MODES)}")
        layers = _MODES[mode]
    try:
        indices = moe_layer_indices(num_layers, layers)
    except ConfigError as err:
        raise CheckpointError(f"{where}: moe.moe_layers_idx: {err}") from None
    experts = moe["num_experts"]
    experts = [experts] if isinstance(experts, int) else list(experts)
    if len(experts) == 1:
        experts = experts * len(indices)
    if len(experts) != len(indices):
        raise CheckpointError(
            f"{where}: moe.num_experts lists {len(experts)} counts for {len(indices)} MoE layers {indices}"
        )
    if len(set(experts)) != 1:
        raise CheckpointError(
            f"{where}: moe.num_experts={experts}: minigem uses one expert count for every MoE layer"
        )
    if moe["top_k_experts"] != 2:
        raise CheckpointError(
            f"{where}: moe.top_k_experts={moe['top_k_experts']}: only top-2 converts exactly (DeepSpeed's "
            "top-1 scales the expert output by its softmax probability; minigem renormalises the gates)"
        )
    return validate(MoEConfig, {
        "num_experts": experts[0], "top_k": 2, "layers": layers,
        "capacity_factor": moe.get("capacity_factor", 1.0),
        "eval_capacity_factor": moe.get("eval_capacity_factor", 1.0),
        "min_capacity": moe.get("min_capacity", 4),
        "shared_expert": bool(moe.get("use_residual", False)),
        "aux_loss_coef": moe.get("router_aux_loss_coef", 0.01),
    }, f"{where} (moe)")


# ----------------------------------------------------------------------------- weights


def read_weights(src: Path) -> dict[str, torch.Tensor]:
    """Safetensors (single or sharded) or pytorch_model.bin (single or sharded)."""
    if (src / "model.safetensors").is_file() or (src / "model.safetensors.index.json").is_file():
        return hf_llava.read_weights(src)
    single, index = src / "pytorch_model.bin", src / "pytorch_model.bin.index.json"
    files = [single] if single.is_file() else []
    if not files and index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map")
        files = [src / s for s in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index}: shard {f.name} is missing from {src}")
    if not files:
        raise CheckpointError(f"{src}: no model.safetensors[.index.json] or pytorch_model.bin[.index.json]")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            out.update(torch.load(f, map_location="cpu", weights_only=True))
        except (RuntimeError, OSError, EOFError) as err:
            raise CheckpointError(f"{f}: cannot read the weights: {err}") from None
    return out


_QWEN_MLP = {"w1": "up_proj", "w2": "gate_proj", "c_proj": "down_proj"}  # a1 * silu(a2): w2 gates


def _qwen_v1_key(rest: str) -> str:
    """A Qwen v1 name below `transformer.` -> the HF Qwen2 name below `model.`."""
    if rest.startswith("wte."):
        return "embed_tokens." + rest[4:]
    if rest.startswith("ln_f."):
        return "norm." + rest[5:]
    m = re.match(r"h\.(\d+)\.(.*)", rest)
    if m is None:
        return rest
    i, tail = m.groups()
    for old, new in (("ln_1.", "input_layernorm."), ("ln_2.", "post_attention_layernorm."),
                     ("attn.c_proj.", "self_attn.o_proj.")):
        if tail.startswith(old):
            return f"layers.{i}.{new}{tail[len(old):]}"
    parts = tail.split(".")
    if parts[0] == "mlp" and len(parts) >= 3 and parts[-2] in _QWEN_MLP:
        parts[-2] = _QWEN_MLP[parts[-2]]
    return f"layers.{i}." + ".".join(parts)


def _split_qwen_qkv(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Qwen v1's fused `attn.c_attn` [3H, ...] -> `attn.{q,k,v}_proj` (then named self_attn.*)."""
    out = {}
    for key, val in weights.items():
        m = re.fullmatch(r"(transformer\.h\.\d+\.)attn\.c_attn\.(weight|bias)", key)
        if m is None:
            out[key] = val
            continue
        for name, part in zip(("q_proj", "k_proj", "v_proj"), val.chunk(3, dim=0), strict=True):
            out[f"{m.group(1)}self_attn.{name}.{m.group(2)}"] = part.contiguous()
    return out


_MOE_KEYS = (  # release MoE names (below `layers.{i}.mlp.`) -> SparseMoE names
    (re.compile(r"deepspeed_moe\.gate\.wg\."), "router."),
    (re.compile(r"deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\."), r"experts.\1."),
    (re.compile(r"mlp\."), "shared_expert."),
    (re.compile(r"coefficient\."), "shared_coef."),
)


def _moe_key(rest: str) -> str:
    m = re.match(r"(layers\.\d+\.mlp\.)(.*)", rest)
    if m is None:
        return rest
    head, tail = m.groups()
    for pattern, repl in _MOE_KEYS:
        if pattern.match(tail):
            return head + pattern.sub(repl, tail, count=1)
    return rest


def to_native_key(key: str, family: str) -> str | None:
    """A release weight name -> ours; None for names that are not part of the model."""
    p = HOSTS[family].prefix + "."
    if key.endswith("rotary_emb.inv_freq"):
        return None  # a recomputed buffer some releases saved
    for tower in ("image_tower.image_tower.", "vision_tower.vision_tower."):
        if key.startswith(p + tower):
            return "vision_tower.model." + key[len(p + tower):].removeprefix("vision_model.")
    for proj in ("mm_projector.image_spatial_proj.", "mm_projector."):
        if key.startswith(p + proj):
            rest = key[len(p + proj):]
            if rest in ("weight", "bias"):  # a `linear` projector is a bare nn.Linear
                return f"connector.projector.0.{rest}"
            idx, _, rest = rest.partition(".")
            return f"connector.projector.{idx}.{rest}" if idx in ("0", "2") else key
    if key.startswith("lm_head."):
        return "language_model." + key
    if key.startswith(p):
        rest = key[len(p):]
        if family == "qwen":
            rest = _qwen_v1_key(rest)
        return "language_model.model." + _moe_key(rest)
    return key  # unknown: reported as unexpected


def map_weights(weights: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    if family == "qwen":
        weights = _split_qwen_qkv(weights)
    out: dict[str, torch.Tensor] = {}
    for key, val in weights.items():
        ours = to_native_key(key, family)
        if ours is not None:
            out[ours] = val
    return out


def split_tower(native: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pop the vision tower's weights out of `native`: {CLIPVisionModel name: tensor}."""
    keys = [k for k in native if k.startswith("vision_tower.model.")]
    return {k[len("vision_tower.model."):]: native.pop(k) for k in keys}


def check_experts(native: dict[str, torch.Tensor], moe: MoEConfig | None, where: str) -> None:
    """Each MoE layer must hold exactly experts 0..E-1 (a clear message for partial saves)."""
    found: dict[str, set[int]] = {}
    for key in native:
        m = re.match(r"(language_model\.model\.layers\.(\d+)\.mlp\.)experts\.(\d+)\.", key)
        if m:
            found.setdefault(m.group(2), set()).add(int(m.group(3)))
    if moe is None:
        if found:
            raise CheckpointError(f"{where}: the weights hold MoE experts but config.json has no `moe` section")
        return
    want = set(range(moe.num_experts))
    for layer, have in sorted(found.items(), key=lambda kv: int(kv[0])):
        if have != want:
            raise CheckpointError(
                f"{where}: decoder layer {layer} holds experts {sorted(have)} but config.json's "
                f"moe.num_experts is {moe.num_experts} (missing {sorted(want - have)}, extra "
                f"{sorted(have - want)}; a checkpoint saved with ep_size > 1 holds one rank's experts)"
            )


# ----------------------------------------------------------------------------- vision


def _tower_from_dir(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from transformers import CLIPVisionModel

    if not (path / "config.json").is_file():
        raise CheckpointError(f"--vision-tower: {path} is not a model directory (no config.json)")
    try:
        model = CLIPVisionModel.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"--vision-tower: cannot load a CLIP vision model from {path}: {err}") from None
    values = hf_config_values(model.config)
    values.pop("model_type", None)
    return values, model.state_dict()


def infer_clip_config(tower: dict[str, torch.Tensor], where: str) -> dict[str, Any]:
    """CLIPVisionConfig kwargs from the weight shapes (OpenAI CLIP: 64-dim heads, quick_gelu)."""
    try:
        patch = tower["embeddings.patch_embedding.weight"]  # [C, 3, P, P]
        pos = tower["embeddings.position_embedding.weight"]  # [1 + N, C]
        fc1 = tower["encoder.layers.0.mlp.fc1.weight"]  # [I, C]
    except KeyError as err:
        raise CheckpointError(f"{where}: the vision tower weights lack {err.args[0]}") from None
    hidden, side = patch.shape[0], math.isqrt(pos.shape[0] - 1)
    layers = 1 + max(int(k.split(".")[2]) for k in tower if k.startswith("encoder.layers."))
    return {"hidden_size": hidden, "intermediate_size": fc1.shape[0], "num_hidden_layers": layers,
            "num_attention_heads": max(1, hidden // 64), "image_size": side * patch.shape[2],
            "patch_size": patch.shape[2]}


def resolve_tower(raw: dict[str, Any], tower: dict[str, torch.Tensor], vision_tower: Path | None,
                  where: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(CLIPVisionConfig kwargs, weights) from --vision-tower, a local mm_image_tower, or the weights."""
    name = raw.get("mm_image_tower") or raw.get("mm_vision_tower")
    local = Path(name) if isinstance(name, str) and Path(name).is_dir() else None
    path = vision_tower or local
    if path is not None:
        values, weights = _tower_from_dir(Path(path))
        if tower:
            log.info("using the checkpoint's vision tower weights (config from %s)", path)
            weights = tower
        return values, weights
    if tower:
        log.warning("%s: the tower config comes from the weight shapes (OpenAI CLIP conventions: "
                    "64-dim heads, quick_gelu); pass --vision-tower DIR to set it", where)
        return infer_clip_config(tower, where), tower
    raise CheckpointError(
        f"{where}: the checkpoint holds no vision tower weights and mm_image_tower {name!r} is not a "
        "local directory: pass --vision-tower DIR (an HF CLIP vision model directory)"
    )


# ----------------------------------------------------------------------------- import


def conversation_template(eos: str):
    """MoE-LLaVA's `phi`/`stablelm`/`qwen` conversation: vicuna v1 turns ended by the eos token."""
    from minigem.chat.templates import TurnTemplate

    return TurnTemplate(
        "moe_llava", VICUNA_SYSTEM, (eos,), (eos,), system_fmt="{system} ",
        user_fmt="USER: {content} ", header="ASSISTANT:", assistant_fmt=f" {{content}}{eos}",
    )


def native_config(raw: dict[str, Any], hf, moe: MoEConfig | None, vision: dict[str, Any],
                  template: str, where: str) -> ModelConfig:
    text = hf_config_values(hf)
    arch = text.pop("model_type")
    proj = raw.get("image_projector_type") or raw.get("mm_projector_type") or "linear"
    if proj not in ("linear", "mlp2x_gelu"):
        raise CheckpointError(f"{where}: projector type {proj!r} is not supported (linear, mlp2x_gelu)")
    aspect = raw.get("image_aspect_ratio", "square")
    if aspect not in _ASPECT:
        log.warning("%s: image_aspect_ratio %r (resize + centre crop) is processed as `pad`", where, aspect)
    feature = raw.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise CheckpointError(f"{where}: mm_vision_select_feature {feature!r} is not patch or cls_patch")
    mm_hidden = raw.get("mm_hidden_size")
    if mm_hidden is not None and mm_hidden != vision.get("hidden_size"):
        raise CheckpointError(
            f"{where}: mm_hidden_size {mm_hidden} does not match the vision tower's hidden size "
            f"{vision.get('hidden_size')}"
        )
    return validate(ModelConfig, {
        "vision": {"config": vision, "select_layer": raw.get("mm_vision_select_layer", -2),
                   "select_feature": feature, "image_aspect": _ASPECT.get(aspect, "pad")},
        "connector": {"type": proj},
        "llm": {"arch": arch, "config": text},
        "moe": None if moe is None else moe.model_dump(),
        "template": template,
        "max_length": raw.get("tokenizer_model_max_length") or 2048,
    }, f"the converted {where}")


def pad_vocab(model, native: dict[str, torch.Tensor]) -> None:
    """Grow the embedding / LM-head rows of `native` to the model's (new tokens get the mean row)."""
    lm = model.language_model
    params = [lm.get_input_embeddings().weight]
    out = lm.get_output_embeddings()
    if out is not None:
        params += [out.weight] + ([out.bias] if getattr(out, "bias", None) is not None else [])
    names: dict[int, str] = {}
    for n, p in lm.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), f"language_model.{n}")  # tied: the input embedding's name
    for p in params:
        key = names.get(id(p))
        val = native.get(key) if key is not None else None
        if val is not None and val.shape[0] < p.shape[0] and val.shape[1:] == p.shape[1:]:
            extra = val.float().mean(0, keepdim=True).to(val.dtype).expand(p.shape[0] - val.shape[0], *val.shape[1:])
            native[key] = torch.cat([val, extra])


def import_moe_llava(src: str | Path, dst: str | Path, vision_tower: str | Path | None = None,
                     template: str | None = None) -> Path:
    """Convert a MoE-LLaVA release directory into a native checkpoint; returns `dst`."""
    from transformers import AutoTokenizer

    from minigem.chat import get_template
    from minigem.model import VisionLanguageModel

    src, dst = Path(src), Path(dst)
    where = f"{src}/config.json"
    raw, family = read_release_config(src)
    check_destination(src, dst)
    if template is not None:
        get_template(template)  # unknown name -> ConfigError listing the valid ones
    hf = host_config(raw, family, where)
    moe = moe_config(raw, hf.num_hidden_layers, where)
    native = map_weights(read_weights(src), family)
    check_experts(native, moe, str(src))
    vision, tower = resolve_tower(raw, split_tower(native), Path(vision_tower) if vision_tower else None, where)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, config=hf)  # config.json's model_type is foreign
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"{src}: cannot load the tokenizer: {err} (a tiktoken tokenizer that needs custom code must "
            "be replaced by its HF tokenizer.json first)"
        ) from None
    if template is None:
        if tokenizer.eos_token is None:
            raise CheckpointError(f"{src}: the tokenizer has no eos token; choose a template with --template")
        tokenizer.chat_template = conversation_template(tokenizer.eos_token).to_jinja()
        template = "jinja"
    cfg = native_config(raw, hf, moe, vision, template, where)
    model = VisionLanguageModel.build(cfg, tokenizer)
    native.update({f"vision_tower.model.{k}": v for k, v in tower.items()})
    pad_vocab(model, native)
    load_state(model, native, str(src))  # copies convert bf16/fp16 release tensors to fp32
    model.eval()
    save_model(model, dst, extra={"converted_from": "moe-llava"})
    return dst
