"""The training loop: stages in order on accelerate, with atomic checkpoints and exact resume.

For each stage: freeze all but the stage's components, build its data and optimiser
(AdamW, warmup + cosine/linear/constant), run `steps` optimiser steps of
`batch_size x grad_accum (x processes)` samples, log loss / lr / samples/s (progress bar,
TensorBoard, metrics.jsonl), evaluate on `eval_data` every `eval_every` steps, and save
a checkpoint every `save_every` steps. `resume=True` continues from the latest checkpoint
with the same weights, optimizer, scheduler, RNG and data order.
"""

from __future__ import annotations

import json
import logging
import math
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from minigem.checkpoints.native import load_state, save_model, write_model
from minigem.config import RecipeConfig, StageConfig, dump_yaml
from minigem.data.collate import SampleEncoder, collate
from minigem.errors import ConfigError
from minigem.llm import padfree
from minigem.training.checkpoint import (
    latest_checkpoint,
    resume_point,
    save_checkpoint,
    set_rng_state,
    trainer_state,
)
from minigem.training.data import EncodedDataset, ResumableBatchSampler, open_source
from minigem.training.ema import WeightAverage
from minigem.training.engines import (
    DEEPSPEED,
    PLAIN,
    configure_deepspeed,
    engine_kind,
    load_optimizer_state,
    optimizer_state,
)
from minigem.training.environment import describe as describe_environment
from minigem.training.environment import record as record_environment
from minigem.training.stages import apply_stage

log = logging.getLogger(__name__)


def stage_steps(stage: StageConfig, n_samples: int, world: int) -> int:
    if stage.steps is not None:
        return stage.steps
    per_step = stage.batch_size * stage.grad_accum * world
    return max(1, math.floor(stage.epochs * n_samples / per_step))


def make_optimizer(params, stage: StageConfig, model=None) -> torch.optim.AdamW:
    """AdamW with the stage's lr, weight decay, betas and eps; with `stage.lr_scale` (and the
    model, to find the components' parameters) one param group per scale after the default one."""
    groups: list[dict] = [{"params": list(params)}]
    if stage.lr_scale:
        from minigem.training.stages import lr_scale_groups

        groups = lr_scale_groups(model, groups[0]["params"], stage)
    return torch.optim.AdamW(groups, lr=stage.lr, weight_decay=stage.weight_decay,
                             betas=(stage.adam_beta1, stage.adam_beta2), eps=stage.adam_epsilon)


def make_scheduler(opt, stage: StageConfig, total: int):
    warm = int(round(stage.warmup_ratio * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if stage.schedule == "constant":
            return 1.0
        prog = (step - warm) / max(1, total - warm)
        if stage.schedule == "linear":
            return max(0.0, 1.0 - prog)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, prog)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class Trainer:
    """Runs a recipe. `build_model` and `tokenizer` come from `minigem.training.build`."""

    def __init__(self, recipe: RecipeConfig, model, recipe_text: str | None = None) -> None:
        from accelerate import Accelerator, PartialState
        from accelerate.state import AcceleratorState

        from minigem.training.precision import use_bf16

        self.recipe = recipe
        self.cfg = recipe.training
        self.model = model
        # The device decides bf16 before the one Accelerator exists: accelerate refuses a second
        # Accelerator with another mixed_precision in the same process, so a previous run's
        # precision (an earlier Trainer in this process) is cleared; the process group stays.
        cpu = not torch.cuda.is_available()
        bf16 = use_bf16(self.cfg.bf16, PartialState(cpu=cpu).device)
        AcceleratorState._reset_state(reset_partial_state=False)
        self.acc = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=cpu)
        self.bf16 = bf16
        self.engine = None  # the current stage's prepared model (FSDP/DeepSpeed wrap it)
        self.out = Path(self.cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "recipe.yaml").write_text(recipe_text or dump_yaml(recipe))
        self.history: list[dict] = []
        self.writer = None
        if self.acc.is_main_process:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.out / "logs"))
            except ImportError:  # tensorboard is in the `train` extra
                log.warning("tensorboard not installed; logging to metrics.jsonl only")
        log.info("device %s, bf16 autocast %s", self.acc.device, "on" if bf16 else "off")

    # ------------------------------------------------------------------ run

    def run(self, resume: bool = False, stop_after: int | None = None) -> Path:
        """Train every stage; return the final checkpoint directory.

        stop_after: stop (with a checkpoint) after this many optimiser steps in this call,
        as if interrupted; used by tests and for time-boxed runs.
        """
        start_stage, start_step, state = 0, 0, None
        found = resume_point(self.out, log) if resume else None
        if found is not None:
            ckpt, state = found
            start_stage, start_step = state["stage"], state["step"]
            self.history = state.get("history", [])
            # The checkpoint holds the structure of the stage it was saved in: mid-stage,
            # that stage's; at a boundary (step 0), the previous stage's (an `upcycle`
            # stage then upcycles the loaded dense weights when it starts).
            self._prepare_structure(start_stage if start_step > 0 else start_stage - 1)
            from safetensors.torch import load_file

            load_state(self.model, load_file(str(ckpt / "model.safetensors")), str(ckpt))
            log.info("resuming from %s (stage %d, step %d)", ckpt, start_stage, start_step)
        if self.acc.is_main_process:  # what the numbers depend on besides the recipe
            record_environment(self.out, describe_environment(self.acc.device, self.bf16,
                                                              self.acc.num_processes),
                               resumed_from=found[0].name if found is not None else None)
        self.budget = stop_after
        for i, stage in enumerate(self.cfg.stages):
            if i < start_stage:
                continue
            if self.budget == 0:
                return latest_checkpoint(self.out)
            self._prepare_structure(i)
            finished = self._run_stage(i, stage, start_step if i == start_stage else 0,
                                       state if i == start_stage else None)
            if not finished:
                return latest_checkpoint(self.out)
        full = self._full_state()  # collective: every process takes part
        final = self.out / "final"
        if self.acc.is_main_process:
            final = save_model(self.acc.unwrap_model(self.model), final, state=full)
        self._plot()
        return final

    def _prepare_structure(self, stage_idx: int) -> None:
        """Apply dense->MoE upcycling when reaching (or resuming past) an `upcycle` stage."""
        wants_moe = any(s.upcycle for s in self.cfg.stages[: stage_idx + 1])
        if wants_moe and self.model.config.moe is None and self.recipe.model.moe is not None:
            from minigem.llm.moe import apply_moe

            apply_moe(self.model.language_model, self.recipe.model.moe)
            self.model.config.moe = self.recipe.model.moe
            log.info("upcycled the dense FFNs into MoE layers")

    # ------------------------------------------------------------------ one stage

    def _data(self, stage: StageConfig):
        model = self.model
        if stage.kind == "glyph":
            from minigem.training.glyph import GlyphScenes, check_model

            check_model(model, stage.name)
            return None, GlyphScenes(stage.data.synth, model.processor)
        src = open_source(stage.data, model.config.image_token)
        if stage.kind == "contrastive":
            from minigem.training.contrastive import CaptionEncoder

            enc = CaptionEncoder(model.tokenizer, model.processor, stage.contrastive.max_text_tokens)
        else:
            enc = SampleEncoder.for_model(model, stage.data.template)
        return src, EncodedDataset(src, enc)

    def _run_stage(self, idx: int, stage: StageConfig, start: int, state: dict | None) -> bool:
        acc, model = self.acc, self.model
        torch.manual_seed(self.cfg.seed + idx)
        n_train = apply_stage(model, stage)
        if self.cfg.gradient_checkpointing:
            from minigem.llm.backbone import enable_checkpointing

            enable_checkpointing(model.language_model)
            model.language_model.config.use_cache = False
            model.vision_tower.gradient_checkpointing = True
        src, ds = self._data(stage)
        total = stage_steps(stage, len(ds), acc.num_processes)
        heads = None
        # on the device before the optimizer exists: a resumed optimizer state is then loaded
        # next to its parameters (not left on the CPU while prepare() moves the model)
        model.to(acc.device)
        params = [p for p in model.parameters() if p.requires_grad]
        if stage.kind == "contrastive":
            from minigem.training.contrastive import ContrastiveHeads, image_feature_dim

            heads = ContrastiveHeads(stage.contrastive, len(model.tokenizer),
                                     image_feature_dim(model, stage.train),
                                     model.tokenizer.pad_token_id or 0).to(acc.device)
            params += list(heads.parameters())
        elif stage.kind == "glyph":
            from minigem.training.glyph import GlyphHead

            heads = GlyphHead(model, stage.glyph.read, stage.glyph.keep_weight).to(acc.device)
            params += [p for p in heads.parameters() if p.requires_grad]
        opt = make_optimizer(params, stage, model)
        sched = make_scheduler(opt, stage, total)
        kind = engine_kind(acc)
        saved_opt = state.get("optimizer") if state is not None else None
        if saved_opt is not None:
            sched.load_state_dict(state["scheduler"])
        if state is not None and heads is not None and state.get("heads") is not None:
            heads.load_state_dict(state["heads"])
        if kind == DEEPSPEED:
            configure_deepspeed(acc, stage)
        engine, opt = acc.prepare(model, opt)
        self.engine = engine
        if saved_opt is not None:  # after prepare: onto the parameters the engine made (FSDP shards them)
            load_optimizer_state(kind, engine, opt, saved_opt, str(self.out))
        # FSDP replaces the parameters with sharded ones (the optimizer follows): clip those
        params = [p for p in engine.parameters() if p.requires_grad]
        if heads is not None:
            params += [p for p in heads.parameters() if p.requires_grad]
        if stage.ema_decay is not None and kind != PLAIN:
            raise ConfigError(f"training.stages.{stage.name}.ema_decay: works with one process or "
                              f"DDP, not with {kind} (sharded weights)")
        ema = WeightAverage.for_stage(params, stage.ema_decay, state)
        lengths = None
        if stage.group_by_length:
            lengths = partial(ds.length, tokens_per_image=model.tokens_per_image)
        sampler = ResumableBatchSampler(len(ds), stage.batch_size, self.cfg.seed + 7919 * idx,
                                        start=start * stage.grad_accum, total=total * stage.grad_accum,
                                        rank=acc.process_index, world=acc.num_processes,
                                        lengths=lengths)
        pad = model.tokenizer.pad_token_id or 0
        collate_fn = partial(collate, pad_id=pad)
        if stage.kind == "glyph":
            from minigem.training.glyph import collate_glyphs as collate_fn
        loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_fn, num_workers=self.cfg.num_workers)
        eval_src = open_source(stage.eval_data, model.config.image_token) if stage.eval_data else None
        log.info("stage %d/%d %s (%s): %d steps, %s trainable params", idx + 1, len(self.cfg.stages),
                 stage.name, stage.kind, total, f"{n_train:,}")
        bar = None
        if acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=start, desc=stage.name, dynamic_ncols=True)
        attn_prev = padfree.enable(model.language_model) if stage.padding_free else None
        step, micro, t0, seen, run_loss = start, 0, time.perf_counter(), 0, 0.0
        extra: dict[str, float] = {}
        batches = iter(loader)  # draws the loader's base seed from the RNG, as a fresh run does
        if state is not None and state.get("optimizer") is not None:
            # Mid-stage resume: the RNG continues where the interrupted run saved it. (At a stage
            # boundary the per-stage seed above already matches an uninterrupted run.)
            set_rng_state(state["rng"])
        for batch in batches:
            batch = {k: (v.to(acc.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            micro += 1
            sync = micro % stage.grad_accum == 0
            ctx = acc.no_sync(engine) if not sync and acc.num_processes > 1 else _null()
            with ctx, acc.autocast():
                if stage.kind == "glyph":
                    loss, gacc = heads(model, batch)
                    extra["glyph_acc"] = extra.get("glyph_acc", 0.0) + gacc.item() / stage.grad_accum
                elif heads is not None:
                    from minigem.training.contrastive import pooled_image_features

                    feats = pooled_image_features(model, batch, stage.train, stage.contrastive.pool)
                    loss, racc = heads(feats, batch["input_ids"], batch["attention_mask"])
                    extra["retrieval_acc"] = extra.get("retrieval_acc", 0.0) + racc.item() / stage.grad_accum
                else:
                    out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 pixel_values=batch["pixel_values"], pixel_values_aux=batch["pixel_values_aux"],
                                 labels=batch["labels"], padding_free=stage.padding_free)
                    loss = out.loss
                    if out.aux_loss is not None:
                        extra["aux_loss"] = extra.get("aux_loss", 0.0) + out.aux_loss.item() / stage.grad_accum
            if kind == DEEPSPEED:  # DeepSpeed divides by its accumulation steps and steps at the boundary
                acc.gradient_state._set_sync_gradients(sync)
                acc.backward(loss)
            else:
                acc.backward(loss / stage.grad_accum)
            run_loss += loss.item() / stage.grad_accum
            seen += batch["pixel_values_aux" if stage.kind == "glyph" else "input_ids"].shape[0] * acc.num_processes
            if not sync:
                continue
            if stage.max_grad_norm is not None and kind != DEEPSPEED:  # DeepSpeed clips in its step
                acc.clip_grad_norm_(params, stage.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
            step += 1
            if bar is not None:
                bar.update(1)
            if step % self.cfg.log_every == 0 or step == total:
                rate = seen / max(1e-9, time.perf_counter() - t0)
                rec = {"stage": stage.name, "step": step, "loss": run_loss, "lr": sched.get_last_lr()[0],
                       "samples_per_s": rate, **extra}
                self._log(rec, bar)
                t0, seen = time.perf_counter(), 0
            run_loss, extra = 0.0, {}
            if eval_src is not None and self.cfg.eval_every and (step % self.cfg.eval_every == 0 or step == total):
                self._evaluate(stage, step, eval_src, heads)
            if self.budget is not None:
                self.budget -= 1
            if step % self.cfg.save_every == 0 or self.budget == 0:
                self._save(idx, step, opt, sched, heads, ema)
            if self.budget == 0 and step < total:
                if bar is not None:
                    bar.close()
                padfree.disable(model.language_model, attn_prev)
                model.use_hr = True
                return False
        if bar is not None:
            bar.close()
        padfree.disable(model.language_model, attn_prev)
        model.use_hr = True
        if ema is not None:
            ema.finish(stage.name)
        self._save(idx + 1, 0, None, None, None)  # stage boundary: resume starts the next stage
        return True

    # ------------------------------------------------------------------ helpers

    def _full_state(self) -> dict[str, torch.Tensor] | None:
        """The whole model's weights gathered from FSDP / DeepSpeed shards (a collective call:
        every process makes it); None when the model's own state_dict is already whole."""
        if self.engine is None or engine_kind(self.acc) == PLAIN:
            return None
        return self.acc.get_state_dict(self.engine)

    def _save(self, stage: int, step: int, opt, sched, heads, ema=None) -> None:
        full = self._full_state()
        # collective under FSDP: every process gathers, the main one writes
        opt_state = optimizer_state(engine_kind(self.acc), self.engine, opt) if opt is not None else None
        if not self.acc.is_main_process:
            return
        state = trainer_state(stage, step, self.history, opt_state, sched, ema,
                              heads=heads.state_dict() if heads is not None else None)
        save_checkpoint(self.out, self.acc.unwrap_model(self.model), state,
                        write=partial(write_model, state=full), keep_boundaries=self.cfg.keep_boundaries)

    def _evaluate(self, stage: StageConfig, step: int, source, heads=None) -> None:
        if stage.kind == "glyph":  # held-out scenes: glyph accuracy of the stage's head
            from minigem.training.glyph import held_out_accuracy

            acc = held_out_accuracy(self.model, heads, stage.eval_data.synth)
            self._log({"stage": stage.name, "step": step, "eval_glyph_acc": acc}, None)
            log.info("eval at step %d: glyph accuracy %.1f%% on held-out scenes", step, 100 * acc)
            return
        from minigem.evaluation.runner import evaluate

        report = evaluate(self.model, source, limit=256)
        rec = {"stage": stage.name, "step": step, "eval_accuracy": report.accuracy,
               **{f"eval_{c}": r["accuracy"] for c, r in report.per_category.items()}}
        self._log(rec, None)
        log.info("eval at step %d: %s", step, report.format())

    def _log(self, rec: dict, bar) -> None:
        if not self.acc.is_main_process:
            return
        self.history.append(rec)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if bar is not None and "loss" in rec:
            bar.set_postfix(loss=f"{rec['loss']:.4f}", sps=f"{rec['samples_per_s']:.1f}")
        if self.writer is not None:
            for k, v in rec.items():
                if isinstance(v, int | float) and k != "step":
                    self.writer.add_scalar(f"{rec['stage']}/{k}", v, rec["step"])
            self.writer.flush()

    def _plot(self) -> None:
        if not self.acc.is_main_process or not self.history:
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        stages = [s.name for s in self.cfg.stages]
        fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3), squeeze=False)
        for ax, name in zip(axes[0], stages, strict=True):
            pts = [(r["step"], r["loss"]) for r in self.history if r.get("stage") == name and "loss" in r]
            if pts:
                ax.plot(*zip(*pts, strict=True))
            ax.set_title(name)
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
        fig.tight_layout()
        fig.savefig(self.out / "loss.png", dpi=100)
        plt.close(fig)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
