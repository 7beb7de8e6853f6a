"""`ema_decay`: a stage ends with the moving average of its trainable weights, computed here
independently from the weights a plain run passes through, and resumes exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe
from safetensors.torch import load_file

from minigem.cli import main
from minigem.training.checkpoint import latest_checkpoint
from minigem.training.ema import WeightAverage

FIRST = {"name": "first", "train": ["connector"], "data": {"synth": {"n": 32, "seed": 3, "image_size": 96}},
         "lr": 1e-3, "batch_size": 4, "steps": 1}
SECOND = {"name": "second", "train": ["llm"], "data": {"synth": {"n": 32, "seed": 4, "image_size": 96}},
          "lr": 3e-3, "batch_size": 4, "steps": 3}
DECAY = 0.2


def _train(recipe: Path, *args: str) -> None:
    assert main(["train", str(recipe), *args]) == 0


def _latest(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run) / "model.safetensors"))


def test_weight_average_formula_and_state():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    avg = WeightAverage([p], decay=0.5)
    seen, want = [], p.detach().double().clone()
    for t, value in enumerate([[3.0, 0.0], [5.0, -2.0], [0.0, 4.0], [1.0, 1.0]], start=1):
        with torch.no_grad():
            p.copy_(torch.tensor(value))
        d = min(0.5, (1 + t) / (10 + t))  # 2/11, 3/12, 4/13, 5/14: the warm-up, then...
        seen.append(d)
        want = d * want + (1 - d) * torch.tensor(value, dtype=torch.float64)
        avg.update()
    assert seen[-1] == pytest.approx(5 / 14)
    torch.testing.assert_close(avg.shadow[0].double(), want)
    state = avg.state_dict()
    other = WeightAverage([torch.nn.Parameter(torch.zeros(2))], decay=0.5)
    other.load_state_dict(state)
    assert other.updates == 4 and other.current_decay() == pytest.approx(6 / 15)  # min(0.5, 6/15)
    avg.copy_to_params()
    torch.testing.assert_close(p.detach().double(), want)
    with pytest.raises(ValueError, match="1 tensors saved, 2 trainable"):
        WeightAverage([torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))],
                      0.5).load_state_dict(state)
    with pytest.raises(ValueError, match="must be in"):
        WeightAverage([p], 1.0)


def test_stage_ends_with_the_average_and_resumes_exactly(tmp_path):
    # a plain run, one step per call: the weights the second stage passes through
    (tmp_path / "plain").mkdir()
    plain = tiny_recipe(tmp_path / "plain", [FIRST, SECOND])
    run = tmp_path / "plain" / "run"
    _train(plain, "--stop-after", "1")  # the first stage, ending at the boundary
    trajectory = [_latest(run)]
    for _ in range(3):
        _train(plain, "--resume", "--stop-after", "1")
        trajectory.append(_latest(run))
    llm = [k for k in trajectory[0] if k.startswith("language_model.")]
    want = {k: trajectory[0][k].double() for k in llm}
    for t, w in enumerate(trajectory[1:], start=1):
        d = min(DECAY, (1 + t) / (10 + t))
        want = {k: d * want[k] + (1 - d) * w[k].double() for k in llm}

    ema_stage = {**SECOND, "ema_decay": DECAY}
    (tmp_path / "ema").mkdir()
    _train(tiny_recipe(tmp_path / "ema", [FIRST, ema_stage]))
    got = load_file(str(tmp_path / "ema" / "run" / "final" / "model.safetensors"))
    last = trajectory[-1]
    for k in llm:
        torch.testing.assert_close(got[k].double(), want[k], atol=1e-6, rtol=1e-5)
    assert any(not torch.allclose(got[k], last[k]) for k in llm)  # not the last weights
    frozen = [k for k in got if not k.startswith("language_model.")]
    assert [k for k in frozen if not torch.equal(got[k], last[k])] == []

    # interrupted inside the averaged stage, resumed: bit-identical to the uninterrupted run
    (tmp_path / "resumed").mkdir()
    recipe = tiny_recipe(tmp_path / "resumed", [FIRST, ema_stage])
    _train(recipe, "--stop-after", "3")
    _train(recipe, "--resume")
    again = load_file(str(tmp_path / "resumed" / "run" / "final" / "model.safetensors"))
    assert [k for k in got if not torch.equal(got[k], again[k])] == []


def test_ema_decay_must_be_below_one(tmp_path):
    from minigem.config import load_recipe
    from minigem.errors import ConfigError

    path = tiny_recipe(tmp_path, [{**SECOND, "ema_decay": 1.0}])
    with pytest.raises(ConfigError, match="ema_decay"):
        load_recipe(path)
