"""Seeing what was mined: where each low-res token looked in the high-res image, and which
tokens the answer relied on.

``explain(model, image, question)`` answers the question (as ``model.chat``), then runs one
teacher-forced forward over prompt + answer and records:

- the patch-mining attention of every LR token over its own M x M sub-region of the HR
  feature map (``PatchMiningConnector.mining_attention``): ``Explanation.mining``
  ``[V, N, M, M]``, each token's block summing to 1;
- how much the answer relied on each LR (visual) token: the LLM's attention from the
  positions that produced the answer tokens to each visual token, averaged over answer
  tokens, heads and layers (eager attention is switched on for that one forward and
  reduced layer by layer, so no ``[layers, heads, S, S]`` stack is ever kept), normalised
  to shares that sum to 1 over the image's visual tokens: ``Explanation.relevance [V, N]``.

HD models (``image_grid`` 2 + global view) have V = 5 views in the order
[global, crop(0,0), crop(0,1), crop(1,0), crop(1,1)]. The full-resolution heat map
(``Explanation.heatmap``) is assembled from the crops, which tile the HR map at full
resolution; the global view mines a 2x-downscaled copy of the map, so its tokens cover
2M x 2M HR cells: its map is ``view_heatmap(0)`` and its tokens take part in the relevance
ranking (their boxes cover the larger region). ``render`` draws the crops' heat map and
outlines global-view tokens in a different colour.

Coordinates: map cells are HR feature-map cells (the ConvNeXt stride-4 map, so one cell is
``cell_px`` = 4 HR pixels); pixel boxes are in the HR image as the model saw it
(``Explanation.hr_image``: padded to a square with the mean colour, resized to the HR size).

Not thread-safe with other forwards on the same model (it switches the LLM to eager
attention for one forward and hooks its attention modules); the server serialises it with
the engine (``Engine.model_lock``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from minigem.errors import MinigemError


class ExplainError(MinigemError, ValueError):
    """The model cannot be explained (no patch-mining connector, no attention weights)."""


def has_mining(model) -> bool:
    """True for a Mini-Gemini model: a patch-mining connector and a high-res tower."""
    from minigem.connectors.patch_mining import PatchMiningConnector

    return isinstance(getattr(model, "connector", None), PatchMiningConnector) and (
        getattr(model, "vision_tower_aux", None) is not None
    )


def require_mining(model, name: str | None = None) -> None:
    if not has_mining(model):
        kind = model.config.connector.type
        raise ExplainError(
            f"explain needs a Mini-Gemini model with a patch_mining connector; "
            f"{name or 'this model'} has {kind}"
        )


# ----------------------------------------------------------------------------- result


@dataclass
class Explanation:
    question: str
    answer: str
    hr_image: Image.Image  # the HR input as the model saw it (square, hr_size x hr_size)
    mining: torch.Tensor  # [V, N, M, M] fp32: each token's attention over its sub-region
    relevance: torch.Tensor  # [V, N] share of the answer's attention to visual tokens (sums 1)
    visual_attention: float  # mean share of the answer's attention that went to visual tokens
    grid: int = 1  # HD grid (1 = no HD)
    global_view: bool = False
    answer_ids: list[int] = field(default_factory=list)  # the generated token ids
    view_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.view_names:
            crops = [f"crop({r},{c})" for r in range(self.grid) for c in range(self.grid)]
            self.view_names = (["global"] if self.global_view else []) + (
                crops if self.grid > 1 else ["image"]
            )

    # ------------------------------------------------------------------ shapes

    @property
    def views(self) -> int:
        return self.mining.shape[0]

    @property
    def n_tokens(self) -> int:
        """LR tokens per view (N)."""
        return self.mining.shape[1]

    @property
    def side(self) -> int:
        """LR token grid side per view (sqrt N)."""
        return math.isqrt(self.n_tokens)

    @property
    def m(self) -> int:
        """HR cells per token side (M)."""
        return self.mining.shape[-1]

    @property
    def map_side(self) -> int:
        """Side of the full HR feature map, in cells (grid * sqrt(N) * M)."""
        return self.grid * self.side * self.m

    @property
    def hr_size(self) -> int:
        return self.hr_image.width

    @property
    def cell_px(self) -> float:
        """HR image pixels per map cell (4 for the ConvNeXt stride-4 map)."""
        return self.hr_size / self.map_side

    def _first_crop(self) -> int:
        return int(self.global_view)

    # ------------------------------------------------------------------ maps

    def view_heatmap(self, view: int) -> torch.Tensor:
        """The mining maps of one view's tokens, assembled: [side*M, side*M] in that view's
        own cells (each M x M block is one token's attention and sums to 1)."""
        s, m = self.side, self.m
        return self.mining[view].view(s, s, m, m).permute(0, 2, 1, 3).reshape(s * m, s * m)

    def token_map(self, view: int, token: int) -> torch.Tensor:
        """One token's attention placed in its view's map [side*M, side*M] (zero elsewhere)."""
        s, m = self.side, self.m
        out = torch.zeros(s * m, s * m)
        r, c = divmod(token, s)
        out[r * m : (r + 1) * m, c * m : (c + 1) * m] = self.mining[view, token]
        return out

    @property
    def heatmap(self) -> torch.Tensor:
        """The full-resolution heat map [map_side, map_side]: the single view, or for HD
        the crops tiled in place (the global view is coarser: see ``view_heatmap(0)``)."""
        if self.grid == 1:
            return self.view_heatmap(0)
        g, vs = self.grid, self.side * self.m
        crops = torch.stack([self.view_heatmap(self._first_crop() + i) for i in range(g * g)])
        return crops.view(g, g, vs, vs).permute(0, 2, 1, 3).reshape(g * vs, g * vs)

    def token_box(self, view: int, token: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the token's sub-region in full-map cells."""
        s, m = self.side, self.m
        r, c = divmod(token, s)
        if self.grid == 1:
            ox = oy = 0
            k = m
        elif self.global_view and view == 0:  # the global view: the map at 1/grid
            ox = oy = 0
            k = m * self.grid
        else:
            gr, gc = divmod(view - self._first_crop(), self.grid)
            ox, oy, k = gc * s * m, gr * s * m, m
        return ox + c * k, oy + r * k, ox + (c + 1) * k, oy + (r + 1) * k

    def token_box_px(self, view: int, token: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the token's sub-region in HR image pixels."""
        p = self.cell_px
        return tuple(int(round(v * p)) for v in self.token_box(view, token))  # type: ignore[return-value]

    def peak_px(self, view: int, token: int) -> tuple[int, int]:
        """Centre (x, y), in HR pixels, of the cell the token attended to most."""
        x0, y0, x1, _ = self.token_box(view, token)
        k = (x1 - x0) / self.m  # map cells per mined cell (grid for the global view)
        mr, mc = divmod(int(self.mining[view, token].argmax()), self.m)
        p = self.cell_px
        return int((x0 + (mc + 0.5) * k) * p), int((y0 + (mr + 0.5) * k) * p)

    # ------------------------------------------------------------------ ranking

    def top_tokens(self, k: int = 5) -> list[dict]:
        """The k LR tokens the answer relied on most (all views ranked together)."""
        flat = self.relevance.flatten()
        k = max(0, min(k, flat.numel()))
        scores, idx = flat.topk(k) if k else (flat[:0], flat[:0].long())
        out = []
        for rank, (score, i) in enumerate(zip(scores.tolist(), idx.tolist(), strict=True), 1):
            view, token = divmod(i, self.n_tokens)
            row, col = divmod(token, self.side)
            out.append({
                "rank": rank, "view": self.view_names[view], "view_index": view, "token": token,
                "row": row, "col": col, "score": round(float(score), 6),
                "box": list(self.token_box_px(view, token)), "peak": list(self.peak_px(view, token)),
            })
        return out

    def to_dict(self, top_k: int = 5) -> dict:
        return {
            "question": self.question, "answer": self.answer, "hr_size": self.hr_size,
            "views": self.view_names, "tokens_per_view": self.n_tokens, "lr_grid": self.side,
            "cells_per_token": self.m, "visual_attention": round(self.visual_attention, 6),
            "top_tokens": self.top_tokens(top_k),
        }


# ----------------------------------------------------------------------------- explain


def hr_view(model, image: Image.Image) -> Image.Image:
    """The HR image as the model sees it: padded to a square (mean colour), resized."""
    proc = model.processor
    image = proc.load(image)
    if proc.aspect == "pad" and image.width != image.height:
        from minigem.vision.processing import pad_to_square

        fill = tuple(int(m * 255) for m in proc.mean)  # as mgm_views (LLaVA expand2square)
        image = pad_to_square(image, fill)  # type: ignore[arg-type]
    return image.resize((proc.hr_size, proc.hr_size), Image.Resampling.BICUBIC)


@contextmanager
def _eager_attention(lm) -> Iterator[None]:
    """Switch the LLM to eager attention (the only kind that returns its weights)."""
    prev = getattr(lm.config, "_attn_implementation", None)
    switch = prev not in (None, "eager") and hasattr(lm, "set_attn_implementation")
    if switch:
        lm.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            lm.set_attn_implementation(prev)


def _attention_modules(lm) -> list[torch.nn.Module]:
    return [mod for name, mod in lm.named_modules() if name.endswith("self_attn")]


@torch.inference_mode()
def explain(model, image: Image.Image, question: str, *, name: str | None = None,
            system: str | None = None, **gen_kwargs) -> Explanation:
    """Answer ``question`` about ``image`` and explain it (see the module docstring).

    gen_kwargs as ``model.chat`` (max_new_tokens, temperature, top_p, stop, seed); ``name``
    names the model in errors (e.g. its path).
    """
    from minigem.generation.decode import GenerationConfig, generate
    from minigem.vision.base import VisionFeatures

    require_mining(model, name)
    image = model.processor.load(image)
    msgs = model.user_messages(question, 1)
    prompt = model.encode_prompt(msgs, 1, system)
    pix = model.processor([image])
    gen = GenerationConfig(**gen_kwargs)
    gen.stop = tuple(gen.stop) + tuple(model.template.stop_strings)
    out = generate(model, [prompt], pix["pixel_values"], pix["pixel_values_aux"], gen)[0]
    answer_ids = list(out.token_ids)

    # one teacher-forced forward over prompt + answer: mining maps + the answer's attention
    p, a = len(prompt), len(answer_ids)
    ids = torch.tensor([prompt + answer_ids], dtype=torch.long, device=model.device)
    visual = (ids[0] == model.image_token_id).nonzero().squeeze(-1)  # [V*N] in view order
    rows = slice(p - 1, p - 1 + max(a, 1))  # the positions that produced the answer tokens
    lm = model.language_model
    modules = _attention_modules(lm)
    feats: list[VisionFeatures] = []
    acc: list[torch.Tensor] = []  # per layer: [R, S] mean over heads

    def grab_feats(_mod, args):
        feats.append(args[0])

    def grab_attn(_mod, _args, output):
        w = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if isinstance(w, torch.Tensor) and w.ndim == 4:
            acc.append(w[0, :, rows].float().mean(0))

    handles = [model.connector.register_forward_pre_hook(grab_feats)]
    handles += [m.register_forward_hook(grab_attn) for m in modules]
    try:
        with _eager_attention(lm):
            model(ids, pixel_values=pix["pixel_values"].to(model.device, model.dtype),
                  pixel_values_aux=pix["pixel_values_aux"].to(model.device, model.dtype),
                  logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    if not feats:
        raise ExplainError("the model did not run its connector (no image tokens in the prompt?)")
    if not acc:
        raise ExplainError(
            f"cannot read attention weights from this LLM ({type(lm).__name__}): it needs "
            "eager attention modules named `self_attn` that return their weights"
        )
    attn = torch.stack(acc).mean(0)  # [R, S] averaged over layers and heads
    on_visual = attn[:, visual]  # [R, V*N]
    visual_share = float(on_visual.sum(-1).mean())
    rel = on_visual.mean(0)
    rel = rel / rel.sum().clamp_min(1e-12)

    mining = model.connector.mining_attention(feats[0]).float().cpu()  # [V, N, M*M]
    v, n, mm = mining.shape
    m = math.isqrt(mm)
    proc = model.processor
    return Explanation(
        question=question, answer=out.text.strip(), hr_image=hr_view(model, image),
        mining=mining.view(v, n, m, m), relevance=rel.cpu().view(v, n),
        visual_attention=visual_share, grid=proc.grid, global_view=proc.global_view and proc.grid > 1,
        answer_ids=answer_ids,
    )


# ----------------------------------------------------------------------------- render

# an "inferno"-like colour map: dark purple -> red -> orange -> pale yellow
_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLOURS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]],
                    dtype=np.float32)
TOP_COLOUR = (0, 230, 255)  # top tokens (crops / single view)
GLOBAL_COLOUR = (255, 0, 200)  # top tokens of the HD global view


def colourise(values: np.ndarray) -> np.ndarray:
    """values in [0, 1] [H, W] -> RGB uint8 [H, W, 3]."""
    v = np.clip(values, 0.0, 1.0)
    rgb = np.stack([np.interp(v, _STOPS, _COLOURS[:, c]) for c in range(3)], axis=-1)
    return rgb.astype(np.uint8)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines: list[str] = []
    for para in text.splitlines() or [""]:
        words, line = para.split(" "), ""
        for w in words:
            trial = f"{line} {w}".strip()
            if line and draw.textlength(trial, font=font) > width:
                lines.append(line)
                line = w
            else:
                line = trial
        while draw.textlength(line, font=font) > width and len(line) > 1:  # one long word
            cut = max(1, int(len(line) * width / max(draw.textlength(line, font=font), 1)))
            lines.append(line[:cut])
            line = line[cut:]
        lines.append(line)
    return lines


MIN_WIDTH = 384  # smaller HR images are enlarged (integer factor) so the caption is legible


def render(explanation: Explanation, hr_image: Image.Image | None = None, top_k: int = 5,
           alpha: float = 0.55, scale: int | None = None) -> Image.Image:
    """The HR image with the mining heat map overlaid, the LR token grid, the top-k tokens
    the answer relied on outlined (ranked 1..k), and a caption with the question and answer.

    The picture is ``hr_size * scale`` wide; its top square is the HR image (pixel for pixel
    at scale 1; each pixel a scale x scale block otherwise), the caption is a band below it.
    ``scale`` None = 1 for HR images of at least 384 px (all released Mini-Gemini models),
    else the smallest integer making the picture at least 384 px wide.
    """
    ex = explanation
    if scale is None:
        scale = max(1, math.ceil(MIN_WIDTH / ex.hr_size))
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    size = ex.hr_size * scale
    base = (hr_image or ex.hr_image).convert("RGB")
    if base.size != (ex.hr_size, ex.hr_size):
        base = base.resize((ex.hr_size, ex.hr_size), Image.Resampling.BICUBIC)
    base = base.resize((size, size), Image.Resampling.NEAREST)
    heat = ex.heatmap.numpy()
    lo, hi = float(heat.min()), float(heat.max())
    heat = (heat - lo) / max(hi - lo, 1e-12)  # min-max: the colours show contrast, not level
    colour = Image.fromarray(colourise(heat)).resize((size, size), Image.Resampling.NEAREST)
    panel = Image.blend(base, colour, alpha).convert("RGBA")

    lines = Image.new("RGBA", panel.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(lines)
    step = ex.m * ex.cell_px * scale  # pixels per LR token (crops / single view)
    if step >= 4:
        n_lines = ex.grid * ex.side
        for k in range(1, n_lines):
            xy = int(round(k * step))
            width = 3 if ex.grid > 1 and k % ex.side == 0 else 1  # HD crop borders: thicker
            draw.line([(xy, 0), (xy, size)], fill=(255, 255, 255, 110), width=width)
            draw.line([(0, xy), (size, xy)], fill=(255, 255, 255, 110), width=width)
    font = _font(max(10, size // 40))
    for t in ex.top_tokens(top_k):
        x0, y0, x1, y1 = (v * scale for v in t["box"])
        glob = ex.global_view and t["view_index"] == 0
        rgb = GLOBAL_COLOUR if glob else TOP_COLOUR
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(*rgb, 255), width=max(1, size // 192))
        label = ("g" if glob else "") + str(t["rank"])
        draw.text((x0 + 2, y0 + 1), label, fill=(*rgb, 255), font=font,
                  stroke_width=1, stroke_fill=(0, 0, 0, 255))
    panel = Image.alpha_composite(panel, lines).convert("RGB")

    # caption band
    cap_font = _font(max(10, size // 48))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = size - 8
    answer = ex.answer if len(ex.answer) <= 400 else ex.answer[:400] + "..."
    legend = (f"heat: each LR token's patch-mining attention over its own {ex.m}x{ex.m} HR "
              f"sub-region, min-max scaled (grid lines = LR tokens); boxes: the {top_k} LR tokens the answer "
              "attended to most (1 = most)")
    if ex.grid > 1:
        legend += (f"; HD: the {ex.grid}x{ex.grid} crops are shown"
                   + ("; global-view tokens outlined in magenta (g)" if ex.global_view else ""))
    text_lines = (_wrap(measure, f"Q: {ex.question}", cap_font, text_w)
                  + _wrap(measure, f"A: {answer}", cap_font, text_w)
                  + _wrap(measure, legend, cap_font, text_w))
    asc, desc = cap_font.getmetrics() if hasattr(cap_font, "getmetrics") else (10, 2)
    line_h = asc + desc + 2
    band = 8 + line_h * len(text_lines)
    out = Image.new("RGB", (size, size + band), (255, 255, 255))
    out.paste(panel, (0, 0))
    cd = ImageDraw.Draw(out)
    for i, line in enumerate(text_lines):
        cd.text((4, size + 4 + i * line_h), line, fill=(20, 20, 30), font=cap_font)
    return out


__all__ = ["Explanation", "ExplainError", "explain", "has_mining", "hr_view", "render",
           "require_mining"]
