"""Padding-free training: the LLM computes on a batch's real tokens only.

A right-padded batch ``[B, S]`` holding ``T`` real tokens is packed into one row ``[1, T]``.
Every per-token layer (norms, Q/K/V/O projections, the MLP or MoE experts, the LM head) then
costs ``T`` rows instead of ``B * S``; in the bundled recipe about half of every batch is
padding. Attention is the only layer that mixes tokens: it scatters Q, K and V back to
``[B, H, S, d]`` and runs causal SDPA there, so each sequence attends to exactly its own
prefix, as in the padded batch (with right padding a real token's causal prefix holds no pad).
Position ids restart at 0 for every sequence, as the padded batch's do.

It works through the HF attention interface, so any HF causal LM whose decoder layers pass the
forward's keywords on to ``ALL_ATTENTION_FUNCTIONS`` (Llama, Qwen2, Mistral, Phi, ...; not
StableLM in transformers 5.x, which gets a clear error from `check_used`) gets it: the LLM's
attention implementation becomes ``minigem_padfree``, which is plain SDPA for calls that do not
pass a ``packing`` (generation, evaluation), and the packed path for calls that do. The packing
travels as a forward keyword, so gradient checkpointing's recomputation sees it too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from minigem.errors import ConfigError, DataError

NAME = "minigem_padfree"


@dataclass
class Packing:
    """Where a right-padded batch's real tokens are: ``index`` [T] into the flat [B*S] layout."""

    index: torch.Tensor
    batch: int
    seqlen: int
    used: bool = False  # set by the attention: a forward that left it False attended unpacked

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> Packing:
        """From a [B, S] 0/1 mask; every row must be right-padded (real tokens first)."""
        mask = attention_mask.bool()
        b, s = mask.shape
        lengths = mask.sum(1)
        prefix = torch.arange(s, device=mask.device).unsqueeze(0) < lengths.unsqueeze(1)
        if not torch.equal(mask, prefix):
            bad = (mask != prefix).any(1).nonzero()[0].item()
            raise DataError(
                f"padding_free: row {bad} of the batch is not right-padded (its attention mask has "
                f"a 0 before a 1); padding-free training packs right-padded batches only"
            )
        return cls(mask.flatten().nonzero().squeeze(1), b, s)

    @property
    def tokens(self) -> int:
        return int(self.index.numel())

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, ...] -> [1, T, ...]: the real positions, row after row."""
        return x.flatten(0, 1).index_select(0, self.index).unsqueeze(0)

    def to_padded(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [B, S, ...] with zeros at the padded positions."""
        out = x.new_zeros((self.batch * self.seqlen, *x.shape[1:]))
        return out.index_copy(0, self.index, x).view(self.batch, self.seqlen, *x.shape[1:])

    def position_ids(self) -> torch.Tensor:
        """[1, T]: each sequence's own positions 0..len-1."""
        pos = torch.arange(self.seqlen, device=self.index.device).repeat(self.batch)
        return pos.index_select(0, self.index).unsqueeze(0)


def padfree_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, packing: Packing | None = None, **kwargs):
    """HF attention interface: [1, H, T, d] packed q/k/v -> [1, T, H, d]; SDPA when unpacked."""
    if packing is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    window = kwargs.get("sliding_window")
    if window is not None and window < packing.seqlen:  # a window longer than the rows changes nothing
        raise ConfigError(f"padding_free: this LLM's attention has a sliding window of {window} tokens, "
                          f"shorter than the batch's {packing.seqlen}; the packed attention does not "
                          f"implement windows: set padding_free: false")
    for opt in ("softcap", "s_aux"):
        if kwargs.get(opt) is not None:
            raise ConfigError(f"padding_free: this LLM's attention uses {opt}, which the packed "
                              f"attention does not implement; set padding_free: false")

    def unpack(x: torch.Tensor) -> torch.Tensor:  # [1, h, T, d] -> [B, h, S, d]
        return packing.to_padded(x[0].transpose(0, 1)).transpose(1, 2)

    packing.used = True
    q, k, v = unpack(query), unpack(key), unpack(value)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling,
                                         enable_gqa=q.shape[1] != k.shape[1])  # [B, H, S, d]
    out = out.transpose(1, 2).flatten(0, 1).index_select(0, packing.index)  # [T, H, d]
    return out.unsqueeze(0), None


AttentionInterface.register(NAME, padfree_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def enable(llm: PreTrainedModel) -> str | None:
    """Switch `llm` to the padding-free attention; returns the implementation it had before."""
    prev = llm.config._attn_implementation
    if prev != NAME:
        try:
            llm.set_attn_implementation(NAME)
        except (ValueError, KeyError) as err:
            raise ConfigError(f"padding_free: {type(llm).__name__} cannot switch its attention "
                              f"implementation ({err}); set padding_free: false") from None
    return prev


def check_used(llm: PreTrainedModel, packing: Packing) -> None:
    """After a packed forward: attention that never saw the packing (it bypasses the interface, or
    its decoder layers drop forward keywords, as StableLM's do) attended across sequences."""
    if not packing.used:
        raise ConfigError(f"padding_free: {type(llm).__name__}'s attention layers do not call HF's "
                          f"attention interface with the forward's keywords, so a packed batch "
                          f"attended across sequences; set padding_free: false")


def disable(llm: PreTrainedModel, prev: str | None) -> None:
    """Undo `enable` (back to `prev`, the implementation `enable` returned)."""
    if prev not in (None, NAME) and llm.config._attn_implementation == NAME:
        llm.set_attn_implementation(prev)
