"""Build the model a recipe starts from (tokenizer + components), deterministically."""

from __future__ import annotations

from pathlib import Path

import torch

from minigem.config import ModelConfig, RecipeConfig
from minigem.errors import CheckpointError


def load_recipe_tokenizer(cfg: ModelConfig):
    """The tokenizer named by `model.tokenizer`, else the LLM directory's."""
    from transformers import AutoTokenizer

    src = cfg.tokenizer or cfg.llm.path
    if src is None and cfg.tokenizer_train is not None:
        return train_world_tokenizer(cfg)
    if src is None:
        raise CheckpointError(
            "no tokenizer: set model.tokenizer to a tokenizer directory "
            "(or model.llm.path to a model directory that has one)"
        )
    path = Path(src)
    if not path.is_dir():
        raise CheckpointError(f"model.tokenizer: {path} is not a directory")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"model.tokenizer: cannot load a tokenizer from {path}: {err}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def build_for_recipe(recipe: RecipeConfig, resume: bool = False):
    """A fresh model for the recipe's first stage (dense if a later stage upcycles to MoE).

    With `training.init_from`, the model and tokenizer are loaded from that native checkpoint
    (`recipe.model` is then the effective config: the checkpoint's plus the recipe's fine-tuning
    fields, see `config.resolve_init_from`); with `resume` and a checkpoint of the run's own, from
    that one instead (the trainer loads its weights), so init_from is needed only for a fresh start.
    """
    from minigem.model import VisionLanguageModel

    if recipe.training.init_from is not None:
        return load_for_finetune(recipe, resume)
    cfg = recipe.model.model_copy(deep=True)
    if any(s.upcycle for s in recipe.training.stages):
        cfg.moe = None
    torch.manual_seed(recipe.training.seed)
    if cfg.tokenizer_train is not None and cfg.tokenizer_train.corpus == "synth" and any(
        s.data.synth is not None and "generation" in (s.data.synth.mix or s.data.synth.tasks or ())
        for s in recipe.training.stages
    ):
        import logging

        logging.getLogger(__name__).warning(
            "a stage trains on synthetic `generation` records but model.tokenizer_train.corpus is "
            "'synth': <GEN>, <h> and </h> take 3 tokens each; use corpus: synth+generation")
    tok = load_recipe_tokenizer(cfg)
    return VisionLanguageModel.build(cfg, tok)


def train_world_tokenizer(cfg: ModelConfig):
    """A BPE tokenizer trained on the synthetic world's texts and the template's rendering."""
    from minigem.chat import get_template, train_tokenizer
    from minigem.data.records import Message
    from minigem.data.synth import world_texts

    generation = cfg.tokenizer_train.corpus == "synth+generation"
    texts = list(world_texts(generation=generation))
    tpl = get_template(cfg.template)
    for q, a in zip(texts[::2], texts[1::2], strict=False):
        msgs = [Message("user", f"{cfg.image_token}\n{q}"), Message("assistant", a)]
        texts.append(tpl.render_text(msgs, system=cfg.system_prompt))
    tok = train_tokenizer(texts, vocab_size=cfg.tokenizer_train.vocab_size,
                          extra_special_tokens=[cfg.image_token])
    if generation:  # one id each, but plain text: decoding with skip_special_tokens keeps them
        from tokenizers import AddedToken

        from minigem.data.synth import GEN_TOKEN, SPAN_CLOSE, SPAN_OPEN

        tok.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t in (GEN_TOKEN, SPAN_OPEN, SPAN_CLOSE)])
    return tok


def load_for_finetune(recipe: RecipeConfig, resume: bool = False):
    """The model of `training.init_from` with the recipe's fine-tuning fields applied."""
    from minigem.chat import ensure_special_tokens, get_template
    from minigem.checkpoints.native import load_model
    from minigem.errors import ConfigError
    from minigem.training.checkpoint import latest_checkpoint

    src = Path(recipe.training.init_from).expanduser()
    own = latest_checkpoint(recipe.training.output_dir) if resume else None
    torch.manual_seed(recipe.training.seed)
    if own is not None:  # the run's own checkpoint (dense or MoE, as saved): its config is final
        return load_model(own)
    try:
        model = load_model(src)
    except CheckpointError as err:
        raise CheckpointError(f"training.init_from: {err}") from None
    cfg = recipe.model.model_copy(deep=True)
    upcycle = any(s.upcycle for s in recipe.training.stages)
    if upcycle:
        if model.config.moe is not None:
            raise ConfigError(f"training.init_from={src} is already a MoE model: drop `upcycle` "
                              "from the recipe's stages (train [moe] to tune its experts)")
        if cfg.moe is None:
            raise ConfigError("an `upcycle` stage needs model.moe (the experts to create)")
        cfg.moe = None  # the trainer upcycles at the start of that stage
    elif model.config.moe is None and cfg.moe is not None:
        raise ConfigError(f"model.moe: training.init_from={src} is a dense model; turning it into "
                          "MoE needs a stage with `upcycle: true`")
    if cfg.template != model.config.template:
        template = get_template(cfg.template)
        ensure_special_tokens(model.tokenizer, [cfg.image_token, *template.special_tokens])
        lm = model.language_model
        if lm.get_input_embeddings().num_embeddings < len(model.tokenizer):
            lm.resize_token_embeddings(len(model.tokenizer), mean_resizing=False)
            cfg.llm.config["vocab_size"] = lm.config.vocab_size
        model.template = template
    model.config = cfg
    return model
