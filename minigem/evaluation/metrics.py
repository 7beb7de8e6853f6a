"""Answer normalisation and scores: exact match for short answers, token F1 for long ones,
and the `<h>...</h>` drawing-prompt span of generation answers."""

from __future__ import annotations

import re
from collections import Counter

_NUMBERS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> str:
    """VQA-style: lower case, no punctuation or articles, number words as digits."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def token_f1(prediction: str, reference: str) -> float:
    p, r = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


# ---------------------------------------------------------------- generation spans

SPAN_OPEN, SPAN_CLOSE = "<h>", "</h>"


def parse_span(text: str) -> str | None:
    """The inside of a well-formed span (exactly one ``<h>`` and one ``</h>``, in that order,
    with non-blank text between), else None."""
    if text.count(SPAN_OPEN) != 1 or text.count(SPAN_CLOSE) != 1:
        return None
    start = text.index(SPAN_OPEN) + len(SPAN_OPEN)
    end = text.find(SPAN_CLOSE, start)
    if end < 0 or not text[start:end].strip():
        return None
    return text[start:end].strip()


def has_span(text: str) -> bool:
    """Whether `text` holds any span marker (``<h>`` or ``</h>``)."""
    return SPAN_OPEN in text or SPAN_CLOSE in text


def span_objects(prompt: str) -> set[tuple[str, str]]:
    """The (colour, shape) pairs a drawing prompt names: 'two red circles and a blue square'
    -> {('red', 'circle'), ('blue', 'square')} (the synthetic world's colours and shapes)."""
    from minigem.data.synth import COLORS, SHAPES

    pattern = re.compile(rf"\b({'|'.join(COLORS)})\s+({'|'.join(SHAPES)})s?\b")
    return set(pattern.findall(prompt.lower()))


def gen_span_match(prediction: str, reference: str) -> bool:
    """The prediction has a well-formed span naming exactly the reference span's colour+shape
    pairs (count, size and position are not checked)."""
    pred, ref = parse_span(prediction), parse_span(reference)
    if pred is None or ref is None:
        return False
    want = span_objects(ref)
    return bool(want) and span_objects(pred) == want
