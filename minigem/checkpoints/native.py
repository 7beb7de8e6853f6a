"""The native checkpoint: a directory with config.json, model.safetensors and the tokenizer.

Saving freezes every component's full config into config.json (no paths to other
directories), so a checkpoint is self-contained. Writes are atomic: everything goes to a
temporary sibling directory that is renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from minigem import __version__
from minigem.config import ModelConfig, validate
from minigem.errors import CheckpointError

FORMAT = "minigem"
BUNDLED = Path(__file__).resolve().parent.parent / "assets" / "tiny-shapes"
_DROP = {"transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype",
         "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id",
         "problem_type", "tokenizer_class", "chunk_size_feed_forward", "is_encoder_decoder",
         "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder",
         "finetuning_task", "prefix", "task_specific_params", "use_cache"}


def hf_config_values(hf) -> dict[str, Any]:
    """An HF config as plain kwargs that rebuild it (no bookkeeping fields)."""
    d = hf.to_dict()
    return {k: v for k, v in d.items() if k not in _DROP and not k.startswith("_")}


def frozen_config(model) -> ModelConfig:
    """The model's config with every component's full settings inlined and paths removed."""
    cfg = model.config.model_copy(deep=True)
    cfg.vision.config = hf_config_values(model.vision_tower.model.config)
    cfg.vision.config.pop("model_type", None)
    cfg.vision.path = None
    hf = model.language_model.config
    values = hf_config_values(hf)
    values.pop("model_type", None)
    cfg.llm.config = values
    cfg.llm.arch = hf.model_type
    cfg.llm.path = None
    cfg.llm.init_std = None
    cfg.tokenizer = None
    if cfg.vision_aux is not None:
        cfg.vision_aux.path = None
    return cfg


def state_dict_for_save(model: torch.nn.Module,
                        state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors; tied weights are stored once (under their first name).

    state: the weights to write instead of ``model.state_dict()`` (a full state dict gathered
    from FSDP / DeepSpeed shards, whose parameters are not plain tensors)."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in (model.state_dict() if state is None else state).items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        if ptr in seen and ptr != -1:
            continue
        seen[ptr] = k
        out[k] = v.detach().to("cpu").contiguous()
    return out


def atomic_dir(dst: Path):
    """A context manager yielding a temp dir that replaces `dst` on success."""

    class _Ctx:
        def __enter__(self) -> Path:
            dst.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
            return self.tmp

        def __exit__(self, exc_type, exc, tb) -> None:
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return
            old = None
            if dst.exists():
                old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
                os.replace(dst, old)
            os.replace(self.tmp, dst)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)

    return _Ctx()


def write_model(model, directory: Path, extra: dict[str, Any] | None = None,
                state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the checkpoint files into an existing directory (not atomic by itself).
    state: weights to write instead of the model's own (see `state_dict_for_save`)."""
    cfg = frozen_config(model)
    meta = {"format": FORMAT, "minigem_version": __version__, "model": cfg.model_dump(mode="json")}
    if extra:
        meta.update(extra)
    save_file(state_dict_for_save(model, state), str(directory / "model.safetensors"), metadata={"format": "pt"})
    model.tokenizer.save_pretrained(directory)
    (directory / "config.json").write_text(json.dumps(meta, indent=2) + "\n")


def save_model(model, path: str | Path, extra: dict[str, Any] | None = None,
               state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `model` as a native checkpoint directory (atomically)."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        write_model(model, tmp, extra, state)
    return path


def check_destination(src: Path, dst: Path) -> None:
    """A conversion must not write over its own source directory."""
    if dst.resolve() == src.resolve():
        raise CheckpointError(f"{dst}: the destination is the source directory")


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` (CheckpointError: not valid JSON, or not an object)."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_config_json(path: Path) -> dict[str, Any]:
    """The config.json object of the model directory ``path`` (native or a release to convert)."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such model directory")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a model directory (no config.json)")
    return read_json(path / "config.json")


def read_foreign_config(src: Path) -> dict[str, Any]:
    """``read_config_json`` of a release directory to convert: refuses a minigem checkpoint."""
    raw = read_config_json(src)
    if raw.get("format") == FORMAT:
        raise CheckpointError(f"{src}: already a minigem checkpoint (nothing to convert)")
    return raw


def read_config(path: Path) -> ModelConfig:
    cfg_file = path / "config.json"
    meta = read_config_json(path)
    if meta.get("format") != FORMAT:
        hint = ""
        if "mm_vision_tower" in meta:
            hint = " (looks like a Mini-Gemini/LLaVA checkpoint: use `minigem convert --from mgm`)"
        elif meta.get("model_type") == "llava":
            hint = " (an HF LLaVA checkpoint: use `minigem convert --from hf-llava`)"
        raise CheckpointError(f"{path}: not a minigem checkpoint{hint}")
    return validate(ModelConfig, meta["model"], str(cfg_file))


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot load the tokenizer: {err}") from None


def load_state(model, weights: dict[str, torch.Tensor], where: str, strict: bool = True) -> None:
    """Load weights, with an error listing missing/unexpected keys (tied copies allowed)."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    tied = set(_tied_aliases(model))
    missing = [k for k in missing if k not in tied]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{where}: weights do not match the model.\n"
            f"  missing ({len(missing)}): {', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}\n"
            f"  unexpected ({len(unexpected)}): {', '.join(unexpected[:12])}"
            f"{' ...' if len(unexpected) > 12 else ''}"
        )
    for k, v in weights.items():
        if k in own and own[k].shape != v.shape:
            raise CheckpointError(f"{where}: {k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
    model.load_state_dict(weights, strict=False)


def _tied_aliases(model) -> list[str]:
    seen: dict[int, str] = {}
    aliases = []
    for k, v in model.state_dict().items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        if ptr in seen and ptr != -1:
            aliases.append(k)
        seen[ptr] = k
    return aliases


def load_model(path: str | Path | None = None, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None):
    """Load a native checkpoint (the bundled model when `path` is None)."""
    from minigem.model import VisionLanguageModel

    path = Path(path) if path is not None else BUNDLED
    if path == BUNDLED and not (path / "config.json").is_file():
        raise CheckpointError(f"the bundled model is missing from {path} (reinstall minigem)")
    cfg = read_config(path)
    tokenizer = load_tokenizer(path)
    model = VisionLanguageModel.build(cfg, tokenizer)
    wfile = path / "model.safetensors"
    if not wfile.is_file():
        raise CheckpointError(f"{path}: no model.safetensors")
    load_state(model, load_file(str(wfile)), str(wfile))
    model.eval()
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    return model
