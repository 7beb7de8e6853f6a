"""FSDP2 on this CPU: the model's output is a pytree node (so FSDP2's pre-backward hook finds the
loss), and one process with gloo shards the model, gets gradients on the sharded parameters,
steps them, and saves / loads the optimizer state as a resumed FSDP run does. The GPU runs
through accelerate are in scripts/gpu_check.sh."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import torch.utils._pytree as pytree

from minigem.model import VLMOutput

ROOT = Path(__file__).resolve().parents[1]


def test_model_output_flattens_to_its_tensors(tiny_model) -> None:
    ids = torch.tensor([[20, 21, 22, 23]])
    assert tiny_model.image_token_id not in ids.tolist()[0]
    out = tiny_model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    leaves, spec = pytree.tree_flatten(out)
    assert any(leaf is out.loss for leaf in leaves), "the loss is not a leaf of the output's pytree"
    assert any(leaf is out.logits for leaf in leaves)
    back = pytree.tree_unflatten(leaves, spec)
    assert isinstance(back, VLMOutput) and back.loss is out.loss


FSDP_SCRIPT = r"""
import os, sys
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
sys.path.insert(0, "tests")
from conftest import build_tiny_model, tiny_model_dict
from minigem.chat import train_tokenizer
from minigem.config import ModelConfig
from minigem.data.synth import world_texts

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
model = build_tiny_model(ModelConfig.model_validate(tiny_model_dict()),
                         train_tokenizer(world_texts(), vocab_size=300)).train()
model.vision_tower.requires_grad_(False)
fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
trainable = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(trainable, lr=1e-3)
torch.manual_seed(0)
ids = torch.randint(5, 200, (2, 12))
ids[:, 1:1 + model.tokens_per_image] = model.image_token_id
before = [p.detach().full_tensor().clone() for p in trainable]
losses = []
for _ in range(5):
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                pixel_values=torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)),
                labels=ids)
    out.loss.backward()
    assert all(type(p).__name__ == "DTensor" for p in trainable)
    missing = sum(p.grad is None for p in trainable)
    assert missing == 0, f"{missing} of {len(trainable)} sharded parameters got no gradient"
    opt.step()
    opt.zero_grad()
    losses.append(out.loss.item())
moved = sum(not torch.equal(b, p.detach().full_tensor()) for b, p in zip(before, trainable))
print("moved", moved, "of", len(trainable), "losses", losses)
assert moved == len(trainable)
assert losses[-1] < losses[0] - 0.05, losses

# the optimizer state round-trips in the engine's form (full, keyed by name) onto fresh parameters'
# optimizer, as a resumed run loads it after accelerate.prepare
from minigem.errors import ConfigError
from minigem.training.engines import FSDP, PLAIN, load_optimizer_state, optimizer_state
saved = optimizer_state(FSDP, model, opt)
assert saved["engine"] == FSDP and len(saved["state"]["state"]) == len(trainable)
fresh = torch.optim.AdamW(trainable, lr=1e-3)
load_optimizer_state(FSDP, model, fresh, saved, "ckpt")
for p in trainable:
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(fresh.state[p][k].full_tensor(), opt.state[p][k].full_tensor()), k
try:
    load_optimizer_state(FSDP, model, fresh, optimizer_state(PLAIN, model, opt), "ckpt")
    raise AssertionError("a plain state loaded under FSDP")
except ConfigError as e:
    assert "saved under plain and this run uses fsdp" in str(e), e
print("optimizer state round-trip ok")
dist.destroy_process_group()
"""


def test_fsdp2_one_process_trains_on_cpu() -> None:
    # its own process: the process group must not leak into the other tests' accelerate state
    port = str(29500 + (hash(str(ROOT)) % 400))
    res = subprocess.run([sys.executable, "-c", FSDP_SCRIPT, port], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "moved" in res.stdout and "optimizer state round-trip ok" in res.stdout
