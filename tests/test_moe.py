"""SparseMoE (MoE-LLaVA): upcycling, Mixtral parity, dispatch, capacity, aux loss, placement."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralSparseMoeBlock
from transformers.models.phi.modeling_phi import PhiMLP

from minigem.config import MoEConfig
from minigem.errors import ConfigError
from minigem.llm.moe import (
    SparseMoE,
    apply_moe,
    collect_aux_loss,
    moe_layer_indices,
    moe_parameters,
)

H, F = 32, 64


def _gated() -> nn.Module:
    cfg = AutoConfig.for_model("llama", hidden_size=H, intermediate_size=F, hidden_act="silu")
    return LlamaMLP(cfg)


def _fc() -> nn.Module:
    return PhiMLP(AutoConfig.for_model("phi", hidden_size=H, intermediate_size=F))


def _moe(ffn: nn.Module | None = None, **kw) -> SparseMoE:
    """A SparseMoE with distinct random experts and a random router."""
    moe = SparseMoE(ffn or _gated(), H, MoEConfig(**kw))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    return moe


def _naive(moe: SparseMoE, x: torch.Tensor, keep: set[tuple[int, int]] | None = None):
    """Per-token reference: y_t = sum_j gate_tj * expert_{e_tj}(x_t), for kept (token, rank)."""
    probs = (x @ moe.router.weight.T).softmax(-1)
    top_p, top_i = probs.topk(moe.top_k, dim=-1)
    gates = top_p / top_p.sum(-1, keepdim=True)
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros(x.shape[-1])
        for j in range(moe.top_k):
            if keep is None or (t, j) in keep:
                y = y + gates[t, j] * moe.experts[int(top_i[t, j])](x[t : t + 1])[0]
        rows.append(y)
    return torch.stack(rows), top_i


# ----------------------------------------------------------------------------- upcycling


@pytest.mark.parametrize("make_ffn", [_gated, _fc], ids=["gated", "fc1_fc2"])
@pytest.mark.parametrize("shared", [False, True])
def test_upcycled_layer_equals_dense_ffn(make_ffn, shared: bool) -> None:
    torch.manual_seed(0)
    dense = make_ffn()
    moe = SparseMoE(dense, H, MoEConfig(num_experts=4, top_k=2, shared_expert=shared))
    with torch.no_grad():  # any routing: random router (and mixing) weights
        moe.router.weight.normal_(0, 2.0)
        if moe.shared_coef is not None:
            moe.shared_coef.weight.normal_(0, 2.0)
    x = torch.randn(3, 11, H)
    for train in (True, False):
        moe.train(train)
        torch.testing.assert_close(moe(x), dense(x), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- HF parity


def test_parity_with_hf_mixtral_sparse_moe_block() -> None:
    torch.manual_seed(0)
    mcfg = MixtralConfig(
        hidden_size=H,
        intermediate_size=F,
        num_local_experts=4,
        num_experts_per_tok=2,
        hidden_act="silu",
        router_jitter_noise=0.0,
    )
    ref = MixtralSparseMoeBlock(mcfg).eval()
    ours = _moe(num_experts=4, top_k=2).eval()
    with torch.no_grad():  # transformers 5: experts fused as [E, 2F, H] gate_up and [E, H, F] down
        ref.gate.weight.copy_(ours.router.weight)
        for e, ex in enumerate(ours.experts):
            ref.experts.gate_up_proj[e].copy_(torch.cat([ex.gate_proj.weight, ex.up_proj.weight]))
            ref.experts.down_proj[e].copy_(ex.down_proj.weight)
    x = torch.randn(2, 9, H)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_dispatch_equals_per_token_reference(top_k: int) -> None:
    torch.manual_seed(1)
    moe = _moe(num_experts=4, top_k=top_k)
    x = torch.randn(37, H)
    with torch.no_grad():
        want, _ = _naive(moe, x)
        torch.testing.assert_close(moe(x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(moe(x[:1]), want[:1], atol=1e-5, rtol=1e-5)  # decode: T=1


def test_capacity_drops_exactly_the_overflow() -> None:
    torch.manual_seed(2)
    moe = _moe(num_experts=4, top_k=2, capacity_factor=0.5, eval_capacity_factor=None)
    with torch.no_grad():
        moe.router.weight[0] += 0.5  # skew the routing so some experts overflow
    x = torch.randn(24, H)
    cap = math.ceil(24 / 4 * 0.5 * 2)  # 6
    _, top_i = _naive(moe, x)
    # Independent: first choices before second choices, each in token order, first `cap` kept.
    used, keep = [0] * 4, set()
    for j in range(2):
        for t in range(24):
            e = int(top_i[t, j])
            if used[e] < cap:
                used[e] += 1
                keep.add((t, j))
    assert len(keep) < 48, "test setup: nothing overflowed"
    want, _ = _naive(moe, x, keep)
    with torch.no_grad():
        got = moe.train()(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert moe.load == used and moe.dropped == 48 - len(keep)
    with torch.no_grad():  # eval_capacity_factor None: dropless in eval
        torch.testing.assert_close(moe.eval()(x), _naive(moe, x)[0], atol=1e-5, rtol=1e-5)
    assert moe.dropped == 0


def test_capacity_respects_min_capacity() -> None:
    moe = _moe(num_experts=4, top_k=2, capacity_factor=0.01, min_capacity=5)
    assert moe.train().capacity(100) == 5
    assert moe.eval().capacity(100) is None


def test_eval_routing_is_deterministic() -> None:
    torch.manual_seed(3)
    moe = _moe(num_experts=4, top_k=2, capacity_factor=1.0, eval_capacity_factor=2.0).eval()
    x = torch.randn(2, 16, H)
    with torch.no_grad():
        assert torch.equal(moe(x), moe(x))


def test_bf16_runs_and_tracks_fp32() -> None:
    torch.manual_seed(4)
    moe = _moe(num_experts=4, top_k=2).eval()
    x = torch.randn(2, 5, H)
    with torch.no_grad():
        want = moe(x)
        got = moe.to(torch.bfloat16)(x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)


# ----------------------------------------------------------------------------- aux loss, grads


def test_aux_loss_matches_formula_and_collects() -> None:
    torch.manual_seed(5)
    moe = _moe(num_experts=4, top_k=2, aux_loss_coef=0.01, z_loss_coef=0.001)
    x = torch.randn(2, 13, H)
    moe(x)
    logits = x.reshape(-1, H) @ moe.router.weight.T
    probs = logits.softmax(-1)
    frac = torch.stack([(probs.argmax(-1) == i).float().mean() for i in range(4)])
    balance = 4 * (probs.mean(0) * frac).sum()
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    torch.testing.assert_close(moe.aux_loss, 0.01 * balance + 0.001 * z)
    holder = nn.ModuleDict({"a": moe, "b": nn.Linear(2, 2)})
    total, per_layer = collect_aux_loss(holder)
    assert per_layer == {"a": pytest.approx(moe.aux_loss.item())}
    torch.testing.assert_close(total, moe.aux_loss)
    assert collect_aux_loss(nn.Linear(2, 2))[1] == {}


def test_gradients_reach_router_and_every_expert() -> None:
    torch.manual_seed(6)
    moe = _moe(num_experts=4, top_k=2, shared_expert=True)
    x = torch.randn(1, 3, H, requires_grad=True)  # 3 tokens: some expert may be idle
    loss = moe(x).square().sum() + collect_aux_loss(moe)[0]
    loss.backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    for p in moe.parameters():  # idle experts run on 0 rows: zero grads, never None (DDP-safe)
        assert p.grad is not None
    assert sum(p.grad.abs().sum() for p in moe.experts.parameters()) > 0
    assert x.grad is not None


# ----------------------------------------------------------------------------- placement

ARCHS = {
    "llama": {},
    "qwen2": {},
    "mistral": {},
    "gemma": {"head_dim": 8},
    "phi": {},
    "stablelm": {},
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_apply_moe_keeps_logits_on_each_arch(arch: str) -> None:
    torch.manual_seed(7)
    hf = AutoConfig.for_model(
        arch,
        hidden_size=H,
        intermediate_size=F,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        **ARCHS[arch],
    )
    lm = AutoModelForCausalLM.from_config(hf).eval()
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        before = lm(ids).logits
        assert apply_moe(lm, MoEConfig(layers="sparse")) == [0, 2]
        after = lm(ids).logits
    layers = lm.get_decoder().layers
    assert [isinstance(layer.mlp, SparseMoE) for layer in layers] == [True, False, True]
    assert not layers[0].mlp.training  # inherits eval mode from the layer it replaces
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert collect_aux_loss(lm)[1] == {}  # no-grad eval (generation): aux loss skipped
    lm(ids)  # with autograd on
    total, per_layer = collect_aux_loss(lm)
    assert set(per_layer) == {"model.layers.0.mlp", "model.layers.2.mlp"} and total > 0
    names = [n for n, _ in moe_parameters(lm)]
    assert names and all(
        n.startswith(("model.layers.0.mlp.", "model.layers.2.mlp.")) for n in names
    )
    assert any(n.endswith("router.weight") for n in names)


@pytest.mark.parametrize(
    ("n", "spec", "want"),
    [
        (5, "sparse", [0, 2, 4]),
        (4, "first_half", [0, 1]),
        (5, "second_half", [2, 3, 4]),
        (3, "all", [0, 1, 2]),
        (6, [5, 1], [1, 5]),
    ],
)
def test_moe_layer_indices(n: int, spec, want: list[int]) -> None:
    assert moe_layer_indices(n, spec) == want


def _tiny_llama(layers: int = 2) -> nn.Module:
    hf = AutoConfig.for_model(
        "llama",
        hidden_size=H,
        intermediate_size=F,
        num_hidden_layers=layers,
        num_attention_heads=4,
        vocab_size=64,
    )
    return AutoModelForCausalLM.from_config(hf)


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"num_experts": 2, "top_k": 3}, "top_k=3: must be between 1 and num_experts=2"),
        (
            {"layers": [0, 4]},
            "layer index 4 is out of range: the language model has 2 decoder layers",
        ),
        ({"layers": [1, 1]}, "an index is listed twice"),
        ({"capacity_factor": 0.0}, "capacity_factor=0.0 with min_capacity=0 gives a capacity of 0"),
        ({"eval_capacity_factor": -1.0}, "eval_capacity_factor=-1.0"),
        ({"min_capacity": -1}, "min_capacity=-1: must be >= 0"),
    ],
)
def test_bad_config_errors(kw: dict, msg: str) -> None:
    lm = _tiny_llama()
    with pytest.raises(ConfigError, match=msg):
        apply_moe(lm, MoEConfig(**kw))
    assert not any(isinstance(m, SparseMoE) for m in lm.modules())  # nothing half-converted


def test_structural_errors() -> None:
    with pytest.raises(ConfigError, match="'first_half' selects no layer of a 1-layer model"):
        moe_layer_indices(1, "first_half")
    no_mlp = nn.Module()
    no_mlp.layers = nn.ModuleList([nn.Linear(H, H)])
    with pytest.raises(ConfigError, match=r"decoder layer 0 \(Linear\) has no `mlp` module"):
        apply_moe(no_mlp, MoEConfig(layers="all"))
    with pytest.raises(ConfigError, match="has no decoder-layer list"):
        apply_moe(nn.Linear(2, 2), MoEConfig())
    lm = _tiny_llama()
    apply_moe(lm, MoEConfig())
    with pytest.raises(ConfigError, match="decoder layer 0 is already a SparseMoE"):
        apply_moe(lm, MoEConfig())


def test_aux_loss_trains_router_under_gradient_checkpointing() -> None:
    torch.manual_seed(8)
    lm = _tiny_llama()
    apply_moe(lm, MoEConfig(layers="all"))
    lm.activation_checkpointing_enable()  # transformers default: non-reentrant
    lm.train()
    lm(torch.randint(0, 64, (2, 5)))
    total, per_layer = collect_aux_loss(lm)
    assert len(per_layer) == 2
    total.backward()  # aux loss alone: only routers (and what feeds them) get gradient
    for layer in lm.get_decoder().layers:
        assert layer.mlp.router.weight.grad.abs().sum() > 0
