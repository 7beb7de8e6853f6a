"""VisionLanguageModel: vision towers -> connector -> visual tokens spliced into an HF causal LM.

The model is composed from parts chosen by config (towers, connector, LLM, optional MoE
FFNs); it never needs editing to add a new part. Input ids carry one ``image_token_id`` per
visual token (the processor expands each ``<image>`` placeholder), so batching, padding and
the KV cache work exactly as for a text-only LM.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from PIL import Image
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from minigem.chat import IGNORE_INDEX, encode_segments, get_template
from minigem.config import ModelConfig
from minigem.connectors import Connector, build_connector
from minigem.data.records import Message
from minigem.errors import DataError
from minigem.llm.backbone import build_llm, cache_kwarg, output_cache
from minigem.rng import own_stream
from minigem.vision.base import VisionFeatures
from minigem.vision.clip import CLIPTower, build_clip_tower
from minigem.vision.processing import ImageProcessor

if TYPE_CHECKING:
    from minigem.imagegen.chat import ChatResult, ImageGenerator


@dataclass
class VLMOutput:
    logits: torch.Tensor  # [B, S', V] (S' = kept positions)
    loss: torch.Tensor | None = None  # lm_loss + aux_loss
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # MoE load balancing (already weighted), or None
    past_key_values: object | None = None


def _flatten_output(out: VLMOutput) -> tuple[list[Any], None]:
    return [getattr(out, f.name) for f in fields(out)], None


# A pytree node, so that code which walks a module's outputs with torch's pytree finds the loss:
# FSDP2 (torch < 2.14) registers its pre-backward hook only on the tensors `tree_flatten`
# yields; with VLMOutput a leaf, the gradients never reached the sharded parameters (the
# optimizer stepped with no gradients and the loss stayed flat under accelerate FSDP).
pytree.register_pytree_node(
    VLMOutput, _flatten_output, lambda values, _: VLMOutput(*values),
    serialized_type_name="minigem.model.VLMOutput")


class VisionLanguageModel(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        tokenizer: PreTrainedTokenizerBase,
        vision_tower: CLIPTower,
        connector: Connector,
        language_model: PreTrainedModel,
        vision_tower_aux: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.vision_tower = vision_tower
        self.vision_tower_aux = vision_tower_aux
        self.connector = connector
        self.language_model = language_model
        # False: a Mini-Gemini runs as its LR-only LLaVA (HR tower not run, nothing mined; a
        # training stage's `use_hr: false`)
        self.use_hr = True
        self.processor = ImageProcessor.from_config(config, vision_tower.image_size)
        self.template = get_template(config.template)
        self.image_token_id: int = tokenizer.convert_tokens_to_ids(config.image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise DataError(f"tokenizer has no {config.image_token!r} token")

    # ------------------------------------------------------------------ build

    @classmethod
    def build(cls, config: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> VisionLanguageModel:
        """Build every component from config (random init unless a component names a path)."""
        from minigem.chat import ensure_special_tokens

        template = get_template(config.template)
        ensure_special_tokens(tokenizer, [config.image_token, *template.special_tokens])
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        tower = build_clip_tower(config.vision)
        aux = None
        aux_dim = None
        if config.vision_aux is not None:
            from minigem.vision.convnext import build_hr_tower

            with own_stream(0x4D474D01):  # the LLaVA parts keep a LLaVA's init (minigem.rng)
                aux = build_hr_tower(config.vision_aux)
            aux_dim = aux.out_channels
        lm = build_llm(config.llm, vocab_size=len(tokenizer))
        if config.ffn_widen is not None:
            from minigem.llm.widen import widen_ffn

            widen_ffn(lm, config.ffn_widen)
        if config.moe is not None:
            from minigem.llm.moe import apply_moe

            apply_moe(lm, config.moe)
        connector = build_connector(config.connector, tower.hidden_size, lm.config.hidden_size, aux_dim,
                                    num_low_res=tower.num_patches)
        return cls(config, tokenizer, tower, connector, lm, aux)

    # ------------------------------------------------------------------ shapes

    @property
    def has_hr_path(self) -> bool:
        """A Mini-Gemini: an HR tower and a connector that can also run LR-only (`use_hr`)."""
        return self.vision_tower_aux is not None and hasattr(self.connector, "lr_only")

    @property
    def tokens_per_image(self) -> int:
        """Visual tokens the LLM sees per image (all views)."""
        return self.processor.views_per_image * self.connector.num_tokens(self.vision_tower.num_patches)

    @property
    def device(self) -> torch.device:
        return next(self.language_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.get_input_embeddings().weight.dtype

    def train(self, mode: bool = True) -> VisionLanguageModel:
        """Frozen towers stay in eval mode (no dropout / drop-path at any time)."""
        super().train(mode)
        for tower in (self.vision_tower, self.vision_tower_aux):
            if tower is not None and not any(p.requires_grad for p in tower.parameters()):
                tower.eval()
        return self

    # ------------------------------------------------------------------ forward

    def encode_images(
        self, pixel_values: torch.Tensor, pixel_values_aux: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[n_images * views, 3, S, S] (+ HR [n_images, 3, H, H]) -> [n_images, T, D]."""
        low = self.vision_tower(pixel_values)  # [n*V, N, C]
        if self.vision_tower_aux is None:
            tokens = self.connector(VisionFeatures(low, None))
        elif not self.use_hr:
            tokens = self.connector.lr_only(low)  # what the mining gives with nothing mined
        else:
            if pixel_values_aux is None:
                raise DataError("this model has a high-res tower: pixel_values_aux is required")
            high = self.vision_tower_aux(pixel_values_aux.to(low.dtype))  # [n, C_hr, H/4, W/4]
            if self.processor.views_per_image > 1:
                from minigem.vision.hd import split_hr_views

                high = split_hr_views(high, self.processor.grid, self.processor.global_view)
            tokens = self.connector(VisionFeatures(low, high))  # [n*V, N, D]
        n = tokens.shape[0] // self.processor.views_per_image
        return tokens.reshape(n, -1, tokens.shape[-1])  # [n, V*N, D]

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        pixel_values_aux: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings [B, S, D] with visual tokens spliced in at image-token positions."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        mask = input_ids == self.image_token_id  # [B, S]
        n_slots = int(mask.sum())
        if pixel_values is None:
            if n_slots:
                raise DataError(f"input has {n_slots} image tokens but no images were given")
            return embeds
        visual = self.encode_images(pixel_values, pixel_values_aux)  # [n, T, D]
        if n_slots != visual.shape[0] * visual.shape[1]:
            raise DataError(
                f"image tokens ({n_slots}) do not match the images given "
                f"({visual.shape[0]} images x {visual.shape[1]} tokens)"
            )
        return embeds.masked_scatter(mask.unsqueeze(-1), visual.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_aux: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: object | None = None,
        use_cache: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
        padding_free: bool = False,
    ) -> VLMOutput:
        """input_ids [B, S] (image tokens expanded), labels [B, S] with -100 = ignored.

        With labels, logits are computed only at positions some row supervises (the LM head
        is the costliest matmul at small widths), and returned for those positions only.
        `padding_free` (training; needs labels and a right-padded attention_mask) runs the LLM
        on the real tokens only (`minigem.llm.padfree`); logits are then [1, K, V], K the
        supervised positions of all rows, and the loss is the same mean over them.
        """
        embeds = self.embed(input_ids, pixel_values, pixel_values_aux)
        if padding_free:
            return self._forward_packed(embeds, attention_mask, labels, past_key_values, use_cache)
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        keep: int | torch.Tensor = logits_to_keep
        if labels is not None:
            targets = labels[:, 1:]  # [B, S-1]
            keep = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(-1)  # [K] source positions
        out = self.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            logits_to_keep=keep,
            **{cache_kwarg(self.language_model): past_key_values},
        )
        result = VLMOutput(logits=out.logits, past_key_values=output_cache(out))
        aux = self.moe_aux_loss()
        result.aux_loss = aux
        if labels is not None:
            tgt = targets[:, keep]  # [B, K]
            lm_loss = F.cross_entropy(
                out.logits.float().reshape(-1, out.logits.shape[-1]),
                tgt.reshape(-1),
                ignore_index=IGNORE_INDEX,
            )
            result.lm_loss = lm_loss
            result.loss = lm_loss if aux is None else lm_loss + aux
        return result

    def _forward_packed(self, embeds, attention_mask, labels, past_key_values, use_cache) -> VLMOutput:
        from minigem.llm import padfree

        if labels is None or attention_mask is None or past_key_values is not None or use_cache:
            raise ValueError("padding_free is for training: it needs labels and an attention_mask, "
                             "and no KV cache")
        padfree.enable(self.language_model)
        packing = padfree.Packing.from_mask(attention_mask)
        # the target of each real token is the next label of its own row (-100 after its last)
        nxt = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # [B, S]
        targets = packing.pack(nxt)[0]  # [T]
        keep = (targets != IGNORE_INDEX).nonzero().squeeze(-1)  # [K] packed positions
        out = self.language_model(
            inputs_embeds=packing.pack(embeds),
            attention_mask=torch.ones(1, packing.tokens, dtype=torch.long, device=embeds.device),
            position_ids=packing.position_ids(),
            use_cache=False,
            logits_to_keep=keep,
            packing=packing,
        )
        padfree.check_used(self.language_model, packing)
        lm_loss = F.cross_entropy(out.logits[0].float(), targets[keep], ignore_index=IGNORE_INDEX)
        aux = self.moe_aux_loss()
        return VLMOutput(logits=out.logits, lm_loss=lm_loss, aux_loss=aux,
                         loss=lm_loss if aux is None else lm_loss + aux)

    def moe_aux_loss(self) -> torch.Tensor | None:
        if self.config.moe is None:
            return None
        from minigem.llm.moe import collect_aux_loss

        total, _ = collect_aux_loss(self.language_model)
        return total

    # ------------------------------------------------------------------ prompts

    def encode_prompt(
        self,
        messages: list[Message],
        num_images: int,
        system: str | None = None,
    ) -> list[int]:
        """Render a conversation ending in a user turn into prompt ids (images expanded)."""
        segs = self.template.render(
            messages, add_generation_prompt=True, system=system or self.config.system_prompt,
            tokenizer=self.tokenizer,
        )
        ids, _ = encode_segments(
            self.tokenizer, segs, self.config.image_token, self.tokens_per_image,
            max_length=self.config.max_length,
        )
        n_slots = ids.count(self.image_token_id)
        if n_slots != num_images * self.tokens_per_image:
            raise DataError(
                f"the prompt has {n_slots // max(self.tokens_per_image, 1)} {self.config.image_token} "
                f"placeholders but {num_images} images were given"
            )
        return ids

    def user_messages(self, prompt: str | list[Message], num_images: int) -> list[Message]:
        """A prompt string becomes one user turn; images without placeholders go first."""
        if isinstance(prompt, str):
            tok = self.config.image_token
            if num_images and tok not in prompt:
                prompt = (tok + "\n") * num_images + prompt
            return [Message("user", prompt)]
        return list(prompt)

    @torch.inference_mode()
    def chat(
        self,
        images: Image.Image | list[Image.Image] | None,
        prompt: str | list[Message],
        generate_image: bool = False,
        image_pipeline: str | Path | ImageGenerator | None = None,
        image_options: Mapping[str, Any] | None = None,
        **gen_kwargs,
    ) -> str | ChatResult:
        """Answer one prompt about zero or more images. See `chat_batch` for options.

        With ``generate_image`` the answer is a ``ChatResult`` (text, image prompt, images):
        the request ends in ``<GEN>`` and the answer's ``<h>...</h>`` prompt is drawn by
        ``image_pipeline`` (a diffusers directory or an ``ImageGenerator``; None = the
        bundled one) with ``image_options`` (n, size, seed, steps, guidance, negative_prompt).
        """
        if generate_image:
            from minigem.imagegen.chat import chat_with_image

            return chat_with_image(self, images, prompt, image_pipeline, image_options, **gen_kwargs)
        return self.chat_batch([(images, prompt)], **gen_kwargs)[0]

    @torch.inference_mode()
    def chat_batch(
        self,
        requests: list[tuple[Image.Image | list[Image.Image] | None, str | list[Message]]],
        system: str | None = None,
        **gen_kwargs,
    ) -> list[str]:
        """Answer several (images, prompt) requests in one batched generation.

        gen_kwargs: max_new_tokens, temperature (0 = greedy), top_p, stop (strings), seed.
        """
        from minigem.generation.decode import GenerationConfig, generate

        prompts, all_images = [], []
        for images, prompt in requests:
            imgs = [] if images is None else [images] if isinstance(images, Image.Image) else list(images)
            msgs = self.user_messages(prompt, len(imgs))
            prompts.append(self.encode_prompt(msgs, len(imgs), system))
            all_images.extend(imgs)
        pix = self.processor(all_images)
        gen = GenerationConfig(**gen_kwargs)
        gen.stop = tuple(gen.stop) + tuple(self.template.stop_strings)
        outs = generate(self, prompts, pix["pixel_values"], pix["pixel_values_aux"], gen)
        return [o.text.strip() for o in outs]
