"""scripts/compare_runs.py: the first logged step where two runs part, and what differs in the
environments they ran under."""

from __future__ import annotations

import json

from conftest import load_script, tiny_recipe

from minigem.cli import main as cli

STAGE = {"name": "instruct", "train": ["connector", "llm"],
         "data": {"synth": {"n": 16, "seed": 3, "image_size": 96}},
         "lr": 1e-3, "batch_size": 4, "steps": 3}


def _run(path, rows, env=None):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if env is not None:
        (path / "environment.json").write_text(json.dumps({"calls": [env]}))
    return path


def _rows(losses, stage="s"):
    return [{"stage": stage, "step": 10 * (i + 1), "loss": v} for i, v in enumerate(losses)]


def test_equal_runs_of_the_same_recipe(tmp_path, capsys):
    """Two real runs of one recipe on this machine: every logged loss equal, same environment."""
    cr = load_script("compare_runs")
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        assert cli(["train", str(tiny_recipe(d, [STAGE]))]) == 0
    capsys.readouterr()
    assert cr.main([str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run")]) == 0
    out = capsys.readouterr().out
    assert "3 shared logged steps" in out and "equal at every shared step" in out
    assert "environment: the same" in out


def test_first_difference_in_stage_order_and_environment(tmp_path, capsys):
    cr = load_script("compare_runs")
    env = {"torch": "2", "cpu_capability": "AVX512", "threads": 2}
    # stage "b" is logged after "a" although it sorts first by name; the difference in "a" comes first
    a = _run(tmp_path / "a", _rows([1.0, 2.0], "z") + _rows([5.0, 6.0], "b"), env)
    b = _run(tmp_path / "b", _rows([1.0, 2.5], "z") + _rows([5.0, 9.0], "b"),
             {**env, "cpu_capability": "AVX2"})
    assert cr.main([str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "first difference: z step 20: 2.0 vs 2.5" in out
    assert "largest difference 3 at b step 20" in out
    assert "cpu_capability: 'AVX512' -> 'AVX2'" in out
    # a NaN against a number is a difference (NaN against NaN is not)
    nan = float("nan")
    c = _run(tmp_path / "c", _rows([1.0, nan]))
    assert cr.main([str(c), str(_run(tmp_path / "d", _rows([1.0, 2.0])))]) == 1
    assert "first difference: s step 20: nan vs 2.0" in capsys.readouterr().out
    assert cr.main([str(c), str(_run(tmp_path / "e", _rows([1.0, nan])))]) == 0
    capsys.readouterr()
    # a tolerance and a stage filter
    assert cr.main([str(a), str(b), "--tol", "0.6", "--stage", "z"]) == 0
    assert "equal at every shared step (tolerance 0.6)" in capsys.readouterr().out


def test_bad_input_is_named(tmp_path, capsys):
    cr = load_script("compare_runs")
    good = _run(tmp_path / "good", _rows([1.0]))
    assert cr.main([str(good), str(tmp_path / "missing")]) == 2
    assert "missing: no metrics.jsonl" in capsys.readouterr().err
    cases = {  # metrics.jsonl text -> the error it gets
        '{"stage": "s", "step": 10, "loss": 1}\n{oops\n': "metrics.jsonl:2: not a JSON line",
        '{"stage": "t", "step": 10, "loss": 1}\n': "share no logged step",
        '{"loss": 1}\n': "needs 'stage' and 'step'",
    }
    for i, (text, error) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}"
        bad.mkdir()
        (bad / "metrics.jsonl").write_text(text)
        assert cr.main([str(good), str(bad)]) == 2
        assert error in capsys.readouterr().err
