"""environment.json: what each `minigem train` call ran under, and the warning when a resume runs
under other kernels, threads or libraries than the call before it."""

from __future__ import annotations

import json
import logging

import torch
from conftest import tiny_recipe

from minigem.cli import main
from minigem.training import environment as env

STAGE = {"name": "instruct", "train": ["connector", "llm"],
         "data": {"synth": {"n": 16, "seed": 3, "image_size": 96}},
         "lr": 1e-3, "batch_size": 4, "steps": 3}


def _calls(run):
    return json.loads((run / env.FILE).read_text())["calls"]


def test_describe_reports_this_process(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    info = env.describe("cpu", bf16=False)
    assert info["torch"] == torch.__version__
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["threads"] == torch.get_num_threads()
    assert info["kernel_env"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert "ATEN_CPU_CAPABILITY" not in info["kernel_env"]
    assert info["packages"]["transformers"]  # installed, so a version string
    assert info["device"] == "cpu" and info["bf16"] is False
    json.dumps(info)  # all of it serialisable


def test_differences_name_the_numeric_fields_only():
    a = env.describe("cpu", bf16=False)
    assert env.differences(a, dict(a)) == []
    b = {**a, "cpu_capability": "NOT-" + str(a["cpu_capability"]), "commit": "other", "python": "0"}
    diff = env.differences(a, b)
    assert len(diff) == 1 and diff[0].startswith("cpu_capability: ")


def test_train_records_each_call_and_warns_on_a_changed_resume(tmp_path, monkeypatch, caplog):
    recipe = tiny_recipe(tmp_path, [STAGE])
    run = tmp_path / "run"
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert main(["train", str(recipe), "--stop-after", "1"]) == 0
    calls = _calls(run)
    assert len(calls) == 1 and calls[0]["resumed_from"] is None
    assert calls[0]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()

    # resumed in the same environment: a second entry, no warning
    with caplog.at_level(logging.WARNING, logger="minigem.training.environment"):
        assert main(["train", str(recipe), "--resume", "--stop-after", "1"]) == 0
    assert not [r for r in caplog.records if "another environment" in r.getMessage()]
    calls = _calls(run)
    assert [c["resumed_from"] for c in calls] == [None, "stage0-step0000001"]

    # resumed with another thread setting: recorded and warned about, naming the field
    caplog.clear()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with caplog.at_level(logging.WARNING, logger="minigem.training.environment"):
        assert main(["train", str(recipe), "--resume"]) == 0
    warned = [r.getMessage() for r in caplog.records if "another environment" in r.getMessage()]
    assert len(warned) == 1 and "kernel_env" in warned[0], warned
    calls = _calls(run)
    assert len(calls) == 3 and calls[2]["kernel_env"]["OMP_NUM_THREADS"] == "1"

    # a new run (no --resume) starts the record afresh
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert main(["train", str(recipe)]) == 0
    assert [c["resumed_from"] for c in _calls(run)] == [None]


def test_a_corrupt_record_is_replaced_on_resume(tmp_path, caplog):
    (tmp_path / env.FILE).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="minigem.training.environment"):
        diff = env.record(tmp_path, env.describe("cpu", bf16=False), resumed_from="stage0-step0000001")
    assert diff == []
    assert any("not a valid environment record" in r.getMessage() for r in caplog.records)
    calls = _calls(tmp_path)
    assert len(calls) == 1 and calls[0]["resumed_from"] == "stage0-step0000001"
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, none left
