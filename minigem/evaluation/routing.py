"""Which experts MoE layers pick for image tokens vs text tokens (MoE-LLaVA's routing figures).

`collect_routing(model, source)` runs teacher-forced forwards over whole conversations and
counts, per MoE layer, the top-k expert assignments of every image token and every text token
(padding excluded). The assignments are read with forward hooks on the `SparseMoE` modules,
which re-apply the layer's own deterministic `route()` to the layer input: the routing as the
router chose it, before any capacity limit drops an assignment. `plot_routing` draws one bar
chart per layer (bars per expert, image vs text).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from minigem.errors import ConfigError

KINDS = ("image", "text")


@dataclass
class RoutingStats:
    """Top-k assignment counts per layer, expert and token kind."""

    layers: list[int]  # decoder-layer indices of the MoE layers
    num_experts: int
    top_k: int
    counts: dict[int, dict[str, list[int]]] = field(default_factory=dict)  # layer -> kind -> [E]
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    records: int = 0

    def shares(self) -> dict[int, dict[str, list[float] | None]]:
        """layer -> kind -> share of that kind's assignments per expert (sums to 1; None if no token)."""
        out: dict[int, dict[str, list[float] | None]] = {}
        for layer in self.layers:
            out[layer] = {}
            for kind in KINDS:
                c = self.counts[layer][kind]
                total = sum(c)
                out[layer][kind] = [x / total for x in c] if total else None
        return out

    def to_dict(self) -> dict:
        return {"records": self.records, "num_experts": self.num_experts, "top_k": self.top_k,
                "tokens": self.tokens,
                "layers": {str(k): v for k, v in self.shares().items()}}

    def format(self) -> str:
        lines = [f"routing over {self.records} records ({self.tokens['image']} image tokens, "
                 f"{self.tokens['text']} text tokens), top-{self.top_k} of {self.num_experts} experts"]
        for layer, kinds in self.shares().items():
            for kind, share in kinds.items():
                cells = "  ".join(f"{s:6.1%}" for s in share) if share else "(no tokens)"
                lines.append(f"  layer {layer:>3} {kind:<5} {cells}")
        return "\n".join(lines)


def moe_by_layer(model) -> dict[int, torch.nn.Module]:
    """Decoder-layer index -> SparseMoE of a VisionLanguageModel; ConfigError if there is none."""
    from minigem.llm.moe import SparseMoE, decoder_layers

    found = {i: layer.mlp for i, layer in enumerate(decoder_layers(model.language_model))
             if isinstance(getattr(layer, "mlp", None), SparseMoE)}
    if not found:
        raise ConfigError(
            "the model has no MoE layers: inspect-routing needs a sparse model (converted with "
            "`minigem convert --from moe-llava`, or trained by a recipe with an `upcycle` stage)"
        )
    return found


def _count(stats: RoutingStats, kinds: dict[str, torch.Tensor], layer: int, module, inputs, output) -> None:
    x = inputs[0]
    x = x.reshape(-1, x.shape[-1])  # [T, H]
    _, _, top_i = module.route(x)  # [T, k]
    for kind, mask in kinds.items():
        ids = top_i[mask.reshape(-1)].reshape(-1)  # [n * k]
        counts = torch.bincount(ids, minlength=stats.num_experts).tolist()
        row = stats.counts[layer][kind]
        for e, c in enumerate(counts):
            row[e] += c


@torch.inference_mode()
def collect_routing(model, source, limit: int | None = None, batch_size: int = 8) -> RoutingStats:
    """Count top-k assignments per MoE layer for image vs text tokens over `source` records."""
    from minigem.data.collate import SampleEncoder, collate

    moes = moe_by_layer(model)
    first = next(iter(moes.values()))
    stats = RoutingStats(sorted(moes), first.num_experts, first.top_k)
    stats.counts = {i: {k: [0] * first.num_experts for k in KINDS} for i in moes}
    encode = SampleEncoder.for_model(model)
    pad = model.tokenizer.pad_token_id or 0
    kinds: dict[str, torch.Tensor] = {}  # the current batch's token masks, read by the hooks
    hooks = [m.register_forward_hook(partial(_count, stats, kinds, i)) for i, m in moes.items()]
    was_training = model.training
    model.eval()
    n = len(source) if limit is None else min(limit, len(source))
    try:
        for lo in range(0, n, batch_size):
            batch = collate([encode(source[i]) for i in range(lo, min(n, lo + batch_size))], pad_id=pad)
            batch = {k: (v.to(model.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            real = batch["attention_mask"].bool()  # [B, S]
            image = batch["input_ids"] == model.image_token_id  # [B, S]
            kinds["image"], kinds["text"] = real & image, real & ~image
            for kind in KINDS:
                stats.tokens[kind] += int(kinds[kind].sum())
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  pixel_values=batch["pixel_values"], pixel_values_aux=batch["pixel_values_aux"],
                  logits_to_keep=1)
            stats.records += batch["input_ids"].shape[0]
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return stats


def plot_routing(stats: RoutingStats, path: str | Path) -> Path:
    """A grid of bar charts (one per MoE layer): share of assignments per expert, image vs text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shares = stats.shares()
    cols = min(4, len(stats.layers))
    rows = -(-len(stats.layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True)
    xs = torch.arange(stats.num_experts).float()
    width = 0.4
    for ax, layer in zip(axes.flat, stats.layers, strict=False):
        for j, (kind, colour) in enumerate(zip(KINDS, ("tab:orange", "tab:blue"), strict=True)):
            share = shares[layer][kind] or [0.0] * stats.num_experts
            ax.bar((xs + (j - 0.5) * width).tolist(), share, width, color=colour, label=kind)
        ax.axhline(1 / stats.num_experts, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(f"layer {layer}")
        ax.set_xticks(xs.tolist(), [str(e) for e in range(stats.num_experts)])
        ax.set_xlabel("expert")
    for ax in list(axes.flat)[len(stats.layers):]:
        ax.axis("off")
    axes[0][0].set_ylabel("share of tokens")
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"top-{stats.top_k} routing: image vs text tokens ({stats.records} records)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
