"""Mini-Gemini's high-res tower: a timm ConvNeXt trunk whose four stage outputs are
upsampled to the stride-4 map and concatenated on channels.

State-dict keys follow the Mini-Gemini release (``vision_stem.{0,1}.*``,
``vision_stages.{s}.{downsample.{0,1},blocks.{b}.*}``), so a released
``model.vision_tower_aux.*`` block loads after stripping that prefix. Plain timm
(``stem.*``/``stages.*``) and open_clip (``visual.trunk.stem.*``...) checkpoints load
through ``load_hr_weights``; the key mapping is ``timm_key_to_mgm``/``mgm_aux_key_to_timm``.

Upsampling matches the release: stages 1-3 are resized with bilinear interpolation,
``align_corners=False`` (no antialias), computed in fp32 and cast back; stage 0 is taken
as is. The tower is frozen (eval mode, no grad) by default: the release leaves the
open_clip drop-path (0.1) active at inference, a bug we avoid.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minigem.config import VisionAuxConfig
from minigem.errors import CheckpointError
from minigem.vision.hd import empty_views, write_views

# channels per upsampling chunk: bounds the fp32 temporary of the stage resize
_UPSAMPLE_CHUNK = 256
_CHECKPOINT_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
    "model.safetensors",
    "pytorch_model.bin",
)


def timm_key_to_mgm(key: str) -> str | None:
    """``stem.0.weight`` -> ``vision_stem.0.weight``; None for keys outside the trunk."""
    for src, dst in (("stem.", "vision_stem."), ("stages.", "vision_stages.")):
        if key.startswith(src):
            return dst + key[len(src) :]
    return None


def mgm_aux_key_to_timm(key: str) -> str:
    """``[model.vision_tower_aux.]vision_stages.1.downsample.0.weight`` -> ``stages.1...``."""
    key = key.removeprefix("model.vision_tower_aux.")
    for src, dst in (("vision_stem.", "stem."), ("vision_stages.", "stages.")):
        if key.startswith(src):
            return dst + key[len(src) :]
    raise KeyError(f"{key!r} is not a Mini-Gemini HR tower key (vision_stem.* / vision_stages.*)")


def assemble_stages(
    stages: list[torch.Tensor], grid: int = 1, global_view: bool = False
) -> torch.Tensor:
    """Upsample every stage to the first one's size and concatenate on channels.

    stages: [B, C_s, H_s, W_s] for s = 0..3 (H_0 = H/4) -> [B, sum(C_s), H_0, W_0].
    With ``grid`` > 1 the map is written straight into its HD views (``split_hr_views``
    order): [B*V, sum(C_s), H_0/grid, W_0/grid], and the whole map never exists at once.
    Everything goes into one preallocated output, a few channels at a time (resized in
    fp32), so the peak is the output plus one small temporary (not a list of all stages
    plus ``cat``, plus a split copy).
    """
    first = stages[0]
    b, _, h, w = first.shape
    channels = sum(s.shape[1] for s in stages)
    out = empty_views(first, channels, h, w, grid, global_view)  # [B, V, C, H0/g, W0/g]
    offset = 0
    for i, stage in enumerate(stages):
        for c0 in range(0, stage.shape[1], _UPSAMPLE_CHUNK):
            part = stage[:, c0 : c0 + _UPSAMPLE_CHUNK]
            if i > 0:  # casts back to the stage dtype when written into `out`
                part = F.interpolate(
                    part.float(), size=(h, w), mode="bilinear", align_corners=False
                )
            write_views(out, part, offset + c0, grid, global_view)
        offset += stage.shape[1]
    return out.flatten(0, 1)


class HRTower(nn.Module):
    """ConvNeXt stem + 4 stages -> multi-scale map [B, sum(dims), H/4, W/4]."""

    def __init__(self, cfg: VisionAuxConfig) -> None:
        super().__init__()
        import timm  # optional extra `hr`; imported only when an HR tower is built

        kwargs = {"num_classes": 0, **cfg.config}
        trunk = timm.create_model(cfg.timm_name, pretrained=False, **kwargs)
        if not (hasattr(trunk, "stem") and hasattr(trunk, "stages")) or len(trunk.stages) != 4:
            raise ValueError(f"{cfg.timm_name!r} is not a 4-stage timm ConvNeXt (stem + stages)")
        # keep only the trunk; the head and norm_pre are never used
        self.vision_stem: nn.Module = trunk.stem
        self.vision_stages: nn.Sequential = trunk.stages
        self.dims = [int(info["num_chs"]) for info in trunk.feature_info]  # per stage

    @property
    def out_channels(self) -> int:
        return sum(self.dims)

    @property
    def frozen(self) -> bool:
        """True when no parameter requires grad (as after ``freeze()`` or a stage that does
        not train the tower): the tower then runs in eval mode and without autograd."""
        return not any(p.requires_grad for p in self.parameters())

    def freeze(self) -> HRTower:
        """No grads, and eval mode that survives a parent's ``.train()`` (no drop-path)."""
        self.requires_grad_(False)
        return super().train(False)

    def unfreeze(self) -> HRTower:
        """Make the tower trainable (its train/eval mode follows the parent from now on)."""
        self.requires_grad_(True)
        return self

    def train(self, mode: bool = True) -> HRTower:
        return super().train(mode and not self.frozen)

    def forward(
        self, pixel_values: torch.Tensor, grid: int = 1, global_view: bool = False
    ) -> torch.Tensor:
        """pixel_values [B, 3, H, W] -> [B, sum(dims), H/4, W/4] (in the tower's dtype).

        HD: with ``grid`` > 1 returns the map already split into its views,
        [B*V, sum(dims), H/4/grid, W/4/grid], the same as ``split_hr_views(tower(px), grid,
        global_view)`` but without holding the whole map and its split at once.
        """
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"HR tower expects [B, 3, H, W] pixels, got {tuple(pixel_values.shape)}"
            )
        weight = self.vision_stem[0].weight
        with torch.no_grad() if self.frozen else nullcontext():
            x = self.vision_stem(pixel_values.to(device=weight.device, dtype=weight.dtype))
            outs = []
            for stage in self.vision_stages:
                x = stage(x)
                outs.append(x)  # stage s: [B, dims[s], H/2^(s+2), W/2^(s+2)]
            return assemble_stages(outs, grid, global_view)


# ----------------------------------------------------------------------------- loading


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        found = [path / name for name in _CHECKPOINT_FILES if (path / name).is_file()]
        if not found:
            raise CheckpointError(
                f"{path}: no HR tower checkpoint; expected one of {', '.join(_CHECKPOINT_FILES)}"
            )
        path = found[0]
    if not path.is_file():
        raise CheckpointError(f"{path}: HR tower checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a state dict ({type(state).__name__})")
    return state


def _to_tower_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map timm, open_clip (``visual.trunk.``) or Mini-Gemini keys onto the tower's names.

    Keys outside the trunk (classifier heads, open_clip's text tower, an LLM...) are ignored.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        k = key.removeprefix("module.").removeprefix("visual.trunk.")
        k = k.removeprefix("model.vision_tower_aux.")
        if k.startswith(("vision_stem.", "vision_stages.")):
            out[k] = value
        elif (mapped := timm_key_to_mgm(k)) is not None:
            out[mapped] = value
    return out


def _listing(keys: list[str], limit: int = 10) -> str:
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_hr_weights(tower: HRTower, path: str | Path) -> None:
    """Load a local timm / open_clip / Mini-Gemini checkpoint (file or directory) into ``tower``.

    Errors list the missing, unexpected and wrongly shaped keys (in tower names).
    """
    path = Path(path)
    state = _to_tower_keys(_read_state_dict(path))
    if not state:
        raise CheckpointError(
            f"{path}: no ConvNeXt trunk keys found (expected stem.*/stages.*, "
            "visual.trunk.stem.*/visual.trunk.stages.*, or vision_stem.*/vision_stages.*)"
        )
    expected = tower.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    if missing or unexpected or shapes:
        parts = [f"{path}: checkpoint does not fit the HR tower"]
        if missing:
            parts.append(f"  missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            parts.append(f"  unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if shapes:
            parts.append(f"  shape mismatches ({len(shapes)}): {_listing(shapes)}")
        raise CheckpointError("\n".join(parts))
    tower.load_state_dict(state, strict=True)


def build_hr_tower(cfg: VisionAuxConfig) -> HRTower:
    """Build the HR tower, load ``cfg.path`` if set, and freeze it (as in every MGM stage)."""
    if cfg.type != "convnext":
        raise ValueError(f"unknown HR tower type {cfg.type!r}; valid: convnext")
    tower = HRTower(cfg)
    if cfg.path is not None:
        load_hr_weights(tower, cfg.path)
    return tower.freeze()
