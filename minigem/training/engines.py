"""What the trainer does differently under accelerate's sharding engines (FSDP2, DeepSpeed ZeRO).

- The optimizer state is saved in a form the engine can load back: under FSDP the full
  (unsharded) state keyed by parameter name, gathered with torch.distributed.checkpoint (a
  collective call); under DeepSpeed the ZeRO optimizer's own state. It is loaded after
  `accelerate.prepare`, onto the parameters the engine made (FSDP replaces every parameter with
  a sharded one; a state loaded before that stays keyed by the old parameters).
- DeepSpeed takes the micro-batch size, the accumulation steps and the clipping from its
  config, not from the training loop, so each stage writes its own there before `prepare`.
"""

from __future__ import annotations

from typing import Any

from minigem.errors import ConfigError

PLAIN, FSDP, DEEPSPEED = "plain", "fsdp", "deepspeed"


def engine_kind(acc) -> str:
    """`plain` (one process, DDP), `fsdp` or `deepspeed`: how the Accelerator shards the model."""
    from accelerate.utils import DistributedType

    return {DistributedType.FSDP: FSDP, DistributedType.DEEPSPEED: DEEPSPEED}.get(acc.distributed_type, PLAIN)


def configure_deepspeed(acc, stage) -> None:
    """The stage's batch size, accumulation and clipping in the DeepSpeed config (before prepare)."""
    cfg = acc.state.deepspeed_plugin.deepspeed_config
    cfg["train_micro_batch_size_per_gpu"] = stage.batch_size
    cfg["gradient_accumulation_steps"] = stage.grad_accum
    cfg["train_batch_size"] = stage.batch_size * stage.grad_accum * acc.num_processes
    cfg["gradient_clipping"] = float(stage.max_grad_norm or 0.0)


def _torch_optimizer(opt):
    return getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps it


def optimizer_state(kind: str, model, opt) -> Any:
    """The optimizer state to save. Under FSDP a collective call: every process makes it (the
    full state lands on the main process, the others get an empty dict)."""
    if kind == FSDP:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        full = get_optimizer_state_dict(model, _torch_optimizer(opt),
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {"engine": FSDP, "state": full}
    if kind == DEEPSPEED:
        return {"engine": DEEPSPEED, "state": _torch_optimizer(opt).state_dict()}
    return opt.state_dict()


def _saved_engine(saved: Any) -> str:
    return saved.get("engine", PLAIN) if isinstance(saved, dict) else PLAIN


def load_optimizer_state(kind: str, model, opt, saved: Any, where: str) -> None:
    """Load a state written by `optimizer_state` under the same engine; `where` names the
    checkpoint in the error."""
    was = _saved_engine(saved)
    if was != kind:
        raise ConfigError(
            f"{where}: the optimizer state was saved under {was} and this run uses {kind}; resume "
            "with the same engine (accelerate launch options) as the run that wrote it")
    if kind == FSDP:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(model, _torch_optimizer(opt), saved["state"],
                                 options=StateDictOptions(full_state_dict=True))
    elif kind == DEEPSPEED:
        _torch_optimizer(opt).load_state_dict([saved["state"]], load_optimizer_states=True,
                                              load_from_fp32_weights=True)
    else:
        opt.load_state_dict(saved)
