"""Evaluation: answer normalisation and scores; the runner on a stub model that knows the answers."""

from __future__ import annotations

import pytest

from minigem.data.records import Message, Sample
from minigem.data.synth import SynthSource
from minigem.evaluation.metrics import (
    exact_match,
    gen_span_match,
    has_span,
    normalize_answer,
    parse_span,
    span_objects,
    token_f1,
)
from minigem.evaluation.runner import EvalReport, evaluate


@pytest.mark.parametrize("text, norm", [
    ("The Red circle!", "red circle"),
    ("Two.", "2"),
    ("an apple, a pear", "apple pear"),
    ("top-left", "top left"),
    ("  Yes  ", "yes"),
    ("There are TEN objects", "there are 10 objects"),
    ("", ""),
])
def test_normalize_answer(text, norm):
    assert normalize_answer(text) == norm


def test_exact_match():
    assert exact_match("Two.", "2")
    assert exact_match("The top left", "top-left")
    assert exact_match("RED", "red")
    assert not exact_match("red circle", "red")
    assert not exact_match("3", "2")


def test_token_f1():
    assert token_f1("red circle", "a red square") == pytest.approx(0.5)
    assert token_f1("red red circle", "red circle") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert token_f1("the red circle", "Red circle.") == 1.0
    assert token_f1("blue", "red") == 0.0
    assert token_f1("", "") == 1.0
    assert token_f1("the", "red") == 0.0  # nothing left of the prediction
    assert token_f1("", "red") == 0.0


class StubModel:
    """Answers from a list, in request order; records what it was asked and in which mode."""

    def __init__(self, answers: list[str]) -> None:
        self.answers = list(answers)
        self.training = True
        self.requests: list = []
        self.batches: list[int] = []
        self.kwargs: list[dict] = []
        self.modes: list[bool] = []

    def eval(self):
        self.training = False
        return self

    def train(self, mode: bool = True):
        self.training = mode
        return self

    def chat_batch(self, requests, **kw):
        self.modes.append(self.training)
        self.requests += requests
        self.batches.append(len(requests))
        self.kwargs.append(kw)
        out, self.answers = self.answers[: len(requests)], self.answers[len(requests):]
        return out


def _refs(source, n=None) -> list[str]:
    n = len(source) if n is None else n
    return [source[i].messages[-1].content for i in range(n)]


@pytest.fixture(scope="module")
def source():
    return SynthSource(40, seed=0, image_size=96)


def test_perfect_answers_score_100(source):
    refs = _refs(source)
    stub = StubModel(refs)
    report = evaluate(stub, source, batch_size=16, max_new_tokens=7)
    cats = [source[i].category for i in range(len(source))]
    short = [c for c in cats if c not in ("caption", "conversation")]
    assert len(short) >= 10 and len(set(cats) - set(short)) == 2  # the data covers both kinds
    assert report.accuracy == 1.0 and report.n_scored == len(short)
    assert set(report.per_category) == set(short)
    assert all(r["accuracy"] == 1.0 for r in report.per_category.values())
    assert {c: r["n"] for c, r in report.per_category.items()} == {c: short.count(c) for c in set(short)}
    # captions and conversations are reported apart, with token F1, never in the accuracy
    assert set(report.long_form) == {"caption", "conversation"}
    assert report.long_form["caption"] == {"f1": 1.0, "n": cats.count("caption")}
    assert report.long_form["conversation"] == {"f1": 1.0, "n": cats.count("conversation")}
    # how the model was driven: batches, greedy, eval mode, then back to training mode
    assert stub.batches == [16, 16, 8]
    assert stub.kwargs == [{"max_new_tokens": 7, "temperature": 0.0}] * 3
    assert stub.modes == [False] * 3 and stub.training is True
    # the prompt is everything before the last answer, with the record's images
    for i, (images, messages) in enumerate(stub.requests):
        s = source[i]
        assert messages == s.messages[:-1] and messages[-1].role == "user"
        assert len(images) == 1 and images[0].tobytes() == s.images[0].tobytes()


def test_wrong_answers_in_one_category(source):
    refs = _refs(source)
    cats = [source[i].category for i in range(len(source))]
    wrong = "color" if "color" in cats else next(c for c in cats if c not in ("caption", "conversation"))
    answers = [("purple elephant" if c == wrong else r) for r, c in zip(refs, cats, strict=True)]
    stub = StubModel(answers)
    stub.training = False
    report = evaluate(stub, source, batch_size=7)
    short = [c for c in cats if c not in ("caption", "conversation")]
    assert report.per_category[wrong]["accuracy"] == 0.0
    assert all(r["accuracy"] == 1.0 for c, r in report.per_category.items() if c != wrong)
    assert report.accuracy == pytest.approx(1 - short.count(wrong) / len(short))
    assert stub.training is False  # an eval-mode model stays in eval mode


def test_limit_and_examples(source):
    stub = StubModel(_refs(source, 5))
    report = evaluate(stub, source, batch_size=4, limit=5, keep_examples=2)
    assert stub.batches == [4, 1]
    assert report.n_scored + sum(r["n"] for r in report.long_form.values()) == 5
    assert [e["id"] for e in report.examples] == [source[0].id, source[1].id]
    assert report.examples[0]["prediction"] == report.examples[0]["reference"]


def test_uncategorised_records():
    short = Sample("a", [Message("user", "Q?"), Message("assistant", "two")])
    long = Sample("b", [Message("user", "Q?"), Message("assistant", "a red circle at the top")])
    stub = StubModel(["2", "a red circle"])
    report = evaluate(stub, [short, long])
    assert report.per_category == {"uncategorised": {"accuracy": 1.0, "n": 1}}
    assert report.long_form["uncategorised"]["n"] == 1
    assert report.long_form["uncategorised"]["f1"] == pytest.approx(2 * 1 * 0.5 / 1.5)  # p=[red, circle], r=+[at, top]


def test_report_format_and_dict():
    r = EvalReport(accuracy=0.5, n_scored=4, per_category={"color": {"accuracy": 0.5, "n": 4}},
                   long_form={"caption": {"f1": 0.25, "n": 2}})
    assert r.format() == (
        "accuracy 50.0% on 4 short-answer records\n"
        "  color        50.0%  (n=4)\n"
        "  caption      token F1 0.250  (n=2, not exact-match scored)"
    )
    assert r.to_dict() == {"accuracy": 0.5, "n_scored": 4, "per_category": r.per_category,
                           "long_form": r.long_form}


# ----------------------------------------------------------------------- generation spans


@pytest.mark.parametrize("text, span", [
    ("Sure. <h>a red circle</h>", "a red circle"),
    ("<h> two blue squares on the left </h>", "two blue squares on the left"),
    ("Sure. <h>a red circle", None),
    ("</h>a red circle<h>", None),
    ("<h></h>", None),
    ("<h>a</h> <h>b</h>", None),
    ("red circle", None),
])
def test_parse_span(text, span):
    assert parse_span(text) == span


def test_span_objects_and_match():
    assert span_objects("two Red circles and a big blue square on the left") == {
        ("red", "circle"), ("blue", "square")}
    assert span_objects("a circle") == set()
    ref = "Here it is. <h>a big green triangle</h>"
    assert gen_span_match("Sure. <h>a green triangle at the top</h>", ref)  # size/position not scored
    assert not gen_span_match("Sure. <h>a green circle</h>", ref)
    assert not gen_span_match("Sure. <h>a green triangle and a red square</h>", ref)
    assert not gen_span_match("a green triangle", ref)
    assert not gen_span_match("<h>a green triangle", ref)
    assert has_span("x <h>") and has_span("</h>") and not has_span("a red circle")


def test_evaluate_generation_records():
    src = SynthSource(30, seed=0, image_size=96, mix={"generation": 1.0, "color": 1.0})
    refs = _refs(src)
    assert any("<h>" in r for r in refs) and any("<h>" not in r for r in refs)
    # right spans for half the generation records; a spurious span on one color record
    answers, n_gen, n_other = [], 0, 0
    for i, r in enumerate(refs):
        if src[i].category == "generation":
            answers.append(r if n_gen % 2 == 0 else "Sure. <h>a</h>")
            n_gen += 1
        else:
            answers.append(r if n_other else "<h>" + r + "</h>")
            n_other += 1
    report = evaluate(StubModel(answers), src, batch_size=8)
    assert report.gen_span == {"rate": pytest.approx((n_gen + 1) // 2 / n_gen), "n": n_gen}
    assert report.spurious_span == {"rate": pytest.approx(1 / n_other), "n": n_other}
    assert set(report.per_category) == {"color"}  # generation is not exact-match scored
    assert report.per_category["color"]["n"] == n_other
    d = report.to_dict()
    assert d["gen_span"] == report.gen_span and d["spurious_span"] == report.spurious_span
    assert "gen_span" in report.format()
    # uncategorised records with a span in the reference count as generation
    s = Sample("x", [Message("user", "draw a red circle <GEN>"), Message("assistant", "Sure. <h>a red circle</h>")])
    r2 = evaluate(StubModel(["<h>a red circle</h>"]), [s])
    assert r2.gen_span == {"rate": 1.0, "n": 1} and r2.spurious_span is None
