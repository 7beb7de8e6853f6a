"""scripts/ablate_moe.py end to end on a tiny dense base (three branches through the CLI)."""

from __future__ import annotations

import json

import pytest
from conftest import build_tiny_model, load_script

from minigem.checkpoints.native import load_model, save_model


def _script():
    return load_script("ablate_moe")


@pytest.mark.slow
def test_ablation_end_to_end(tiny_model_config, tiny_tokenizer, tmp_path, capsys):
    base = save_model(build_tiny_model(tiny_model_config, tiny_tokenizer), tmp_path / "base")
    out = tmp_path / "abl"
    assert _script().main(["--base", str(base), "--out", str(out), "--steps", "2", "--batch-size", "4",
                           "--n-test", "8", "--routing-limit", "4", "--threads", "1"]) == 0
    res = json.loads((out / "ablation.json").read_text())
    rows = res["branches"]
    assert list(rows) == ["base (stage II)", "dense", "moe", "dense-wide"]
    for name in ("dense", "moe", "dense-wide"):
        recipe = (out / "recipes" / f"{name}.yaml").read_text()
        assert "init_from" in recipe and "seed: 4" in recipe
        assert rows[name]["train_s"] > 0 and 0 <= rows[name]["eval"]["accuracy"] <= 1
        assert rows[name]["eval"]["per_category"]
    p = {k: r["params"] for k, r in rows.items()}
    ffn = 3 * 32 * 64  # one tiny llama FFN; `sparse` on 2 layers = layer 0
    assert p["dense"]["total"] == p["dense"]["active"] == p["base (stage II)"]["total"]
    assert p["moe"]["total"] == p["dense"]["total"] + 3 * ffn + 4 * 32  # 4 experts + a router
    assert p["moe"]["active"] == p["dense"]["total"] + ffn + 4 * 32
    assert p["dense-wide"]["total"] == p["dense-wide"]["active"] == p["dense"]["total"] + ffn
    assert p["moe"]["trained"] == 4 * ffn + 4 * 32
    routing = res["routing"]
    assert routing["num_experts"] == 4 and list(routing["layers"]) == ["0"]
    assert abs(sum(routing["layers"]["0"]["text"]) - 1) < 1e-6
    md = (out / "ablation.md").read_text()
    assert "| moe | moe |" in md and "expert 3" in md and md in capsys.readouterr().out
    assert load_model(out / "runs" / "dense-wide" / "final").config.ffn_widen.factor == 2
