"""Where two training runs part: the first logged step whose values differ, and their environments.

Runs of one recipe on one machine replay bit for bit, so two runs that should be the same (a
rerun on newer code, a resumed run, the same recipe on another machine) can be compared step by
step from their `metrics.jsonl`:

    python scripts/compare_runs.py runs/a runs/b [--key loss] [--stage llava] [--tol 0]

It prints how many logged steps both runs share, whether they are equal (within `--tol`,
absolute), the first step where they are not, the largest difference, and the fields of the
runs' `environment.json` (their last calls) that differ: the CPU kernels, threads or library
versions that make machines disagree in the last bit (docs/training.md, "Outputs, checkpoints
and resume").
Exit status: 0 when every shared step agrees, 1 when one differs, 2 on bad input. Used in the
twenty-sixth session to show that the nineteenth session's code gives today's `tiny-mgm` losses
to the last digit (docs/mini-gemini.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

METRICS = "metrics.jsonl"
ENVIRONMENT = "environment.json"


def read_metrics(run: Path, key: str) -> dict[tuple[str, int], float]:
    """(stage, step) -> value of `key` for every logged line of RUN/metrics.jsonl that has it."""
    path = run / METRICS if run.is_dir() else run
    if not path.is_file():
        raise SystemExit(f"{run}: no {METRICS} (a run's output directory or the file is expected)")
    out: dict[tuple[str, int], float] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise SystemExit(f"{path}:{n}: not a JSON line ({e})") from None
        if not isinstance(rec, dict) or "stage" not in rec or "step" not in rec:
            raise SystemExit(f"{path}:{n}: a metrics line needs 'stage' and 'step', got {line[:80]!r}")
        if key in rec:
            out[(str(rec["stage"]), int(rec["step"]))] = float(rec[key])
    return out


def last_environment(run: Path) -> dict | None:
    path = run / ENVIRONMENT
    if not run.is_dir() or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["calls"][-1]
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def compare(a: dict[tuple[str, int], float], b: dict[tuple[str, int], float], order: list[str],
            tol: float = 0.0) -> dict:
    """Shared steps in stage order (`order`: the stages as the run logged them), the first that
    differs by more than `tol`, and the largest difference."""
    rank = {s: i for i, s in enumerate(order)}
    shared = sorted(set(a) & set(b), key=lambda k: (rank.get(k[0], len(rank)), k[1]))
    first, worst = None, (0.0, None)
    for k in shared:
        nans = math.isnan(a[k]) + math.isnan(b[k])  # NaN against a number differs; NaN against NaN not
        d = abs(a[k] - b[k]) if nans == 0 else (math.inf if nans == 1 else 0.0)
        if d > tol and first is None:
            first = k
        if d > worst[0]:
            worst = (d, k)
    return {"shared": len(shared), "first": first, "max_diff": worst[0], "max_at": worst[1],
            "last": shared[-1] if shared else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--key", default="loss", help="the logged value to compare (default: loss)")
    p.add_argument("--stage", action="append", help="only these stages (repeatable)")
    p.add_argument("--tol", type=float, default=0.0, help="absolute tolerance (default 0: bit-equal)")
    args = p.parse_args(argv)
    try:
        a, b = read_metrics(args.a, args.key), read_metrics(args.b, args.key)
    except SystemExit as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.stage:
        a = {k: v for k, v in a.items() if k[0] in args.stage}
        b = {k: v for k, v in b.items() if k[0] in args.stage}
    r = compare(a, b, list(dict.fromkeys(stage for stage, _ in a)), args.tol)  # A's logging order
    if r["shared"] == 0:
        print(f"error: the runs share no logged step with {args.key!r}", file=sys.stderr)
        return 2
    print(f"{r['shared']} shared logged steps of {args.key!r} (A has {len(a)}, B has {len(b)}), "
          f"the last {r['last'][0]} step {r['last'][1]}")
    if r["first"] is None:
        print(f"equal at every shared step (tolerance {args.tol})")
    else:
        s, n = r["first"]
        print(f"first difference: {s} step {n}: {a[r['first']]!r} vs {b[r['first']]!r}")
        print(f"largest difference {r['max_diff']:.6g} at {r['max_at'][0]} step {r['max_at'][1]}")
    ea, eb = last_environment(args.a), last_environment(args.b)
    if ea is None or eb is None:
        print("environment: not recorded for " + " and ".join(
            str(x) for x, e in ((args.a, ea), (args.b, eb)) if e is None))
    else:
        from minigem.training.environment import differences

        diff = differences(ea, eb)
        print("environment: " + ("the same" if not diff else "; ".join(diff)))
    return 0 if r["first"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
