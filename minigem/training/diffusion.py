"""Training a `t2i` recipe: `diffusion` stages for the tiny text-to-image model.

The UNet and the text encoder are trained jointly from scratch on (prompt, image) pairs of
the synthetic world (`minigem.imagegen.t2i.t2i_example`; example i of a stage is a pure
function of the stage's `data.synth.seed` and i), with the DDPM noise-prediction loss; the
prompt is replaced by "" with probability `t2i.cond_drop` (classifier-free guidance). Like
the VLM trainer: AdamW with warmup + cosine/linear/constant, loss / lr / samples/s logged to
`metrics.jsonl` (and a progress bar), atomic checkpoints every `save_every` steps with exact
resume, and the final pipeline written to `<output_dir>/final` as a diffusers directory.
With `eval_every`, a cheap quality proxy is logged: the fraction of `t2i.proxy_prompts`
single-object prompts whose drawing's dominant colour is the prompt's.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from minigem.checkpoints.native import atomic_dir
from minigem.config import RecipeConfig, StageConfig, dump_yaml
from minigem.training.checkpoint import (
    latest_checkpoint,
    resume_point,
    save_checkpoint,
    set_rng_state,
    trainer_state,
)
from minigem.training.data import ResumableBatchSampler
from minigem.training.ema import WeightAverage
from minigem.training.loop import make_optimizer, make_scheduler, stage_steps

log = logging.getLogger(__name__)


class T2IDataset(Dataset):
    """Index i -> {"pixel_values": [3, R, R] in [-1, 1], "prompt": str}, deterministic in (seed, i)."""

    def __init__(self, n: int, seed: int, resolution: int, render_size: int) -> None:
        self.n, self.seed, self.resolution, self.render_size = n, seed, resolution, render_size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        from minigem.imagegen.t2i import render_small, t2i_example, to_tensor

        prompt, scene = t2i_example(random.Random(f"minigem-t2i/{self.seed}/{i}"))
        return {"pixel_values": to_tensor(render_small(scene, self.resolution, self.render_size)),
                "prompt": prompt}


def _collate(batch: list[dict]) -> dict:
    return {"pixel_values": torch.stack([b["pixel_values"] for b in batch]),
            "prompt": [b["prompt"] for b in batch]}


def proxy_prompts(n: int) -> list[tuple[str, str, str]]:
    """(prompt, colour, shape) for `n` fixed single-object prompts (the quality proxy)."""
    from minigem.data.synth import COLORS, SHAPES, gen_prompt

    rng = random.Random("minigem-t2i/proxy")
    out = []
    for _ in range(n):
        c, s = rng.choice(tuple(COLORS)), rng.choice(SHAPES)
        out.append((gen_prompt(c, s), c, s))
    return out


def _write_weights(model: torch.nn.Module, directory: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))


class _Model(torch.nn.Module):
    def __init__(self, unet, text_encoder) -> None:
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder


class DiffusionTrainer:
    """Runs a `t2i` recipe; `run()` returns `<output_dir>/final` (a TinyT2IPipeline)."""

    def __init__(self, recipe: RecipeConfig) -> None:
        from minigem.imagegen.t2i import TinyT2IPipeline, build_components

        assert recipe.t2i is not None
        self.recipe, self.cfg, self.t2i = recipe, recipe.training, recipe.t2i
        torch.manual_seed(self.cfg.seed)
        t = self.t2i
        unet, sched, text, tok, self.noise = build_components(
            t.resolution, t.unet, t.text_encoder, t.vocab_size, t.max_text_tokens, t.train_timesteps,
            t.prediction_type, t.sampler)
        self.pipe = TinyT2IPipeline(unet=unet, scheduler=sched, text_encoder=text, tokenizer=tok,
                                    default_guidance_scale=self.t2i.guidance_scale)
        self.model = _Model(unet, text)
        self.out = Path(self.cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(dump_yaml(recipe))
        self.history: list[dict] = []
        n = sum(p.numel() for p in self.model.parameters())
        log.info("t2i model: %s parameters (unet %s, text encoder %s)", f"{n:,}",
                 f"{sum(p.numel() for p in unet.parameters()):,}", f"{sum(p.numel() for p in text.parameters()):,}")

    # ------------------------------------------------------------------ run

    def run(self, resume: bool = False, stop_after: int | None = None) -> Path:
        start_stage, start_step, state = 0, 0, None
        found = resume_point(self.out, log) if resume else None
        if found is not None:
            from safetensors.torch import load_file

            ckpt, state = found
            start_stage, start_step = state["stage"], state["step"]
            self.history = state.get("history", [])
            self.model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
            log.info("resuming from %s (stage %d, step %d)", ckpt, start_stage, start_step)
        from minigem.training.environment import describe, record

        record(self.out, describe("cpu", bf16=False), found[0].name if found is not None else None)
        self.budget = stop_after
        for i, stage in enumerate(self.cfg.stages):
            if i < start_stage:
                continue
            if self.budget == 0:
                return latest_checkpoint(self.out)  # type: ignore[return-value]
            if not self._run_stage(i, stage, start_step if i == start_stage else 0,
                                   state if i == start_stage else None):
                return latest_checkpoint(self.out)  # type: ignore[return-value]
        final = self.out / "final"
        self.model.eval()
        with atomic_dir(final) as tmp:
            self.pipe.save_pretrained(tmp)
        log.info("wrote the pipeline to %s", final)
        return final

    def _run_stage(self, idx: int, stage: StageConfig, start: int, state: dict | None) -> bool:
        s = stage.data.synth
        assert s is not None
        data = T2IDataset(s.n, s.seed, self.t2i.resolution, self.t2i.render_size)
        total = stage_steps(stage, len(data), 1)
        params = [p for name in stage.train for p in getattr(self.model, name).parameters()]
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = make_optimizer(params, stage)
        sched = make_scheduler(opt, stage, total)
        if state is not None and state.get("optimizer") is not None:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
        else:
            torch.manual_seed(self.cfg.seed * 1000 + idx)
        ema = WeightAverage.for_stage(params, stage.ema_decay, state)
        sampler = ResumableBatchSampler(len(data), stage.batch_size * stage.grad_accum, s.seed + idx,
                                        start=start, total=total)
        loader = DataLoader(data, batch_sampler=sampler, collate_fn=_collate,
                            num_workers=self.cfg.num_workers)
        batches = iter(loader)  # draws the loader's base seed from the RNG, as a fresh run does
        if state is not None and state.get("optimizer") is not None:
            set_rng_state(state["rng"])  # mid-stage resume: the RNG continues where it was saved
        log.info("stage %s (diffusion): %d steps, batch %d", stage.name, total,
                 stage.batch_size * stage.grad_accum)
        self.model.train()
        step, t0, seen = start, time.perf_counter(), 0
        for batch in batches:
            loss_sum = 0.0
            x_all, prompts_all = batch["pixel_values"], batch["prompt"]
            for k in range(stage.grad_accum):
                sl = slice(k * stage.batch_size, (k + 1) * stage.batch_size)
                loss = self._loss(x_all[sl], prompts_all[sl]) / stage.grad_accum
                loss.backward()
                loss_sum += loss.item()
            if stage.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, stage.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
            step += 1
            seen += x_all.shape[0]
            if step % self.cfg.log_every == 0 or step == total:
                now = time.perf_counter()
                rec = {"stage": stage.name, "step": step, "loss": loss_sum, "lr": sched.get_last_lr()[0],
                       "samples_per_s": seen / max(1e-9, now - t0)}
                self._log(rec)
                log.info("%s step %d/%d loss %.4f lr %.2e %.1f samples/s", stage.name, step, total,
                         loss_sum, rec["lr"], rec["samples_per_s"])
                t0, seen = now, 0
            if self.cfg.eval_every and self.t2i.proxy_prompts and (step % self.cfg.eval_every == 0 or step == total):
                self._proxy(stage, step)
                self.model.train()
            if self.budget is not None:
                self.budget -= 1
            if step % self.cfg.save_every == 0 or self.budget == 0:
                self._save(idx, step, opt, sched, ema)
            if self.budget == 0 and step < total:
                return False
        if ema is not None:
            ema.finish(stage.name)
        self._save(idx + 1, 0, None, None)
        return True

    def _loss(self, x: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        drop = torch.rand(len(prompts)) < self.t2i.cond_drop
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]
        cond = self.pipe.encode_prompt(prompts)
        noise = torch.randn_like(x)
        t = torch.randint(0, self.noise.config.num_train_timesteps, (x.shape[0],))
        noisy = self.noise.add_noise(x, noise, t)
        pred = self.pipe.unet(noisy, t, encoder_hidden_states=cond).sample
        target = noise if self.t2i.prediction_type == "epsilon" else self.noise.get_velocity(x, noise, t)
        return torch.nn.functional.mse_loss(pred, target)

    def _proxy(self, stage: StageConfig, step: int) -> None:
        from minigem.imagegen.t2i import dominant_color

        self.model.eval()
        items = proxy_prompts(self.t2i.proxy_prompts)
        g = torch.Generator().manual_seed(0)
        imgs = self.pipe([p for p, _, _ in items], num_inference_steps=self.t2i.sample_steps,
                         guidance_scale=self.t2i.guidance_scale, generator=g).images
        rate = sum(dominant_color(im) == c for im, (_, c, _) in zip(imgs, items, strict=True)) / len(items)
        self._log({"stage": stage.name, "step": step, "proxy_color_match": rate})
        log.info("%s step %d: colour match %.1f%% on %d proxy prompts", stage.name, step, 100 * rate, len(items))

    def _save(self, stage: int, step: int, opt, sched, ema=None) -> None:
        opt_state = opt.state_dict() if opt is not None else None
        save_checkpoint(self.out, self.model, trainer_state(stage, step, self.history, opt_state, sched, ema),
                        write=_write_weights)

    def _log(self, rec: dict) -> None:
        self.history.append(rec)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
