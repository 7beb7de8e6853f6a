"""A tiny text-to-image diffusion model for the synthetic world (pixel space, 32x32).

``TinyT2IPipeline`` is a diffusers ``DiffusionPipeline`` with four components: ``unet`` (a
small ``UNet2DConditionModel`` on RGB pixels), ``scheduler`` (DPM-Solver++ or DDIM for
sampling; training uses DDPM noise), ``text_encoder`` (a tiny ``CLIPTextModel`` trained from
scratch with the UNet) and ``tokenizer`` (a BPE ``PreTrainedTokenizerFast`` over the world's
prompt words). Classifier-free guidance uses the empty prompt as the unconditional input.
``save_pretrained`` / ``from_pretrained`` round-trip through a diffusers directory
(``model_index.json`` with ``_class_name: TinyT2IPipeline``).

Training data (`t2i_example`): a prompt in the normalised wording of the world's
generation answers (``minigem.data.synth.gen_prompt``: "a red circle", "two big blue squares
on the left", "a red circle at the top and a blue square at the bottom") and a scene that
shows it, rendered at >= 96 px and downscaled (antialiased) to the model's resolution.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from PIL import Image

from minigem.data.synth import (
    COLORS,
    MIN_IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    gen_prompt,
    render,
)

# "on the left" for several objects: a row or column of the grid (cells, row-major)
GROUP_CELLS: dict[str, tuple[int, ...]] = {
    "left": (0, 3, 6), "right": (2, 5, 8), "top": (0, 1, 2), "bottom": (6, 7, 8),
}


def _background(rng: random.Random) -> tuple[int, int, int]:
    base = rng.randint(230, 248)
    return tuple(min(255, base + rng.randint(-4, 4)) for _ in range(3))  # type: ignore[return-value]


def _obj(rng: random.Random, shape: str, color: str, cell: int, size: str | None = None) -> Obj:
    return Obj(shape=shape, color=color, size=size or rng.choice(tuple(SIZES)), cell=cell,
               jx=rng.uniform(-1, 1), jy=rng.uniform(-1, 1))


def t2i_example(rng: random.Random) -> tuple[str, Scene]:
    """A drawing prompt and a scene showing it (objects the prompt does not place are put
    anywhere; sizes it does not name are random)."""
    color, shape = rng.choice(tuple(COLORS)), rng.choice(SHAPES)
    u = rng.random()
    if u < 0.6:  # one object
        size = rng.choice((None, "small", "large"))
        cell = rng.randrange(9)
        named = POSITIONS[cell] if rng.random() < 0.5 else None
        obj = _obj(rng, shape, color, cell, size)
        return gen_prompt(color, shape, 1, size, named), Scene((obj,), _background(rng))
    if u < 0.85:  # two or three of a kind, maybe in a named row/column
        n = rng.choice((2, 3))
        where = rng.choice((None, *GROUP_CELLS))
        cells = sorted(rng.sample(GROUP_CELLS[where] if where else range(9), n))
        size = rng.choice((None, "small", "large"))
        objs = tuple(_obj(rng, shape, color, c, size) for c in cells)
        return gen_prompt(color, shape, n, size, where), Scene(objs, _background(rng))
    # two different objects, each at its position
    other = rng.choice([(c, s) for c in COLORS for s in SHAPES if (c, s) != (color, shape)])
    cells = sorted(rng.sample(range(9), 2))
    kinds = [(color, shape), other]
    objs = tuple(_obj(rng, s, c, cell) for (c, s), cell in zip(kinds, cells, strict=True))
    prompt = " and ".join(gen_prompt(o.color, o.shape, position=o.position) for o in objs)
    return prompt, Scene(objs, _background(rng))


def render_small(scene: Scene, resolution: int, render_size: int = MIN_IMAGE_SIZE) -> Image.Image:
    """The scene at `render_size`, downscaled with antialiasing to `resolution`."""
    return render(scene, max(render_size, MIN_IMAGE_SIZE)).resize((resolution, resolution), Image.LANCZOS)


def prompt_texts(n: int = 4000) -> list[str]:
    """A tokenizer corpus: every word of the prompts, and many prompts."""
    rng = random.Random("minigem-t2i/prompt-texts")
    texts = [t2i_example(rng)[0] for _ in range(n)]
    texts += [gen_prompt(c, s, k, z, p) for c in COLORS for s in SHAPES for k in (1, 2, 3)
              for z in (None, "small", "large") for p in (None, *POSITIONS)][::7]
    return texts


def dominant_color(img: Image.Image, min_pixels: int = 4) -> str | None:
    """The world colour (nearest of COLORS) most non-background pixels are closest to, or
    None when fewer than `min_pixels` pixels are coloured. Background: light, unsaturated
    pixels (the world's backgrounds are near-white greys)."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32).reshape(-1, 3)
    sat = a.max(1) - a.min(1)
    fg = a[(sat > 40) | (a.mean(1) < 160)]
    if len(fg) < min_pixels:
        return None
    names = list(COLORS)
    ref = np.asarray([COLORS[c] for c in names], dtype=np.float32)
    nearest = ((fg[:, None, :] - ref[None]) ** 2).sum(-1).argmin(1)
    return names[int(np.bincount(nearest, minlength=len(names)).argmax())]


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> [3, H, W] in [-1, 1]."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL images."""
    a = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(im) for im in a]


def build_components(resolution: int = 32, unet: dict | None = None, text_encoder: dict | None = None,
                     vocab_size: int = 192, max_text_tokens: int = 24, train_timesteps: int = 1000,
                     prediction_type: str = "epsilon", sampler: str = "ddim"):
    """Fresh (randomly initialised) components: unet, scheduler, text_encoder, tokenizer,
    and the DDPM scheduler used for training."""
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from minigem.chat.tokenizer import train_tokenizer

    tok = train_tokenizer(prompt_texts(), vocab_size=vocab_size)
    tok.model_max_length = max_text_tokens
    tcfg = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "projection_dim": 64, **(text_encoder or {})}
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), max_position_embeddings=max_text_tokens, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **tcfg))
    ucfg = {"block_out_channels": [32, 64, 64], "layers_per_block": 1,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "attention_head_dim": 8, "norm_num_groups": 8, **(unet or {})}
    net = UNet2DConditionModel(sample_size=resolution, in_channels=3, out_channels=3,
                               cross_attention_dim=text.config.hidden_size, **ucfg)
    sched_kw = {"num_train_timesteps": train_timesteps, "beta_schedule": "squaredcos_cap_v2",
                "prediction_type": prediction_type}
    train_sched = DDPMScheduler(**sched_kw, clip_sample=True)
    if sampler == "ddim":
        sched = DDIMScheduler(**sched_kw, clip_sample=True, set_alpha_to_one=True)
    else:
        # pixel space: clip the x0 estimate to [-1, 1] (without it the first steps, where
        # alpha is ~5e-5 on the cosine schedule, amplify eps errors into noise)
        sched = DPMSolverMultistepScheduler(**sched_kw, thresholding=True, sample_max_value=1.0)
    return net, sched, text, tok, train_sched


class TinyT2IOutput(BaseOutput):
    images: list[Image.Image]


class TinyT2IPipeline(DiffusionPipeline):
    """Text -> image for the synthetic world; see the module docstring."""

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet, scheduler, text_encoder, tokenizer, default_guidance_scale: float = 4.0) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)
        # saved in model_index.json: the guidance a call uses when it names none (what suits
        # one trained model is a property of that model, e.g. 1.5 for the bundled one)
        self.register_to_config(default_guidance_scale=float(default_guidance_scale))

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """[B, T, D] text states (padded to the tokenizer's max length)."""
        enc = self.tokenizer(prompts, padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt")
        dev = self.text_encoder.device
        return self.text_encoder(enc.input_ids.to(dev), attention_mask=enc.attention_mask.to(dev))[0]

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] = "", num_inference_steps: int = 25,
                 guidance_scale: float | None = None, generator: torch.Generator | None = None,
                 height: int | None = None, width: int | None = None,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1,
                 output_type: str = "pil", return_dict: bool = True, **_: object):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        size = self.unet.config.sample_size
        h, w = height or size, width or size
        if negative_prompt is None:
            negs = [""] * len(prompts)
        else:
            negs = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
            negs = [n for n in negs for _ in range(num_images_per_prompt)]
            if len(negs) == 1:
                negs = negs * len(prompts)
        dev, dtype = self.unet.device, self.unet.dtype
        cond = self.encode_prompt(prompts)
        if guidance_scale is None:
            guidance_scale = self.config.default_guidance_scale
        cfg = guidance_scale > 1.0
        if cfg:
            cond = torch.cat([self.encode_prompt(negs), cond])
        x = torch.randn((len(prompts), 3, h, w), generator=generator, device="cpu", dtype=torch.float32)
        x = x.to(dev, dtype) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=dev)
        for t in self.scheduler.timesteps:
            inp = torch.cat([x, x]) if cfg else x
            inp = self.scheduler.scale_model_input(inp, t)
            eps = self.unet(inp, t, encoder_hidden_states=cond.to(dtype)).sample
            if cfg:
                uncond, text = eps.chunk(2)
                eps = uncond + guidance_scale * (text - uncond)
            x = self.scheduler.step(eps, t, x).prev_sample
        if output_type == "pt":
            images = x.clamp(-1, 1)
        else:
            images = to_pil(x.float())
        if not return_dict:
            return (images,)
        return TinyT2IOutput(images=images)
