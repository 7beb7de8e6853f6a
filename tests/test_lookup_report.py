"""scripts/lookup_report.py: a split's lookups bucketed by the scene's other objects."""

from __future__ import annotations

import json
import re

import pytest
from conftest import load_script

from minigem.data.synth import gen_prompt, make_conversation


def _write(tmp_path, seed, n, tasks, predict):
    records, preds = [], []
    for i in range(n):
        scene, category, messages = make_conversation(i, seed, tasks)
        rid = f"synth-{seed}-{i:07d}"
        records.append({"id": rid, "category": category, "conversations": [
            {"from": "human", "value": messages[0].content},
            {"from": "gpt", "value": messages[1].content}]})
        said = predict(scene, category, messages[0].content.removeprefix("<image>\n"),
                       messages[1].content)
        preds.append({"id": rid, "category": category, "prediction": said,
                      "reference": messages[1].content, "correct": said == messages[1].content})
    (tmp_path / "data.json").write_text(json.dumps(records))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    return tmp_path / "data.json", tmp_path / "p.jsonl"


def test_lookups_bucketed_and_wrong_objects_found(tmp_path) -> None:
    """A model that answers with another object's place or glyph whenever the scene has one is
    right only where the target is alone (or its glyph is the other's too), and each wrong answer is counted as another object's;
    a split made with other tasks, or a record missing from data.json, is an error naming it."""
    lr = load_script("lookup_report")

    def other_objects_answer(scene, category, question, answer):
        m = re.match(r"(?:Where is|What is written on) the (\w+) (\w+)\?", question)
        if not m or category not in ("position", "glyph"):
            return answer
        others = [o.position if category == "position" else o.glyph for o in scene.objects
                  if (o.color, o.shape) != (m[1], m[2])
                  and (category == "position" or o.glyph is not None)]
        return next((a for a in others if a != answer), answer)  # two objects may share a glyph

    data, preds = _write(tmp_path, 9, 400, None, other_objects_answer)
    out = lr.report(data, preds, None)
    assert {k.split(" | ")[0] for k in out} == {"glyph", "position"}
    for key, r in out.items():
        if key.endswith("| alone"):
            assert r["right"] == r["n"] > 0 and r["wrong_is_another_objects"] == 0, key
        else:
            assert r["wrong_is_another_objects"] == r["n"] - r["right"] > 0, key
            if key.startswith("position"):  # places are never shared
                assert r["right"] == 0, key
    assert sum(r["n"] for r in out.values()) == sum(
        json.loads(line)["category"] in ("glyph", "position") for line in preds.read_text().splitlines())
    assert any("shares the shape" in k for k in out)

    with pytest.raises(SystemExit, match="other --tasks"):
        lr.report(data, preds, ["position", "glyph"])
    (tmp_path / "data.json").write_text("[]")
    with pytest.raises(SystemExit, match="is not in"):
        lr.report(data, preds, None)


def test_draw_at_a_place_requests(tmp_path, capsys) -> None:
    """In-context "draw the object at the <place>" requests: an answer naming the object there is
    right, one naming another object of the scene is counted as such; the CLI prints a table."""
    lr = load_script("lookup_report")

    def neighbour(scene, category, question, answer):
        m = re.match(r"draw the object at the (.+) of this picture", question)
        if not m:
            return answer
        (o,) = [o for o in scene.objects if o.position == m[1]]
        others = [p for p in scene.objects if p is not o]
        pick = others[0] if others else o
        return f"Sure. <h>{gen_prompt(pick.color, pick.shape)}</h>"

    data, preds = _write(tmp_path, 4, 300, ["generation"], neighbour)
    out = lr.report(data, preds, ["generation"])
    assert out and all(k.startswith("draw the object at a place") for k in out)
    assert out["draw the object at a place | alone"]["right"] == \
        out["draw the object at a place | alone"]["n"] > 0
    assert all(r["right"] == 0 and r["wrong_is_another_objects"] == r["n"]
               for k, r in out.items() if not k.endswith("alone"))
    assert lr.main(["--data", str(data), "--predictions", str(preds), "--tasks", "generation"]) == 0
    assert "| draw the object at a place | alone |" in capsys.readouterr().out
    # two splits pooled: every count doubles
    assert lr.main(["--data", str(data), str(data), "--predictions", str(preds), str(preds),
                    "--tasks", "generation", "--json"]) == 0
    pooled = json.loads(capsys.readouterr().out)
    assert {k: r["n"] for k, r in pooled.items()} == {k: 2 * r["n"] for k, r in out.items()}
    with pytest.raises(SystemExit, match="2 --data files but 1 --predictions"):
        lr.main(["--data", str(data), str(data), "--predictions", str(preds)])
