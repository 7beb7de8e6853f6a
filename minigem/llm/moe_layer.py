"""The sparse mixture-of-experts FFN layer (MoE-LLaVA): router, experts, grouped dispatch.

A `SparseMoE` replaces a decoder layer's `mlp` module and keeps its call signature
(`[B, S, H] -> [B, S, H]`), so HF decoder layers call it unchanged. Each expert is a deep copy
of the host FFN module (gated SwiGLU `gate/up/down_proj`, Phi `fc1/fc2`, anything), so a
freshly upcycled layer computes exactly the dense FFN.

Routing (always fp32, deterministic, no noise): logits = x @ W_r^T, softmax, top-k, the k gates
renormalised to sum 1. Dropless by default; with a capacity factor each expert takes at most
ceil(T / E * cf * k) assignments (at least `min_capacity`), first-choice assignments before
second choices, each in token order; overflow assignments contribute 0 (the decoder layer's
residual carries the token).

Aux-loss channel: every forward stores `self.aux_loss` (0-dim fp32 tensor, already multiplied by
its coefficients: aux_loss_coef * balance + z_loss_coef * z; None in no-grad eval, where it is
skipped) and `self.load` (assignments kept per expert) / `self.dropped`.
`minigem.llm.moe.collect_aux_loss(model)` sums them.
"""

from __future__ import annotations

import copy
import math
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from minigem.config import MoEConfig
from minigem.errors import ConfigError


def validate_moe_config(cfg: MoEConfig, key: str = "model.moe") -> None:
    """Raise ConfigError (naming the key) for settings that cannot build a working MoE layer."""
    if cfg.num_experts < 1:
        raise ConfigError(f"{key}.num_experts={cfg.num_experts}: need at least 1 expert")
    if not 1 <= cfg.top_k <= cfg.num_experts:
        raise ConfigError(
            f"{key}.top_k={cfg.top_k}: must be between 1 and num_experts={cfg.num_experts}"
        )
    for name in ("capacity_factor", "eval_capacity_factor"):
        cf = getattr(cfg, name)
        if cf is not None and cf <= 0 and cfg.min_capacity < 1:
            raise ConfigError(
                f"{key}.{name}={cf} with min_capacity={cfg.min_capacity} gives a capacity of "
                "0 tokens per expert (every token dropped); use a factor > 0, or null for dropless"
            )
    if cfg.min_capacity < 0:
        raise ConfigError(f"{key}.min_capacity={cfg.min_capacity}: must be >= 0")
    if cfg.aux_loss_coef < 0 or cfg.z_loss_coef < 0:
        raise ConfigError(f"{key}: aux_loss_coef and z_loss_coef must be >= 0")


def expert_capacity(
    num_tokens: int, num_experts: int, top_k: int, factor: float, minimum: int
) -> int:
    """MoE-LLaVA / DeepSpeed capacity: ceil(T / E * cf * k), at least `minimum`."""
    return max(math.ceil(num_tokens / num_experts * factor * top_k), minimum)


class SparseMoE(nn.Module):
    """Top-k routed experts (copies of `ffn`), optional shared expert; drop-in for an `mlp`."""

    def __init__(self, ffn: nn.Module, hidden_size: int, cfg: MoEConfig) -> None:
        super().__init__()
        validate_moe_config(cfg)
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.capacity_factor = cfg.capacity_factor
        self.eval_capacity_factor = cfg.eval_capacity_factor
        self.min_capacity = cfg.min_capacity
        self.aux_loss_coef = cfg.aux_loss_coef
        self.z_loss_coef = cfg.z_loss_coef
        ref = next(ffn.parameters(), None)
        device = ref.device if ref is not None else None
        # Upcycling: every expert starts as an exact copy of the dense FFN.
        self.experts = nn.ModuleList(copy.deepcopy(ffn) for _ in range(cfg.num_experts))
        # Bias-free router, stored and computed in fp32 (like DeepSpeed's TopKGate.wg).
        self.router = nn.Linear(
            hidden_size, cfg.num_experts, bias=False, device=device, dtype=torch.float32
        )
        self.shared_expert: nn.Module | None = None
        self.shared_coef: nn.Linear | None = None
        if cfg.shared_expert:
            # DeepSpeed "residual MoE" (MoE-LLaVA `use_residual`): out = moe * c0 + shared * c1,
            # c = softmax(Linear(H, 2)(x)); a convex mix, so upcycling stays exact.
            self.shared_expert = copy.deepcopy(ffn)
            self.shared_coef = nn.Linear(hidden_size, 2, device=device, dtype=torch.float32)
        self.aux_loss: torch.Tensor | None = None  # last forward's weighted aux loss (0-dim fp32)
        self.load: list[int] = []  # last forward's kept assignments per expert
        self.dropped: int = 0  # last forward's assignments dropped by the capacity limit

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, capacity_factor={self.capacity_factor}"

    def capacity(self, num_tokens: int) -> int | None:
        """Per-expert capacity for `num_tokens` tokens in the current mode; None = dropless."""
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor is None:
            return None
        return expert_capacity(num_tokens, self.num_experts, self.top_k, factor, self.min_capacity)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H] -> logits [T, E] fp32, gates [T, k] fp32 (sum 1), expert ids [T, k] int64."""
        logits = F.linear(x.float(), self.router.weight.float())  # [T, E]
        probs = logits.softmax(dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)  # [T, k]
        gates = top_p / top_p.sum(dim=-1, keepdim=True)
        return logits, gates, top_i

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [B, S, H] -> [B, S, H] (any leading shape works)."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [T, H]
        logits, gates, top_i = self.route(x)
        # Aux loss in training mode or with autograd on; skipped in no-grad eval (generation).
        want_aux = self.training or torch.is_grad_enabled()
        self.aux_loss = self._aux_loss(logits, top_i) if want_aux else None
        out = self._dispatch(x, gates, top_i)  # [T, H]
        if self.shared_expert is not None and self.shared_coef is not None:
            coef = F.linear(
                x.float(), self.shared_coef.weight.float(), self.shared_coef.bias.float()
            )
            coef = coef.softmax(dim=-1)  # [T, 2]
            shared = self.shared_expert(x).float()
            out = out.float() * coef[:, :1] + shared * coef[:, 1:]
        return out.to(hidden_states.dtype).reshape(shape)

    def _dispatch(self, x: torch.Tensor, gates: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
        """Sort-based grouped dispatch: x [T, H], gates/top_i [T, k] -> y [T, H].

        One stable argsort of the flat expert ids, one host sync (per-expert counts), one gather,
        one call per expert on its contiguous slice, one index_add_ back.
        """
        num_tokens, num_e = x.shape[0], self.num_experts
        if num_tokens == 0:
            self.load, self.dropped = [0] * num_e, 0
            return x.new_zeros(x.shape, dtype=torch.float32)
        # k-major flattening: in each expert's queue all first choices precede second choices.
        flat_e = top_i.t().reshape(-1)  # [k*T]
        flat_gate = gates.t().reshape(-1)  # [k*T]
        order = torch.argsort(flat_e, stable=True)  # [k*T], grouped by expert
        counts = torch.bincount(flat_e, minlength=num_e).tolist()  # the one host sync
        cap = self.capacity(num_tokens)
        if cap is not None and max(counts, default=0) > cap:
            starts = [0, *accumulate(counts)][:-1]
            kept = [min(c, cap) for c in counts]
            order = torch.cat([order[s : s + c] for s, c in zip(starts, kept, strict=True)])
            self.dropped = sum(counts) - sum(kept)
            counts = kept
        else:
            self.dropped = 0
        self.load = counts
        token = order % num_tokens  # [N] source token of each kept assignment
        xs = x.index_select(0, token)  # [N, H], gathered once, contiguous per expert
        grad = torch.is_grad_enabled()
        outs = []
        for expert, chunk, n in zip(self.experts, xs.split(counts), counts, strict=True):
            # With grad on, idle experts still run on 0 rows so every parameter is in the graph
            # (DDP-safe); in inference they are skipped (decode touches only k experts).
            if n > 0 or grad:
                outs.append(expert(chunk))
        ys = torch.cat(outs).float() * flat_gate.index_select(0, order).unsqueeze(-1)  # [N, H]
        out = torch.zeros(num_tokens, x.shape[-1], dtype=torch.float32, device=x.device)
        return out.index_add_(0, token, ys)

    def _aux_loss(self, logits: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
        """Weighted aux loss from logits [T, E] fp32, top_i [T, k]: a 0-dim fp32 tensor.

        balance = E * sum_i mean_t(prob[t, i]) * frac_t(top1[t] == i)   (MoE-LLaVA / GShard)
        z       = mean_t(logsumexp(logits[t])^2)                        (ST-MoE router z-loss)
        """
        total = logits.new_zeros(())
        if logits.shape[0] == 0:
            return total
        if self.aux_loss_coef > 0:
            mean_prob = logits.softmax(dim=-1).mean(dim=0)  # [E]
            frac_top1 = torch.bincount(top_i[:, 0], minlength=self.num_experts).float()
            frac_top1 = frac_top1 / top_i.shape[0]  # [E]
            total = total + self.aux_loss_coef * self.num_experts * (mean_prob * frac_top1).sum()
        if self.z_loss_coef > 0:
            total = total + self.z_loss_coef * logits.logsumexp(dim=-1).square().mean()
        return total
