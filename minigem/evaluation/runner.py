"""Evaluate a model on LLaVA-format records: accuracy overall and per category.

The last assistant turn of each record is the reference; everything before it is the
prompt. Short-answer categories are scored by normalised exact match; long-form ones
(`caption`, `conversation`, or any answer longer than a few words without a category)
are reported separately with token F1, never mixed into the accuracy. `generation` records
(a request ending in ``<GEN>``, answered with a ``<h>...</h>`` drawing prompt) are scored by
`gen_span` (a well-formed span naming the reference's colour and shape); every other record
by `spurious_span` (the answer holds a span marker it should not have).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from minigem.evaluation.metrics import (
    SPAN_OPEN,
    exact_match,
    gen_span_match,
    has_span,
    token_f1,
)

LONG_FORM = {"caption", "conversation"}
GENERATION = "generation"


@dataclass
class EvalReport:
    accuracy: float  # over short-answer records
    n_scored: int
    per_category: dict[str, dict[str, float]] = field(default_factory=dict)  # acc, n
    long_form: dict[str, dict[str, float]] = field(default_factory=dict)  # f1, n
    examples: list[dict] = field(default_factory=list)  # per record, see `evaluate`
    gen_span: dict[str, float] | None = None  # rate, n (generation records), if any
    spurious_span: dict[str, float] | None = None  # rate, n (all other records), if any

    def to_dict(self) -> dict:
        out = {"accuracy": self.accuracy, "n_scored": self.n_scored,
               "per_category": self.per_category, "long_form": self.long_form}
        if self.gen_span is not None:
            out["gen_span"] = self.gen_span
        if self.spurious_span is not None:
            out["spurious_span"] = self.spurious_span
        return out

    def format(self) -> str:
        lines = [f"accuracy {self.accuracy:.1%} on {self.n_scored} short-answer records"]
        for cat, r in sorted(self.per_category.items()):
            lines.append(f"  {cat:<12} {r['accuracy']:.1%}  (n={int(r['n'])})")
        for cat, r in sorted(self.long_form.items()):
            lines.append(f"  {cat:<12} token F1 {r['f1']:.3f}  (n={int(r['n'])}, not exact-match scored)")
        if self.gen_span is not None:
            lines.append(f"  gen_span     {self.gen_span['rate']:.1%}  (n={int(self.gen_span['n'])}, "
                         "well-formed <h> span naming the requested colour and shape)")
        if self.spurious_span is not None and self.gen_span is not None:
            lines.append(f"  spurious_span {self.spurious_span['rate']:.1%}  "
                         f"(n={int(self.spurious_span['n'])}, <h> in answers to non-<GEN> requests)")
        return "\n".join(lines)


def evaluate(model, source, batch_size: int = 16, max_new_tokens: int = 24,
             limit: int | None = None, keep_examples: int = 0) -> EvalReport:
    """Greedy-decode each record's last answer and score it.

    The first `keep_examples` records (pass ``n`` or more for all) are kept in
    `EvalReport.examples` with their prediction, reference and score: ``correct`` (exact match
    or, for generation records, gen_span) or ``f1`` for long-form ones."""
    n = len(source) if limit is None else min(limit, len(source))
    hits: dict[str, list[bool]] = defaultdict(list)
    f1s: dict[str, list[float]] = defaultdict(list)
    gen: list[bool] = []
    spurious: list[bool] = []
    examples = []
    was_training = model.training
    model.eval()
    for lo in range(0, n, batch_size):
        samples = [source[i] for i in range(lo, min(n, lo + batch_size))]
        requests = []
        for s in samples:
            last = max(i for i, m in enumerate(s.messages) if m.role == "assistant")
            requests.append((s.images, s.messages[:last]))
        preds = model.chat_batch(requests, max_new_tokens=max_new_tokens, temperature=0.0)
        for s, pred in zip(samples, preds, strict=True):
            ref = next(m.content for m in reversed(s.messages) if m.role == "assistant")
            cat = s.category or "uncategorised"
            long_form = cat in LONG_FORM or (s.category is None and len(ref.split()) > 3)
            score: dict[str, object]
            if cat == GENERATION or (s.category is None and SPAN_OPEN in ref):
                gen.append(gen_span_match(pred, ref))
                score = {"correct": gen[-1]}
            else:
                spurious.append(has_span(pred))
                if long_form:
                    f1s[cat].append(token_f1(pred, ref))
                    score = {"f1": f1s[cat][-1]}
                else:
                    hits[cat].append(exact_match(pred, ref))
                    score = {"correct": hits[cat][-1]}
            if len(examples) < keep_examples:
                examples.append({"id": s.id, "category": cat, "prediction": pred, "reference": ref,
                                 **score})
    model.train(was_training)
    scored = [h for v in hits.values() for h in v]
    return EvalReport(
        accuracy=sum(scored) / len(scored) if scored else 0.0,
        n_scored=len(scored),
        per_category={c: {"accuracy": sum(v) / len(v), "n": len(v)} for c, v in hits.items()},
        long_form={c: {"f1": sum(v) / len(v), "n": len(v)} for c, v in f1s.items()},
        examples=examples,
        gen_span={"rate": sum(gen) / len(gen), "n": len(gen)} if gen else None,
        spurious_span={"rate": sum(spurious) / len(spurious), "n": len(spurious)} if spurious else None,
    )
