"""Mini-Gemini patch info mining: each low-res token attends to its own M x M sub-region
of the high-res feature map, and the result refines the token before the projector.

    T = MLP(Q + softmax(phi_q(Q) phi_k(K)^T / sqrt(C)) phi_v(V))

Q: low-res tokens [B, N, C]; K = V: the HR map [B, C_hr, H, W] with H = W = M * sqrt(N),
token i at grid (r, c) owning cells [r*M:(r+1)*M, c*M:(c+1)*M]. phi = LayerNorm + Linear
(module names as in the release: ``vlm_uni_query_projector``, ``vlm_uni_aux_projector``
(keys), ``vlm_uni_val_projector``); single head, no output projection; the attended value
is added to the raw Q; ``projector`` is the LLaVA projector. N tokens in, N tokens out.

Implementation (same math, far fewer FLOPs and less memory than the release):
- No keys or values are computed for the HR cells. A single head with no nonlinearity
  between the projections and the attention lets both Linears move off the map: the key
  projection is applied to the query instead (q' = phi_q(Q) W_k diag(g_k) / sqrt(C), one
  [N, C] x [C, C_hr] product; the key biases add the same constant to all of a token's
  scores, which softmax ignores), and the value projection after the weighted sum
  (sum_j a_j (W xhat_j + b) = W (sum_j a_j xhat_j) + b, since the weights sum to 1). The
  map is only normalised, scored and averaged: O(cells x C_hr) work instead of the
  release's O(cells x C_hr x 2C) K/V projections, M*M (64 at the released sizes) times
  fewer multiply-adds.
- The map is read where it lies ([C_hr, H, W]), a chunk at a time (whole images when they
  fit, else token rows of one image): each chunk is centred per cell into one fp32 copy,
  every token of the chunk is scored against all of the chunk's cells of its image in one
  GEMM and its own M x M block kept (the LayerNorm's 1/std applied to the scores), and the
  weighted sum is a second GEMM with the weights placed block-diagonally. No [B, N, M*M,
  C_hr] copy of the whole map, no [N, H*W] attention mask, no K or V tensor; temporaries
  are chunk-sized (``chunk_cells``).
- On a GPU that loop is launch-bound (~20 small kernels per token row). There large maps are
  read an image per step, in place and in the map's dtype: the image's token rows are the batch
  of two GEMMs on strided views of the map, the mean taken out through the query
  (``_image_chunks``). Small maps (many images of a training batch) gather each token's
  M x M block into an fp32 copy, many images per step, scored and averaged with two batched
  matrix-vector products (``_gathered_chunks``). ``form`` chooses.
- Scores and softmax run in fp32 whatever the input dtype (no NaN/inf from bf16/fp16 overflow,
  unlike the release's softmax in the model dtype); the weighted sums accumulate in fp32 (the
  image form rounds the weights to a bf16 map's dtype for its GEMM).
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
from minigem.rng import own_stream
from minigem.vision.base import VisionFeatures

# tokens per step (of whole images, or of token rows) are capped so that a step's tokens x cells GEMM
# computes at most this many times the scores it keeps (each token is scored against every
# cell of the step, then cut to its own M x M block)
_STEP_TOKENS = 32
# on a GPU, maps of at least this many cells are read an image per step (`_image_chunks`); below
# it the per-image kernels are launch-bound and blocks are gathered, many images per step
# (docs/BENCHMARKS.md: tiny-mgm's 24 x 24 maps, batch 32: 18 ms fwd+bwd per image vs 4.0 gathered)
_IMAGE_CELLS = 4096


def default_form(on_gpu: bool, cells: int) -> str:
    """The mining form used when ``PatchMiningConnector.form`` is None (see its comment)."""
    if not on_gpu:
        return "rows"
    return "image" if cells >= _IMAGE_CELLS else "gathered"


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
        # the projector draws first from the global RNG, as a LLaVA's does; the mining projections
        # from a stream of their own (minigem.rng), so the projector starts as the LLaVA's
        proj = make_projector(projector, vision_dim, llm_dim)
        with own_stream(0x4D474D02):
            self.vlm_uni_query_projector = _ln_linear(vision_dim, vision_dim)
            self.vlm_uni_aux_projector = _ln_linear(aux_dim, vision_dim)  # keys
            self.vlm_uni_val_projector = _ln_linear(aux_dim, vision_dim)  # values
        self.projector = proj
        # HR cells per step at most (whole images, or token rows of one image; at least one row):
        # bounds the temporaries (one fp32 copy of a step's cells). None = 16384. At the released
        # sizes the token cap (_STEP_TOKENS) binds first (one row of 24 tokens, 1536 cells); for
        # small maps it sets how many whole images share a step.
        self.chunk_cells = chunk_cells
        # how the map is read (all the same math): "rows", in place a few token rows per step
        # (`_chunks`); "gathered", each token's block copied out (`_gathered_chunks`); "image", in
        # place an image per step, its token rows as one batched GEMM (`_image_chunks`).
        # None: "rows" on the CPU; on a GPU "image" for maps of _IMAGE_CELLS cells or more (768 px
        # and up), else "gathered" (small maps: an image per step would be launch-bound).
        self.form: str | None = None
        # `_folded`'s result without autograd, and the parameters' (pointer, version) it is for
        self._folded_cache: tuple[torch.Tensor, ...] | None = None
        self._folded_key: tuple | None = None

    # ------------------------------------------------------------------ public

    def forward(self, feats: VisionFeatures) -> torch.Tensor:
        """[B, N, C] low-res + [B, C_hr, H, W] HR -> visual tokens [B, N, D]."""
        return self.projector(self.mine(feats))

    def lr_only(self, low_res: torch.Tensor) -> torch.Tensor:
        """The LR-only LLaVA inside this connector: the projector on the pooled LR tokens, nothing
        mined (equal to `forward` with a zero value projection). [B, N, C] -> [B, N, D]."""
        return self.projector(self.pooled(low_res).to(self.vlm_uni_query_projector[1].weight.dtype))

    def mine(self, feats: VisionFeatures) -> torch.Tensor:
        """Q + mined HR detail, before the projector: [B, N, C]."""
        q_raw, hr = self._check(feats)
        out = torch.empty_like(q_raw)  # allocated up front: no small live blocks between temps
        for i0, i1, t0, t1, att, _ in self._chunks(q_raw, hr):
            out[i0:i1, t0:t1] = q_raw[i0:i1, t0:t1] + att.to(q_raw.dtype)
        return out

    def mining_attention(self, feats: VisionFeatures) -> torch.Tensor:
        """Attention of each LR token over its own sub-region: [B, N, M*M] (fp32, rows sum
        to 1; cell m = (m // M, m % M) within the token's M x M block of the HR map)."""
        q_raw, hr = self._check(feats)
        _, m = mining_grid(q_raw.shape[1], tuple(hr.shape))
        out = q_raw.new_empty(*q_raw.shape[:2], m * m, dtype=torch.float32)
        for i0, i1, t0, t1, _, attn in self._chunks(q_raw, hr):
            out[i0:i1, t0:t1] = attn
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

    def _folded(self) -> tuple[torch.Tensor, ...]:
        """fp32 LayerNorm affines folded into the key and value Linears:
        (W_k diag g_k [C, C_hr], W_k b_k + c_k [C], W_v diag g_v [C, C_hr], W_v b_v + c_v [C]).
        Without autograd the result is kept until a parameter changes (in place or replaced):
        at batch 1 on a GPU its ~14 small kernels are a noticeable part of the call."""
        params = [t for pair in (self.vlm_uni_aux_projector, self.vlm_uni_val_projector)
                  for mod in pair for t in (mod.weight, mod.bias)]
        if torch.is_grad_enabled() and any(t.requires_grad for t in params):
            return self._fold()
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in params)
        if self._folded_key != key:
            self._folded_cache, self._folded_key = self._fold(), key
        return self._folded_cache

    def _fold(self) -> tuple[torch.Tensor, ...]:
        folded = []
        for ln, lin in (self.vlm_uni_aux_projector, self.vlm_uni_val_projector):
            if ln.eps != self.vlm_uni_aux_projector[0].eps:
                raise ValueError("the key and value LayerNorms must share eps to be folded")
            w = lin.weight.float()
            folded += [w * ln.weight.float(), w @ ln.bias.float() + lin.bias.float()]
        return tuple(folded)

    def _chunks(
        self, q_raw: torch.Tensor, hr: torch.Tensor
    ) -> Iterator[tuple[int, int, int, int, torch.Tensor, torch.Tensor]]:
        """Yield (first image, end image, first token, end token, attended [g, t, C] fp32,
        attn [g, t, M*M] fp32) for chunks of whole images or of token rows of one image."""
        b, n, c = q_raw.shape
        c_hr, h, w = hr.shape[1:]
        side, m = mining_grid(n, tuple(hr.shape))
        eps = self.vlm_uni_aux_projector[0].eps
        w_k, b_k, w_v, b_v = self._folded()
        # the key projection moved onto the query (module docstring): q' = phi_q(Q) W_k' / sqrt(C)
        # [B, N, C_hr] and the per-token constant phi_q(Q) . b_k' / sqrt(C) [B, N]
        q = self.vlm_uni_query_projector(q_raw).float() * (1.0 / math.sqrt(c))
        form = self.form or default_form(hr.is_cuda, h * w)
        if form not in ("rows", "gathered", "image"):
            raise ValueError(f"PatchMiningConnector.form must be rows, gathered or image; got {form!r}")
        if form == "image":
            yield from self._image_chunks(hr, q, w_k, b_k, w_v, b_v, eps, side, m)
            return
        qk, qb = q @ w_k, q @ b_k
        if form == "gathered":
            yield from self._gathered_chunks(hr, qk, qb, w_v, b_v, eps, side, m)
            return
        chunk = self.chunk_cells or 16384
        per_image = h * w
        if per_image <= chunk and side * side <= _STEP_TOKENS:  # whole images per step
            per = chunk // per_image
            steps = [(i, min(b, i + per), 0, side) for i in range(0, b, per)]
        else:  # token rows of one image per step
            rows = max(1, min(side, chunk // (m * w), _STEP_TOKENS // side))
            steps = [(i, i + 1, r, min(side, r + rows)) for i in range(b) for r in range(0, side, rows)]
        for i0, i1, r0, r1 in steps:
            g, rr = i1 - i0, r1 - r0
            t0, t1, cells = r0 * side, r1 * side, (r1 - r0) * m * w
            # the slab [g, C_hr, cells] straight from the map (a view), cells in (row, M row,
            # column, M column) order; centred per cell into a chunk-sized fp32 copy (in place
            # when converting from another dtype already made one and autograd does not need it)
            x = hr[i0:i1, :, r0 * m : r1 * m].reshape(g, c_hr, cells)
            xf = x.float()  # x itself when it is fp32
            mu = xf.mean(1, keepdim=True)
            x = xf.sub_(mu) if xf is not x and not xf.requires_grad else xf - mu
            rstd = torch.rsqrt((x * x).mean(1) + eps)  # [g, cells]: the LayerNorm's 1/std
            rstd_b = _blocks(rstd, rr, side, m)  # [g, t, M*M]
            # every token of the chunk against every cell of its image rows (one GEMM), then each
            # token's own M x M block; the LayerNorm's scale applied to the scores, not the map
            full = torch.bmm(qk[i0:i1, t0:t1], x)  # [g, t, cells]
            scores = rstd_b * _own_blocks(full, rr, side, m) + qb[i0:i1, t0:t1, None]
            fmax = torch.finfo(scores.dtype).max
            attn = scores.clamp(-fmax, fmax).softmax(-1)  # fp32; inf-safe, NaN not hidden
            # sum_j a_j xhat_j as one GEMM with the weights placed block-diagonally; the value
            # projection after it (the weights sum to 1)
            spread = _place_blocks(attn * rstd_b, rr, side, m)  # [g, t, cells], 0 outside blocks
            pooled = torch.bmm(spread, x.transpose(1, 2))  # [g, t, C_hr]
            att = F.linear(pooled, w_v, b_v)  # [g, t, C]
            yield i0, i1, t0, t1, att, attn

    def _gathered_chunks(
        self, hr: torch.Tensor, qk: torch.Tensor, qb: torch.Tensor, w_v: torch.Tensor,
        b_v: torch.Tensor, eps: float, side: int, m: int
    ) -> Iterator[tuple[int, int, int, int, torch.Tensor, torch.Tensor]]:
        """The GPU's form of `_chunks` for small maps (same math, same yields; many images of a
        training batch per step, where `_image_chunks` would loop): each token's own M x M block is
        copied out of the map (fp32, [tokens, C_hr, M*M]) and scored / averaged with two
        batched matrix-vector products, over as many token rows per step as fit
        ``chunk_cells`` (default 32768). A handful of large kernels per step instead of ~20 small
        ones per token row: on a GPU the row-at-a-time loop is launch-bound. The LayerNorm is
        applied through its statistics (xhat . v = rstd (x . v - mu sum(v))), so the copy is
        neither centred nor scaled."""
        b, c_hr, h, w = hr.shape
        chunk = self.chunk_cells or 32768
        if h * w <= chunk:  # whole images per step
            per = chunk // (h * w)
            steps = [(i, min(b, i + per), 0, side) for i in range(0, b, per)]
        else:  # token rows of one image per step, as many rows in each (768 px: 2 steps of 12)
            rows = max(1, chunk // (m * w))
            rows = -(-side // -(-side // rows))
            steps = [(i, i + 1, r, min(side, r + rows)) for i in range(b) for r in range(0, side, rows)]
        q_sum = qk.sum(-1)  # [B, N]: sum(v) for v = q'
        fmax = torch.finfo(torch.float32).max
        for i0, i1, r0, r1 in steps:
            g, rr = i1 - i0, r1 - r0
            t0, t1, n_t = r0 * side, r1 * side, g * (r1 - r0) * side
            # [g, rr, side, C_hr, M, M]: token (row, col)'s block, a strided view of the map
            view = hr[i0:i1, :, r0 * m : r1 * m].unflatten(2, (rr, m)).unflatten(4, (side, m))
            x = hr.new_empty((g, rr, side, c_hr, m, m), dtype=torch.float32)
            x = x.copy_(view.permute(0, 2, 4, 1, 3, 5)).view(n_t, c_hr, m * m)
            var, mu = torch.var_mean(x, dim=1, correction=0)  # [T, M*M] per cell
            rstd = torch.rsqrt(var + eps)
            q = qk[i0:i1, t0:t1].reshape(n_t, 1, c_hr)
            raw = torch.bmm(q, x).squeeze(1)  # [T, M*M]: q' . x_j
            scores = rstd * (raw - mu * q_sum[i0:i1, t0:t1].reshape(n_t, 1))
            scores = scores + qb[i0:i1, t0:t1].reshape(n_t, 1)
            attn = scores.clamp(-fmax, fmax).softmax(-1)
            wgt = attn * rstd  # sum_j a_j xhat_j = sum_j wgt_j x_j - sum_j wgt_j mu_j
            pooled = torch.bmm(wgt.unsqueeze(1), x.transpose(1, 2)).squeeze(1)
            pooled = pooled - (wgt * mu).sum(-1, keepdim=True)  # [T, C_hr]
            att = F.linear(pooled, w_v, b_v).view(g, (r1 - r0) * side, -1)
            del x  # freed before the next step's copy is allocated (autograd keeps its own)
            yield i0, i1, t0, t1, att, attn.view(g, (r1 - r0) * side, m * m)

    def _image_chunks(
        self, hr: torch.Tensor, q: torch.Tensor, w_k: torch.Tensor, b_k: torch.Tensor,
        w_v: torch.Tensor, b_v: torch.Tensor, eps: float, side: int, m: int
    ) -> Iterator[tuple[int, int, int, int, torch.Tensor, torch.Tensor]]:
        """`_chunks` with the map read in place and never copied: per image, its token rows are
        the batch of two GEMMs on strided views of the map ([rows, C_hr, M*W], the map's own
        strides), each token scored against the M*W cells of its row and its own block kept
        (side x the multiply-adds kept; temporaries [side, side, M*W] per image). Everything
        else runs once for all images. One yield (all images, all tokens).
        - In the map's dtype: a bf16 map is read as bf16, the GEMMs accumulate in fp32 (and
          write fp32 where torch can, `_bmm32`), and the key and value Linears run in bf16 too
          (as the release's do). Scores, softmax and the LayerNorm statistics are fp32. An
          fp16 map is read in fp32 (its range cannot hold large scores).
        - The mean is taken out through the query, not the map: q'.(x_j - mu_j) =
          (q' - mean(q')).x_j, so no centred copy and no cancellation against the cell means.
        - sum_j a_j xhat_j = sum_j w_j x_j - sum_j w_j mu_j with w_j = a_j rstd_j, the weights
          placed block-diagonally for the second GEMM (rounded to the map's dtype once, and the
          same rounded weights used in the correction)."""
        b, c_hr, h, w = hr.shape
        n = side * side
        cdt = hr.dtype if hr.dtype in (torch.float32, torch.bfloat16) else torch.float32
        xs = hr.to(cdt)
        if cdt == torch.float32:
            var, mu = torch.var_mean(xs, dim=1, correction=0)  # [B, H, W]
        else:  # fp32 accumulation without an fp32 copy of the map
            mu = xs.sum(1, dtype=torch.float32) / c_hr
            var = (torch.linalg.vector_norm(xs, 2, dim=1, dtype=torch.float32).square() / c_hr
                   - mu.square()).clamp_min(0)
        # per-token M x M blocks of the per-cell statistics, [B, N, M*M]
        rstd = _blocks(torch.rsqrt(var + eps).view(b, h * w), side, side, m)
        mu = _blocks(mu.view(b, h * w), side, side, m)
        qk = _bmm32(q.to(cdt), w_k.to(cdt).expand(b, -1, -1))  # [B, N, C_hr] fp32
        qc = (qk - qk.mean(-1, keepdim=True)).to(cdt)  # the centred query
        qb = q @ b_k  # [B, N]
        rows = [xs[i].reshape(c_hr, side, m * w).transpose(0, 1) for i in range(b)]  # views
        # each row of tokens against its row's cells, each token's own block kept:
        # [B, N, M*M] = q'.(x_j - mu_j)
        raw = torch.stack([_own_blocks(_bmm32(qc[i].view(side, side, c_hr), x), 1, side, m)
                           for i, x in enumerate(rows)]).view(b, n, m * m)
        scores = rstd * raw + qb[..., None]
        fmax = torch.finfo(torch.float32).max
        attn = scores.clamp(-fmax, fmax).softmax(-1)
        wgt = (attn * rstd).to(cdt)
        # [B, rows, tokens of the row, M*W], 0 outside each token's block
        placed = _place_blocks(wgt.view(b * side, side, m * m), 1, side, m).view(b, side, side, m * w)
        pooled = torch.stack([_bmm32(placed[i], x.transpose(1, 2)).view(n, c_hr)
                              for i, x in enumerate(rows)])  # [B, N, C_hr]: sum_j w_j x_j
        pooled = pooled - (wgt.float() * mu).sum(-1, keepdim=True)
        att = F.linear(pooled.to(cdt), w_v.to(cdt), b_v.to(cdt))
        yield 0, b, 0, n, att, attn


_OUT_DTYPE_BMM = [True]  # torch.bmm(..., out_dtype=float32) for half inputs (CUDA, newer torch)


def _bmm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b batched, the result in fp32: half inputs accumulate in fp32 in the GEMM and, where
    torch offers it and no gradient is needed, are written out in fp32 without rounding."""
    if a.dtype == torch.float32:
        return torch.bmm(a, b)
    if _OUT_DTYPE_BMM[0] and a.is_cuda and not (
        torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    ):
        try:
            return torch.bmm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _OUT_DTYPE_BMM[0] = False
    return torch.bmm(a, b).float()


def _diag(full: torch.Tensor, rr: int, side: int, m: int) -> torch.Tensor:
    """[g, t, cells] (t = rr*side tokens, cells = rr*M*side*M) -> the view of each token's own
    block, [g, M, M, rr, side]."""
    v = full.view(full.shape[0], rr, side, rr, m, side, m)  # g, row, col | row', mr, col', mc
    return v.diagonal(dim1=1, dim2=3).diagonal(dim1=1, dim2=3)  # g, mr, mc, row, col


def _own_blocks(full: torch.Tensor, rr: int, side: int, m: int) -> torch.Tensor:
    """[g, t, cells] -> [g, t, M*M]: each token's scores against its own M x M block only."""
    return _diag(full, rr, side, m).permute(0, 3, 4, 1, 2).reshape(full.shape[0], rr * side, m * m)


def _blocks(per_cell: torch.Tensor, rr: int, side: int, m: int) -> torch.Tensor:
    """[g, cells] -> [g, t, M*M]: each token's M x M block of a per-cell quantity."""
    g = per_cell.shape[0]
    return per_cell.view(g, rr, m, side, m).permute(0, 1, 3, 2, 4).reshape(g, rr * side, m * m)


def _place_blocks(per_token: torch.Tensor, rr: int, side: int, m: int) -> torch.Tensor:
    """[g, t, M*M] -> [g, t, cells]: each token's values in its own block, zero elsewhere."""
    g = per_token.shape[0]
    out = per_token.new_zeros(g, rr * side, rr * m * side * m)
    _diag(out, rr, side, m).copy_(per_token.view(g, rr, side, m, m).permute(0, 3, 4, 1, 2))
    return out


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
