"""Typed, validated configs: model, data, training stages and recipes.

Configs are pydantic models with ``extra="forbid"``: an unknown key or a value of the wrong
type fails at load time with the key's dotted path. Recipes are YAML files; dotted overrides
(``training.stages.instruct.lr=1e-4``, ``model.llm.config.num_hidden_layers=2``) are applied to
the raw mapping before validation. The resolved config is saved with every run and checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from minigem.errors import ConfigError


class StrictModel(BaseModel):
    """Base for all configs: unknown keys are errors; assignment is validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------- model


class VisionConfig(StrictModel):
    """The low-res vision tower (a CLIP ViT)."""

    type: Literal["clip"] = "clip"
    path: str | None = None  # local CLIPVisionModel directory; else built from `config`
    config: dict[str, Any] = Field(default_factory=dict)  # CLIPVisionConfig kwargs
    select_layer: int = -2  # which hidden state: -2 = penultimate (LLaVA)
    select_feature: Literal["patch", "cls_patch"] = "patch"
    image_aspect: Literal["pad", "square"] = "pad"  # LLaVA `pad` to square with the mean colour
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


class VisionAuxConfig(StrictModel):
    """The high-res tower (Mini-Gemini): a timm ConvNeXt."""

    type: Literal["convnext"] = "convnext"
    timm_name: str = "convnext_large"  # any timm ConvNeXt
    path: str | None = None  # local timm / open_clip checkpoint file or directory
    config: dict[str, Any] = Field(default_factory=dict)  # timm create_model kwargs (dims, depths)
    image_size: int = 768  # HR input side
    image_grid: int = 1  # HD token extension: 2 = 2x2 LR crops (Mini-Gemini HD)
    image_global: bool = False  # HD: add a global LR view before the crops


class ConnectorConfig(StrictModel):
    """Maps VisionFeatures to visual tokens in the LLM's width."""

    type: Literal["linear", "mlp2x_gelu", "patch_mining"] = "mlp2x_gelu"
    projector: Literal["linear", "mlp2x_gelu"] = "mlp2x_gelu"  # final projector (patch_mining)
    # Average-pool the square grid of low-res tokens k x k before the connector (1 = off):
    # N tokens -> N / k^2, e.g. 36 -> 9 with pool 2 (LLaVA-NeXT-style 2x2 pooling).
    pool: int = Field(1, ge=1)
    # How the k x k block becomes one token: `avg` (mean of the k^2 features) or `concat`
    # (space-to-depth: the k^2 features side by side, k^2 x C channels into the connector;
    # keeps the detail inside the block, e.g. an object's outline).
    pool_mode: Literal["avg", "concat"] = "avg"
    # A learned embedding per visual token (position in the view's grid), added to the
    # (pooled) low-res features before the connector, initialised N(0, 1): makes "where"
    # readable from each token's own value even when the tower's features carry it weakly.
    pos_embed: bool = False


class LLMConfig(StrictModel):
    """Any HF causal LM: from a local directory, or built from an HF config."""

    path: str | None = None
    arch: str | None = None  # HF model_type (llama, qwen2, gemma, mistral, phi, ...) when building
    config: dict[str, Any] = Field(default_factory=dict)  # HF config kwargs (override `path`'s)
    init_std: float | None = None  # re-init std for a model built from scratch

    @model_validator(mode="after")
    def _source(self) -> LLMConfig:
        if self.path is None and self.arch is None and "model_type" not in self.config:
            raise ValueError("set `path` (a local model directory) or `arch` (an HF model_type)")
        return self


class MoEConfig(StrictModel):
    """Sparse mixture-of-experts FFNs swapped into the LLM at build time (MoE-LLaVA)."""

    num_experts: int = 4
    top_k: int = 2
    layers: Literal["sparse", "first_half", "second_half", "all"] | list[int] = "sparse"
    capacity_factor: float | None = None  # None = dropless
    eval_capacity_factor: float | None = None
    min_capacity: int = 0
    shared_expert: bool = False
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0


class FFNWidenConfig(StrictModel):
    """Function-preserving FFN widening at build time (minigem.llm.widen): the dense control with
    the active parameters of a top-k MoE (factor = top_k)."""

    factor: int = Field(2, ge=2)
    layers: Literal["sparse", "first_half", "second_half", "all"] | list[int] = "sparse"


class TokenizerTrainConfig(StrictModel):
    """Train a small BPE tokenizer at build time (for models built from scratch)."""

    # synth: the synthetic world's texts + the template's markers; synth+generation: also
    # generation requests/answers, with <GEN>, <h>, </h> as single (plain-text) tokens
    corpus: Literal["synth", "synth+generation"] = "synth"
    vocab_size: int = Field(512, ge=64)


class ModelConfig(StrictModel):
    """A whole vision-language model."""

    vision: VisionConfig = Field(default_factory=VisionConfig)
    vision_aux: VisionAuxConfig | None = None
    connector: ConnectorConfig = Field(default_factory=ConnectorConfig)
    llm: LLMConfig
    moe: MoEConfig | None = None
    ffn_widen: FFNWidenConfig | None = None  # widened FFNs (Net2Net), e.g. a dense MoE control
    tokenizer: str | None = None  # tokenizer directory; defaults to llm.path
    tokenizer_train: TokenizerTrainConfig | None = None  # or train one (when `tokenizer` is unset)
    template: str = "vicuna_v1"  # a template name, or "jinja" to use the tokenizer's chat_template
    system_prompt: str | None = None  # overrides the template's default system prompt
    image_token: str = "<image>"
    max_length: int = 2048


# ----------------------------------------------------------------------------- data


class SynthConfig(StrictModel):
    """Samples from the synthetic world, generated on the fly (deterministic per index)."""

    n: int = Field(10000, gt=0)
    seed: int = 0
    # render side in pixels; a list renders each record at one of its sizes (drawn per record)
    image_size: int | list[int] = 128
    tasks: list[str] | None = None  # categories to draw from; None = all
    mix: dict[str, float] | None = None  # category weights (overrides `tasks`); None = default mix
    max_turns: int = Field(4, ge=2)  # conversation records have 2..max_turns question-answer pairs
    # single-question records ask 1..qa_turns questions about their scene (categories by the mix)
    qa_turns: int = Field(1, ge=1)
    # in the scenes of glyph questions, the chance that each object carries a glyph (one always
    # does); 1.0 makes every glyph question a lookup among all the scene's glyphs
    glyph_fill: float = Field(0.5, ge=0.0, le=1.0)  # the world's own: synth.GLYPH_FILL
    # the chance that a scene of 2-4 objects draws them from 2 shapes x 2 colours, so that only
    # colour and shape together name an object (attribute binding); 0 = the world's scenes
    binding: float = Field(0.0, ge=0.0, le=1.0)
    # text-only records: the scene's caption stands in the user turn where the image would be
    # (pretrain an LLM on the world's questions without pixels; no image is rendered)
    scene_as_text: bool = False

    @field_validator("image_size")
    @classmethod
    def _sizes(cls, v: int | list[int]) -> int | list[int]:
        from minigem.data.synth import check_image_size

        check_image_size(v)
        return v


class DataConfig(StrictModel):
    path: str | None = None  # LLaVA JSON or JSONL
    image_folder: str | None = None
    synth: SynthConfig | None = None
    skip_bad: bool = False
    template: str | None = None  # overrides the model's template (e.g. "plain" for align)

    @model_validator(mode="after")
    def _source(self) -> DataConfig:
        if (self.path is None) == (self.synth is None):
            raise ValueError("set exactly one of `path` (LLaVA JSON) or `synth`")
        return self


# ----------------------------------------------------------------------------- training

Component = Literal["vision", "vision_aux", "connector", "mining", "projector", "llm", "moe",
                    "unet", "text_encoder"]  # the last two: `diffusion` stages (a `t2i` recipe)
T2I_COMPONENTS = ("unet", "text_encoder")


class ContrastiveConfig(StrictModel):
    """The throwaway text encoder and heads of a `contrastive` (CLIP-style) stage."""

    embed_dim: int = 128
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    max_text_tokens: int = 96
    temperature: float = 0.07  # initial; learnable
    # How the towers' feature maps become one image vector: `mean` (CLIP's average) or `max`
    # (per channel over all positions: a small detail anywhere in the image, a 5x7-pixel glyph,
    # drives its own channels instead of being averaged away).
    pool: Literal["mean", "max"] = "mean"


class GlyphStageConfig(StrictModel):
    """What the throwaway head of a `glyph` stage reads (minigem.training.glyph)."""

    # mined: each cell's LR token plus its mined HR detail (trains the HR tower and the mining);
    # projector: the projector's output for it, what the LLM sees (trains mining + projector)
    read: Literal["mined", "projector"] = "mined"
    # with read: projector, keep the projector's output for every cell (LR token + mined detail) near
    # the stage's starting projector's output for the LR token alone (relative MSE, this weight): the
    # LLM that learned the LR-only tokens still finds its objects when the detail is added
    keep_weight: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _keep(self) -> GlyphStageConfig:
        if self.keep_weight > 0 and self.read != "projector":
            raise ValueError("glyph.keep_weight keeps the projector's output: set glyph.read: projector")
        return self


class StageConfig(StrictModel):
    """One training stage: what trains, on which data, with which optimiser settings."""

    name: str
    # lm: next-token loss on the answers; contrastive: CLIP-style tower pretraining; glyph: HR tower +
    # mining on the synthetic world's per-object glyphs (minigem.training.glyph); diffusion: t2i
    kind: Literal["lm", "contrastive", "glyph", "diffusion"] = "lm"
    train: list[Component]
    data: DataConfig
    eval_data: DataConfig | None = None
    lr: float = Field(2e-5, gt=0)
    # per-component lr multipliers, e.g. {vision: 0.1}: those parameters train at lr * scale (a
    # tower fine-tuned gently next to a connector and LLM at the full lr, as LLaVA-NeXT does);
    # keys are components the stage trains, a parameter in several named ones needs one scale
    lr_scale: dict[Component, float] = Field(default_factory=dict)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)  # AdamW betas and eps (HF TrainingArguments names)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    steps: int | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0)
    max_grad_norm: float | None = 1.0
    # batches of records of similar length (less padding; HF TrainingArguments' name)
    group_by_length: bool = False
    # the LLM computes on real tokens only: the batch is packed into one row, attention
    # unpacks it per sequence (minigem.llm.padfree; same loss, less compute on padding)
    padding_free: bool = False
    upcycle: bool = False  # dense -> MoE transition at the start of this stage
    # end the stage with an exponential moving average of its trainable weights (minigem.training.ema)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    contrastive: ContrastiveConfig = Field(default_factory=ContrastiveConfig)  # kind=contrastive
    glyph: GlyphStageConfig = Field(default_factory=GlyphStageConfig)  # kind=glyph
    # false: a Mini-Gemini trains as its LR-only LLaVA (the HR tower is not run, the mining adds
    # nothing: the LLM sees the projector's output for the LR tokens alone); `lm` stages only
    use_hr: bool = True

    @model_validator(mode="after")
    def _budget(self) -> StageConfig:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of `steps` or `epochs`")
        if not self.use_hr and self.kind != "lm":
            raise ValueError(f"use_hr: false is for `lm` stages (this one is {self.kind!r})")
        if self.padding_free and self.kind != "lm":
            raise ValueError(f"padding_free is for `lm` stages (this one is {self.kind!r})")
        bad = {k: v for k, v in self.lr_scale.items() if k not in self.train or not v > 0}
        if bad:
            raise ValueError(f"lr_scale {bad}: each key must be a component the stage trains "
                             f"({', '.join(self.train)}) and each scale > 0")
        if self.kind == "glyph" and (self.data.synth is None or self.group_by_length or (
                self.eval_data is not None and self.eval_data.synth is None)):
            raise ValueError("a `glyph` stage draws its scenes from the synthetic world: give `data.synth` "
                             "(its seed, n and image_size are used; eval_data too) and no group_by_length")
        return self


class TrainingConfig(StrictModel):
    output_dir: str = "runs/minigem"
    seed: int = 0
    bf16: Literal["auto", "on", "off"] = "auto"
    gradient_checkpointing: bool = False
    log_every: int = Field(10, gt=0)
    save_every: int = Field(500, gt=0)  # optimizer steps between checkpoints
    # keep every stage-boundary checkpoint (checkpoints/stageK-step0000000) instead of pruning it
    keep_boundaries: bool = False
    eval_every: int | None = None
    num_workers: int = Field(0, ge=0)
    # start from a native checkpoint directory (model, tokenizer and `model` config come from it)
    init_from: str | None = None
    stages: list[StageConfig] = Field(min_length=1)


class T2IConfig(StrictModel):
    """A tiny pixel-space text-to-image model (minigem.imagegen.t2i.TinyT2IPipeline)."""

    resolution: int = Field(32, ge=8)  # images are resolution x resolution RGB
    render_size: int = 96  # scenes are drawn at this size, then downscaled (antialiased)
    unet: dict[str, Any] = Field(default_factory=dict)  # UNet2DConditionModel kwargs (overrides)
    text_encoder: dict[str, Any] = Field(default_factory=dict)  # CLIPTextConfig kwargs (overrides)
    vocab_size: int = Field(192, ge=128)  # prompt tokenizer (BPE over the prompt wording)
    max_text_tokens: int = Field(24, ge=4)
    train_timesteps: int = Field(1000, gt=0)
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    sampler: Literal["dpm", "ddim"] = "ddim"  # the scheduler saved in the pipeline (dpm: see docs/t2i.md)
    sample_steps: int = Field(25, gt=0)  # for the quality proxy during training
    guidance_scale: float = Field(4.0, ge=0)  # the proxy's, and saved as the pipeline's default
    cond_drop: float = Field(0.1, ge=0, lt=1)  # prompt -> "" (classifier-free guidance)
    proxy_prompts: int = Field(24, ge=0)  # colour-match proxy at each eval_every (0 = off)


class RecipeConfig(StrictModel):
    """A recipe: a model and the stages that train it. A VLM recipe sets `model`; a
    text-to-image recipe sets `t2i` instead and has only `diffusion` stages."""

    model: ModelConfig | None = None
    t2i: T2IConfig | None = None
    training: TrainingConfig

    @model_validator(mode="after")
    def _kind(self) -> RecipeConfig:
        if self.t2i is not None and self.training.init_from is not None:
            raise ValueError("training.init_from (a native VLM checkpoint) does not go with `t2i`")
        if (self.model is None) == (self.t2i is None):
            raise ValueError("set exactly one of `model` (a VLM) or `t2i` (a text-to-image model)"
                             " (or `training.init_from`, a native checkpoint directory)")
        for s in self.training.stages:
            diffusion = s.kind == "diffusion"
            if diffusion != (self.t2i is not None):
                raise ValueError(f"stage {s.name}: `diffusion` stages go with a `t2i` model, and only they")
            if diffusion and (s.data.synth is None or any(c not in T2I_COMPONENTS for c in s.train)):
                raise ValueError(f"stage {s.name}: a diffusion stage trains {list(T2I_COMPONENTS)} "
                                 "on `synth` data")
            if diffusion and s.group_by_length:
                raise ValueError(f"stage {s.name}: group_by_length is for `lm` and `contrastive` "
                                 "stages (a diffusion stage's prompts are all short)")
            if not diffusion and any(c in T2I_COMPONENTS for c in s.train):
                raise ValueError(f"stage {s.name}: {list(T2I_COMPONENTS)} are trained by diffusion stages")
        return self


# ----------------------------------------------------------------------------- loading


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def validate(cls: type[BaseModel], data: dict[str, Any], source: str = "config") -> Any:
    """Validate a raw mapping as `cls`, raising ConfigError with key paths."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``a.b.c=value`` override in place.

    List elements are addressed by index or, for lists of mappings with a ``name``, by name.
    """
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected KEY=VALUE (e.g. training.seed=1)")
    key, _, raw = override.partition("=")
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        node = _step(node, part, ".".join(parts[: i + 1]), create=True)
    last = parts[-1]
    value = _parse_value(raw)
    if isinstance(node, list):
        node[_list_index(node, last, key)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override {key}: {'.'.join(parts[:-1])} is not a mapping")


def _list_index(node: list[Any], part: str, path: str) -> int:
    if part.lstrip("-").isdigit():
        idx = int(part)
        if not -len(node) <= idx < len(node):
            raise ConfigError(f"override {path}: index {idx} out of range (len {len(node)})")
        return idx
    for i, item in enumerate(node):
        if isinstance(item, dict) and item.get("name") == part:
            return i
    names = [item.get("name") for item in node if isinstance(item, dict)]
    raise ConfigError(f"override {path}: no list element named {part!r}; names: {names}")


def _step(node: Any, part: str, path: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, part, path)]
    if isinstance(node, dict):
        if part not in node or node[part] is None:
            if not create:
                raise ConfigError(f"override {path}: no such key")
            node[part] = {}
        return node[part]
    raise ConfigError(f"override {path}: cannot index into a {type(node).__name__}")


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RecipeConfig:
    """Load a recipe YAML, apply dotted overrides, validate."""
    data = read_yaml(path)
    for ov in overrides or []:
        apply_override(data, ov)
    resolve_init_from(data, str(path))
    return validate(RecipeConfig, data, str(path))


# `model` fields a recipe with `training.init_from` may set: everything else is the checkpoint's
FINETUNE_MODEL_FIELDS = ("moe", "template", "system_prompt", "max_length")


def resolve_init_from(data: dict[str, Any], source: str = "recipe") -> None:
    """With ``training.init_from: DIR``, make ``data["model"]`` the effective model config, in place:
    the checkpoint's config plus the recipe's `model` fields that fine-tuning may change
    (FINETUNE_MODEL_FIELDS). Any other `model` field is an error unless it equals the checkpoint's
    value (so a saved, resolved recipe loads again). No-op without `init_from`.
    """
    training = data.get("training")
    init_from = training.get("init_from") if isinstance(training, dict) else None
    if init_from is None:
        return
    from minigem.checkpoints.native import read_config
    from minigem.errors import CheckpointError

    try:
        ckpt = read_config(Path(str(init_from)).expanduser())
    except CheckpointError as err:
        raise ConfigError(f"{source}: training.init_from: {err}") from None
    base = ckpt.model_dump(mode="json")
    given = data.get("model") or {}
    if not isinstance(given, dict):
        raise ConfigError(f"{source}: model: expected a mapping")
    allowed = ", ".join(f"model.{f}" for f in FINETUNE_MODEL_FIELDS)
    for key, value in given.items():
        if key in FINETUNE_MODEL_FIELDS:
            continue
        bad = _first_difference(value, base.get(key), f"model.{key}")
        if bad is not None:
            path, have = bad
            raise ConfigError(
                f"{source}: {path}: comes from the checkpoint (training.init_from={init_from}, "
                f"which has {have!r}); with init_from a recipe's `model` section may set only "
                f"{allowed}")
    effective = dict(base)
    for key in FINETUNE_MODEL_FIELDS:
        if key in given:
            effective[key] = given[key]
    if ckpt.moe is not None and "moe" in given:
        want = given["moe"] if isinstance(given["moe"], dict) else {}
        for f in ("num_experts", "layers", "shared_expert"):
            if f in want and _first_difference(want[f], base["moe"][f], "") is not None:
                raise ConfigError(
                    f"{source}: model.moe.{f}: comes from the checkpoint (training.init_from="
                    f"{init_from} is a MoE model with {f}={base['moe'][f]!r})")
        effective["moe"] = {**base["moe"], **want} if given["moe"] is not None else None
        if effective["moe"] is None:
            raise ConfigError(f"{source}: model.moe: the checkpoint (training.init_from={init_from}) "
                              "is a MoE model; it cannot be made dense")
    data["model"] = effective


def _first_difference(value: Any, have: Any, path: str) -> tuple[str, Any] | None:
    """(dotted path, checkpoint value) of the first place `value` is not (a subset of) `have`."""
    if isinstance(value, dict) and isinstance(have, dict):
        for k, v in value.items():
            bad = _first_difference(v, have.get(k), f"{path}.{k}")
            if bad is not None:
                return bad
        return None
    if isinstance(value, list | tuple) and isinstance(have, list | tuple):
        if len(value) == len(have) and all(
                _first_difference(a, b, path) is None for a, b in zip(value, have, strict=True)):
            return None
        return path, have
    return None if value == have else (path, have)


def dump_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
