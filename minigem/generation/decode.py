"""Batched decoding with a KV cache: left padding, greedy / temperature / top-p, stop strings.

One prefill over the left-padded batch, then one token per step for every unfinished row.
Rows that finish (EOS, stop string, max tokens, or cancelled by the callback) stop growing;
the loop ends when all rows have finished.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from minigem.errors import MinigemError
from minigem.llm.backbone import cache_kwarg


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise MinigemError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise MinigemError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MinigemError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)


@dataclass
class Generation:
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" | "length" | "cancelled"
    prompt_tokens: int = 0


# on_token(row, generation_so_far) -> False to cancel that row
TokenCallback = Callable[[int, Generation], bool | None]


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, S] left-padded with pad_id, attention mask [B, S]."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def sample_next(logits: torch.Tensor, gen: GenerationConfig, rng: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> next ids [B]."""
    if gen.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / gen.temperature, dim=-1)
    if gen.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        cum = sorted_p.cumsum(-1)
        drop = cum - sorted_p > gen.top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=rng).squeeze(-1)


def _stop_token_ids(tokenizer, stops: tuple[str, ...]) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for s in stops:
        tid = tokenizer.convert_tokens_to_ids(s)
        if tid is not None and tid != tokenizer.unk_token_id and s in tokenizer.all_special_tokens:
            ids.add(tid)
    return ids


@torch.inference_mode()
def generate(
    model,
    prompts: list[list[int]],
    pixel_values: torch.Tensor | None,
    pixel_values_aux: torch.Tensor | None,
    gen: GenerationConfig,
    on_token: TokenCallback | None = None,
) -> list[Generation]:
    """Generate continuations for a batch of prompt ids (image tokens already expanded)."""
    tok = model.tokenizer
    device = model.device
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    if pixel_values is not None:
        pixel_values = pixel_values.to(device, model.dtype)
    if pixel_values_aux is not None:
        pixel_values_aux = pixel_values_aux.to(device, model.dtype)
    rng = None
    if gen.seed is not None:
        rng = torch.Generator(device=device).manual_seed(gen.seed)
    stop_ids = _stop_token_ids(tok, gen.stop)
    text_stops = tuple(s for s in gen.stop if s)

    b = len(prompts)
    outs = [Generation(text="", prompt_tokens=len(p)) for p in prompts]
    done = torch.zeros(b, dtype=torch.bool)
    cache = DynamicCache()
    out = model(ids, attention_mask=mask, pixel_values=pixel_values,
                pixel_values_aux=pixel_values_aux, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    positions = mask.sum(-1, keepdim=True) - 1  # [B, 1] position of the last prompt token
    for step in range(gen.max_new_tokens):
        nxt = sample_next(out.logits[:, -1], gen, rng)  # [B]
        nxt = torch.where(done.to(device), torch.full_like(nxt, pad_id), nxt)
        for i, t in enumerate(nxt.tolist()):
            if done[i]:
                continue
            o = outs[i]
            if t in stop_ids:
                o.finish_reason, done[i] = "stop", True
                continue
            o.token_ids.append(t)
            o.text = tok.decode(o.token_ids, skip_special_tokens=True)
            cut = min((o.text.index(s) for s in text_stops if s in o.text), default=None)
            if cut is not None:  # the earliest stop string wins, whatever the list order
                o.text = o.text[:cut]
                o.finish_reason, done[i] = "stop", True
            if on_token is not None and on_token(i, o) is False:
                o.finish_reason, done[i] = "cancelled", True
        if bool(done.all()) or step == gen.max_new_tokens - 1:
            break
        mask = torch.cat([mask, (~done).long().to(device).unsqueeze(1)], dim=1)
        positions = positions + 1
        out = model.language_model(
            input_ids=nxt.unsqueeze(1), attention_mask=mask, position_ids=positions,
            use_cache=True, logits_to_keep=1, **{cache_kwarg(model.language_model): cache},
        )
    return outs
