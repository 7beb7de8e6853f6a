"""Step-wise batched decoding for serving: rows join and leave the batch at any step.

``DecodeBatch`` holds the rows being decoded together: their KV cache (per layer
[B, H, S, D]), a left-padded attention mask [B, S], the next position of every row [B, 1]
and the next-token logits [B, V]. ``add`` prefills a group of new rows (one batched forward,
images included) and merges them into the running batch by left-padding the shorter cache;
``step`` samples one token per row with the row's own settings and drops finished rows,
trimming columns that only padding still uses. So a long request never holds short ones
back, and a new one starts at the next step (continuous batching).

Same decoding rules as ``minigem.generation.decode.generate`` (stop tokens, stop strings,
max tokens, cancellation by the callback); each row has its own ``GenerationConfig`` and,
with a seed, its own random generator, so its output does not depend on its neighbours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from minigem.generation.decode import (
    Generation,
    GenerationConfig,
    _stop_token_ids,
    left_pad,
    sample_next,
)
from minigem.llm.backbone import cache_kwarg

# on_token(generation_so_far) -> False to cancel the row
RowCallback = Callable[[Generation], bool | None]


@dataclass
class Row:
    """One sequence being decoded; ``tag`` is the caller's handle (e.g. a request)."""

    gen: GenerationConfig
    on_token: RowCallback | None = None
    tag: object = None
    out: Generation = field(default_factory=lambda: Generation(text=""))
    stop_ids: set[int] = field(default_factory=set)
    text_stops: tuple[str, ...] = ()
    rng: torch.Generator | None = None

    def accept(self, token: int, tokenizer) -> bool:
        """Append a sampled token; True when the row has finished."""
        o = self.out
        if token in self.stop_ids:
            o.finish_reason = "stop"
            return True
        o.token_ids.append(token)
        o.text = tokenizer.decode(o.token_ids, skip_special_tokens=True)
        cut = min((o.text.index(s) for s in self.text_stops if s in o.text), default=None)
        if cut is not None:  # the earliest stop string wins, whatever the list order
            o.text = o.text[:cut]
            o.finish_reason = "stop"
            return True
        if self.on_token is not None and self.on_token(o) is False:
            o.finish_reason = "cancelled"
            return True
        if len(o.token_ids) >= self.gen.max_new_tokens:
            o.finish_reason = "length"
            return True
        return False


def _lpad(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Left-pad ``x`` with zeros along ``dim`` (counted from the end) to ``width``."""
    extra = width - x.shape[dim]
    if extra == 0:
        return x
    pad = [0, 0] * (-dim - 1) + [extra, 0]
    return F.pad(x, pad)


class DecodeBatch:
    """The running batch of a continuous-batching engine (one thread drives it)."""

    def __init__(self, model) -> None:
        self.model = model
        tok = model.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.rows: list[Row] = []
        self._clear()

    def _clear(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [B, S]
        self.positions: torch.Tensor | None = None  # [B, 1]
        self.logits: torch.Tensor | None = None  # [B, V]

    def __len__(self) -> int:
        return len(self.rows)

    def can_join(self) -> bool:
        """New rows can join now: the batch is empty, or its cache can be merged into."""
        return self.cache is None or all(type(layer) is DynamicLayer for layer in self.cache.layers)

    @torch.inference_mode()
    def add(
        self,
        prompts: list[list[int]],
        pixel_values: torch.Tensor | None,
        pixel_values_aux: torch.Tensor | None,
        rows: list[Row],
    ) -> None:
        """Prefill ``rows`` (prompt ids with image tokens expanded) and join the batch."""
        model, device = self.model, self.model.device
        ids, mask = left_pad(prompts, self.pad_id)
        ids, mask = ids.to(device), mask.to(device)
        if pixel_values is not None:
            pixel_values = pixel_values.to(device, model.dtype)
        if pixel_values_aux is not None:
            pixel_values_aux = pixel_values_aux.to(device, model.dtype)
        cache = DynamicCache()
        out = model(ids, attention_mask=mask, pixel_values=pixel_values,
                    pixel_values_aux=pixel_values_aux, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        positions = mask.sum(-1, keepdim=True) - 1  # [b, 1] position of the last prompt token
        for row, p in zip(rows, prompts, strict=True):
            row.out.prompt_tokens = len(p)
            row.stop_ids = _stop_token_ids(model.tokenizer, row.gen.stop)
            row.text_stops = tuple(s for s in row.gen.stop if s)
            if row.gen.seed is not None:
                row.rng = torch.Generator(device=device).manual_seed(row.gen.seed)
        logits = out.logits[:, -1]  # [b, V]
        if self.cache is None:
            self.cache, self.mask, self.positions, self.logits = cache, mask, positions, logits
        else:
            self._merge(cache, mask, positions, logits)
        self.rows += rows

    def _merge(self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor,
               logits: torch.Tensor) -> None:
        """Append prefilled rows: both caches left-padded to the longer length, then stacked."""
        assert self.cache is not None and self.mask is not None
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, new in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_lpad(mine.keys, width, -2), _lpad(new.keys, width, -2)])
            mine.values = torch.cat([_lpad(mine.values, width, -2), _lpad(new.values, width, -2)])
        self.mask = torch.cat([_lpad(self.mask, width, -1), _lpad(mask, width, -1)])
        self.positions = torch.cat([self.positions, positions])
        self.logits = torch.cat([self.logits, logits])

    def _sample(self) -> torch.Tensor:
        """One next token per row [B], each with its row's settings."""
        assert self.logits is not None
        nxt = self.logits.argmax(-1)  # [B]
        for i, row in enumerate(self.rows):
            if row.gen.temperature > 0:
                nxt[i] = sample_next(self.logits[i : i + 1], row.gen, row.rng)[0]
        return nxt

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """Advance every row by one token; return the rows that finished (now removed)."""
        if not self.rows:
            return []
        nxt = self._sample()
        tok = self.model.tokenizer
        done = [row.accept(t, tok) for row, t in zip(self.rows, nxt.tolist(), strict=True)]
        finished = [r for r, d in zip(self.rows, done, strict=True) if d]
        keep = [i for i, d in enumerate(done) if not d]
        if not keep:
            self.rows = []
            self._clear()
            return finished
        assert self.cache is not None and self.mask is not None and self.positions is not None
        if finished:
            idx = torch.tensor(keep, device=nxt.device)
            self.rows = [self.rows[i] for i in keep]
            self.cache.batch_select_indices(idx)
            self.mask, self.positions, nxt = self.mask[idx], self.positions[idx], nxt[idx]
            self._trim()
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(keep), 1))], dim=1)
        self.positions = self.positions + 1
        out = self.model.language_model(
            input_ids=nxt.unsqueeze(1), attention_mask=self.mask, position_ids=self.positions,
            use_cache=True, logits_to_keep=1, **{cache_kwarg(self.model.language_model): self.cache},
        )
        self.logits = out.logits[:, -1]
        return finished

    def _trim(self) -> None:
        """Drop leading columns that no remaining row attends to."""
        assert self.mask is not None and self.cache is not None
        unused = int((self.mask.sum(0) == 0).long().cumprod(0).sum())
        if unused == 0 or not self.can_join():
            return
        self.mask = self.mask[:, unused:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[..., unused:, :]
            layer.values = layer.values[..., unused:, :]

    def cancel_all(self, reason: str = "cancelled") -> list[Row]:
        """Stop every row (e.g. on shutdown); return them."""
        rows, self.rows = self.rows, []
        for r in rows:
            r.out.finish_reason = reason
        self._clear()
        return rows
