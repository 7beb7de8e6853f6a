"""Mini-Gemini patch info mining: each low-res token attends to its own M x M sub-region
of the high-res feature map, and the result refines the token before the projector.

    T = MLP(Q + softmax(phi_q(Q) phi_k(K)^T / sqrt(C)) phi_v(V))

Q: low-res tokens [B, N, C]; K = V: the HR map [B, C_hr, H, W] with H = W = M * sqrt(N),
token i at grid (r, c) owning cells [r*M:(r+1)*M, c*M:(c+1)*M]. phi = LayerNorm + Linear
(module names as in the release: ``vlm_uni_query_projector``, ``vlm_uni_aux_projector``
(keys), ``vlm_uni_val_projector``); single head, no output projection; the attended value
is added to the raw Q; ``projector`` is the LLaVA projector. N tokens in, N tokens out.

Implementation (same math, less memory and time than the release):
- K and V share their LayerNorm statistics, so the map is normalised once and both
  projections run as one matmul with the LayerNorm affines folded into the weights:
  phi(x) = W (g * xhat + b) + c = (W diag g) xhat + (W b + c).
- The map is processed a few token rows at a time, straight from its [C_hr, H, W] layout
  (an fp32 GEMM reads the normalised slab transposed; bf16/fp16 get a [cells, C_hr] copy,
  the layout with a fast CPU kernel), so no [B, N, M*M, C_hr] copy of the whole map and no
  [N, H*W] attention mask ever exist; temporaries are chunk-sized (``chunk_cells``).
- Scores, softmax and the weighted sum run in fp32 whatever the input dtype (no NaN/inf
  from bf16/fp16 overflow, unlike the release's softmax in the model dtype).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from minigem.config import ConnectorConfig
from minigem.connectors.base import CONNECTORS, Connector
from minigem.connectors.mlp import make_projector
from minigem.vision.base import VisionFeatures


def _ln_linear(dim_in: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim_in), nn.Linear(dim_in, dim_out))


def mining_grid(n_tokens: int, hr_shape: tuple[int, ...]) -> tuple[int, int]:
    """(side, M): the LR grid side sqrt(N) and the HR cells per token side, or a clear error."""
    side = math.isqrt(n_tokens)
    h, w = hr_shape[-2], hr_shape[-1]
    if side * side != n_tokens:
        raise ValueError(
            f"patch mining needs a square number of low-res tokens; got N={n_tokens} "
            f"(HR map {h}x{w})"
        )
    if h != w or h % side != 0 or h == 0:
        raise ValueError(
            f"patch mining: the HR map is {h}x{w} but the low-res grid is {side}x{side} "
            f"(N={n_tokens}); the HR map must be square with a side that is a multiple of {side}"
        )
    return side, h // side


class PatchMiningConnector(Connector):
    """``forward(VisionFeatures(low_res [B,N,C], high_res [B,C_hr,H,W])) -> [B, N, D]``."""

    def __init__(
        self,
        projector: str,
        vision_dim: int,
        llm_dim: int,
        aux_dim: int,
        chunk_cells: int | None = None,
    ) -> None:
        super().__init__()
        self.vision_dim, self.aux_dim = vision_dim, aux_dim
        self.vlm_uni_query_projector = _ln_linear(vision_dim, vision_dim)
        self.vlm_uni_aux_projector = _ln_linear(aux_dim, vision_dim)  # keys
        self.vlm_uni_val_projector = _ln_linear(aux_dim, vision_dim)  # values
        self.projector = make_projector(projector, vision_dim, llm_dim)
        # HR cells normalised and projected per step (whole token rows of one image): bounds
        # the temporaries. None = 2048 on CPU (cache-sized, measured), 8192 elsewhere (on an
        # H100, 2.2x less peak memory at HD bf16 than the straightforward version where 65536
        # gave 1.2x; the time difference was not resolved: docs/BENCHMARKS.md).
        self.chunk_cells = chunk_cells

    # ------------------------------------------------------------------ public

    def forward(self, feats: VisionFeatures) -> torch.Tensor:
        """[B, N, C] low-res + [B, C_hr, H, W] HR -> visual tokens [B, N, D]."""
        return self.projector(self.mine(feats))

    def mine(self, feats: VisionFeatures) -> torch.Tensor:
        """Q + mined HR detail, before the projector: [B, N, C]."""
        q_raw, hr = self._check(feats)
        out = torch.empty_like(q_raw)  # allocated up front: no small live blocks between temps
        for i, t0, t1, att, _ in self._chunks(q_raw, hr):
            out[i, t0:t1] = q_raw[i, t0:t1] + att.to(q_raw.dtype)
        return out

    def mining_attention(self, feats: VisionFeatures) -> torch.Tensor:
        """Attention of each LR token over its own sub-region: [B, N, M*M] (fp32, rows sum
        to 1; cell m = (m // M, m % M) within the token's M x M block of the HR map)."""
        q_raw, hr = self._check(feats)
        _, m = mining_grid(q_raw.shape[1], tuple(hr.shape))
        out = q_raw.new_empty(*q_raw.shape[:2], m * m, dtype=torch.float32)
        for i, t0, t1, _, attn in self._chunks(q_raw, hr):
            out[i, t0:t1] = attn
        return out

    # ------------------------------------------------------------------ internals

    def _check(self, feats: VisionFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        q_raw, hr = feats.low_res, feats.high_res
        if q_raw.ndim == 3:
            q_raw = self.pooled(q_raw)
        if hr is None:
            raise ValueError(
                "patch_mining needs high-res features (VisionFeatures.high_res); "
                "configure `vision_aux` (the HR tower)"
            )
        if q_raw.ndim != 3 or hr.ndim != 4:
            raise ValueError(
                f"patch mining expects low_res [B, N, C] and high_res [B, C_hr, H, W]; got "
                f"{tuple(q_raw.shape)} and {tuple(hr.shape)}"
            )
        if q_raw.shape[-1] != self.vision_dim:
            raise ValueError(
                f"low_res features have {q_raw.shape[-1]} channels but the connector was "
                f"built for vision_dim={self.vision_dim}"
            )
        if hr.shape[1] != self.aux_dim:
            raise ValueError(
                f"high_res features have {hr.shape[1]} channels but the connector was built "
                f"for aux_dim={self.aux_dim} (the HR tower's out_channels)"
            )
        if hr.shape[0] != q_raw.shape[0]:
            raise ValueError(
                f"low_res has {q_raw.shape[0]} image views but high_res has {hr.shape[0]}"
            )
        mining_grid(q_raw.shape[1], tuple(hr.shape))
        dtype = self.vlm_uni_query_projector[1].weight.dtype
        return q_raw.to(dtype), hr

    def _fused_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One [2C, C_hr] weight and [2C] bias: LayerNorm affines folded into both Linears."""
        ws, bs = [], []
        for ln, lin in (self.vlm_uni_aux_projector, self.vlm_uni_val_projector):
            if ln.eps != self.vlm_uni_aux_projector[0].eps:
                raise ValueError("the key and value LayerNorms must share eps to be fused")
            w = lin.weight.float()
            ws.append(w * ln.weight.float())  # W diag(g)
            bs.append(w @ ln.bias.float() + lin.bias.float())  # W b + c
        dtype = self.vlm_uni_aux_projector[1].weight.dtype
        return torch.cat(ws).to(dtype), torch.cat(bs).to(dtype)

    def _chunks(
        self, q_raw: torch.Tensor, hr: torch.Tensor
    ) -> Iterator[tuple[int, int, int, torch.Tensor, torch.Tensor]]:
        """Yield (image, first token, end token, attended [t, C] fp32, attn [t, M*M] fp32)."""
        b, n, c = q_raw.shape
        c_hr, _, w = hr.shape[1:]
        side, m = mining_grid(n, tuple(hr.shape))
        eps = self.vlm_uni_aux_projector[0].eps
        dtype = q_raw.dtype
        q = self.vlm_uni_query_projector(q_raw)  # phi_q(Q) [B, N, C]
        w_kv, b_kv = self._fused_kv()  # [2C, C_hr], [2C]
        chunk = self.chunk_cells or (2048 if hr.device.type == "cpu" else 8192)
        rows = max(1, min(side, chunk // (m * w)))  # token rows per step
        scale = 1.0 / math.sqrt(c)
        for i in range(b):
            for r0 in range(0, side, rows):
                r1 = min(side, r0 + rows)
                t0, t1, cells = r0 * side, r1 * side, (r1 - r0) * m * w
                slab = hr[i, :, r0 * m : r1 * m].reshape(c_hr, cells)  # [C_hr, cells] view
                # LayerNorm over channels (no affine: folded into w_kv), in fp32; in place on
                # our own temporaries unless autograd needs them (never on the caller's map)
                x = slab.float()
                mu = x.mean(0, keepdim=True)
                centred = x.sub_(mu) if x is not slab and not x.requires_grad else x - mu
                var = (centred * centred).mean(0, keepdim=True)
                rstd = torch.rsqrt(var + eps)
                xhat = centred * rstd if centred.requires_grad else centred.mul_(rstd)
                if dtype != torch.float32:  # CPU bf16/fp16 GEMMs are only fast on [cells, C_hr]
                    xhat = xhat.T.to(dtype, memory_format=torch.contiguous_format).T
                kv = F.linear(xhat.T, w_kv, b_kv)  # [cells, 2C], cells in (row, mr, col, mc)
                # -> tokens in (row, col) order with their M*M cells: [t, M*M, 2C]
                kv = kv.view(r1 - r0, m, side, m, 2 * c).transpose(1, 2).reshape(-1, m * m, 2 * c)
                key, val = kv[..., :c].float(), kv[..., c:].float()
                qc = q[i, t0:t1].float()  # [t, C]
                scores = torch.bmm(key, qc.unsqueeze(-1)).squeeze(-1) * scale  # [t, M*M]
                fmax = torch.finfo(scores.dtype).max
                attn = scores.clamp(-fmax, fmax).softmax(-1)  # fp32; inf-safe, NaN not hidden
                att = torch.bmm(attn.unsqueeze(1), val).squeeze(1)  # [t, C]
                yield i, t0, t1, att, attn


@CONNECTORS.register("patch_mining")
def _patch_mining(
    cfg: ConnectorConfig, vision_dim: int, llm_dim: int, aux_dim: int | None
) -> Connector:
    if aux_dim is None:
        raise ValueError(
            "connector `patch_mining` needs aux_dim (the HR tower's out_channels); "
            "configure `vision_aux`"
        )
    return PatchMiningConnector(cfg.projector, vision_dim, llm_dim, aux_dim)
