"""Where a model's object lookups fail on a synthetic split, by what else is in the scene.

A question like "Where is the red circle?" or "What is written on the red circle?" names its object
by colour and shape together. This report re-derives each record's scene from its id (the split
must come from `minigem data synth`, with the same `--tasks`) and splits a model's answers
(`minigem eval --predictions P`) by the other objects the scene holds: none, some that share
neither attribute, some that share the shape, the colour, or both (for glyph questions only other
objects with a glyph count). For each wrong answer it says whether it is another object's answer
(another object's place or glyph), the sign of a lookup that found the wrong object rather than
a misread one. Requests to draw "the object at the <place> of this picture" are split the same
way by the object the answer names.

    python scripts/lookup_report.py --data D/data.json --predictions P.jsonl [--tasks T,..] [--json]

Several splits are pooled with `--data D1/data.json D2/data.json --predictions P1 P2` (in pairs).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from minigem.data.synth import Scene, make_conversation

NAMED = re.compile(r"^(?:Where is|What is written on) the (\w+) (\w+)\?$")
AT_PLACE = re.compile(r"^draw the object at the (.+) of this picture <GEN>$")


def _record_scene(rid: str, question: str, tasks: list[str] | None) -> Scene:
    """The scene of record `rid` ("synth-SEED-INDEX"), checked against its question."""
    try:
        _, seed, index = rid.split("-")
        scene, _, messages = make_conversation(int(index), int(seed), tasks)
    except ValueError as e:
        raise SystemExit(f"record {rid!r}: not a synthetic-world id (synth-SEED-INDEX): {e}") from e
    if messages[0].content != question:
        raise SystemExit(f"record {rid!r}: its question {question!r} is not what seed and index give "
                         f"({messages[0].content!r}); was the split made with other --tasks?")
    return scene


def _bucket(others: list, target) -> str:
    if not others:
        return "alone"
    shape = any(o.shape == target.shape for o in others)
    color = any(o.color == target.color for o in others)
    return {(False, False): "others share nothing", (True, False): "another shares the shape",
            (False, True): "another shares the colour", (True, True): "others share both"}[shape, color]


def report(data: Path, predictions: Path, tasks: list[str] | None,
           rows: dict[tuple[str, str], list[int]] | None = None) -> dict:
    """{"KIND | BUCKET": {right, n, wrong_is_another_objects}}; `rows` pools several calls."""
    records = {r["id"]: r for r in json.loads(data.read_text())}
    if rows is None:
        rows = defaultdict(lambda: [0, 0, 0])  # right, n, wrong answers that are another object's
    for k, line in enumerate(predictions.read_text().splitlines(), 1):
        pred = json.loads(line)
        rec = records.get(pred["id"])
        if rec is None:
            raise SystemExit(f"{predictions}:{k}: record {pred['id']!r} is not in {data}")
        question = rec["conversations"][0]["value"]
        text = question.removeprefix("<image>\n")
        if pred["category"] in ("position", "glyph") and (m := NAMED.match(text)):
            scene = _record_scene(pred["id"], question, tasks)
            (target,) = [o for o in scene.objects if (o.color, o.shape) == (m[1], m[2])]
            others = [o for o in scene.objects if o is not target
                      and (pred["category"] == "position" or o.glyph is not None)]
            answers = {o.position if pred["category"] == "position" else o.glyph for o in others}
            kind, right = pred["category"], bool(pred["correct"])
            other = not right and pred["prediction"] in answers
        elif pred["category"] == "generation" and (m := AT_PLACE.match(text)):
            scene = _record_scene(pred["id"], question, tasks)
            (target,) = [o for o in scene.objects if o.position == m[1]]
            others = [o for o in scene.objects if o is not target]
            said = pred["prediction"]
            right = f"{target.color} {target.shape}</h>" in said
            other = not right and any(f"{o.color} {o.shape}</h>" in said for o in others)
            kind = "draw the object at a place"
        else:
            continue
        row = rows[kind, _bucket(others, target)]
        row[0] += right
        row[1] += 1
        row[2] += other
    return {f"{kind} | {bucket}": {"right": r, "n": n, "wrong_is_another_objects": o}
            for (kind, bucket), (r, n, o) in sorted(rows.items())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, nargs="+", help="the split's data.json")
    ap.add_argument("--predictions", required=True, type=Path, nargs="+",
                    help="minigem eval --predictions file (one per --data)")
    ap.add_argument("--tasks", default=None, help="the --tasks the split was made with")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if len(args.data) != len(args.predictions):
        raise SystemExit(f"{len(args.data)} --data files but {len(args.predictions)} --predictions")
    for path in (*args.data, *args.predictions):
        if not path.is_file():
            raise SystemExit(f"{path}: no such file")
    rows: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for data, preds in zip(args.data, args.predictions, strict=True):
        out = report(data, preds, args.tasks.split(",") if args.tasks else None, rows)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print("| question | scene | right | wrong: another object's answer |")
    print("|---|---|---:|---:|")
    for key, r in out.items():
        kind, bucket = key.split(" | ")
        wrong = r["n"] - r["right"]
        print(f"| {kind} | {bucket} | {r['right']}/{r['n']} ({r['right'] / r['n']:.0%}) | "
              f"{r['wrong_is_another_objects']}/{wrong} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
