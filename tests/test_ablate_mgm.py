"""scripts/ablate_mgm.py: the LLaVA -> Mini-Gemini init, and the ablation end to end (slow)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model, load_script

from minigem.checkpoints.native import load_model, save_model
from minigem.data.synth import make_scene, render


def _script():
    return load_script("ablate_mgm")


@pytest.fixture
def base(tiny_model_config, tiny_tokenizer, tmp_path) -> Path:
    torch.manual_seed(3)
    return save_model(build_tiny_model(tiny_model_config, tiny_tokenizer), tmp_path / "base")


def test_mgm_init_starts_as_the_base(base, tmp_path):
    """The MGM init keeps every base weight and adds mining whose values start at zero, so
    its visual tokens equal the base's on the same LR pixels; HD gives 5 views' tokens."""
    mod = _script()
    src = load_model(base).eval()
    mgm = load_model(mod.write_mgm_init(base, tmp_path / "mgm", 96, hd=False)).eval()
    assert mgm.config.connector.type == "patch_mining" and mgm.config.vision_aux.image_size == 96
    assert mgm.tokens_per_image == src.tokens_per_image
    images = [render(make_scene(random.Random(i)), 96) for i in range(3)]
    px = mgm.processor(images)
    with torch.no_grad():
        want = src.encode_images(px["pixel_values"])
        got = mgm.encode_images(px["pixel_values"], px["pixel_values_aux"])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the mining layers are really there: with a non-zero value projection the tokens change
    with torch.no_grad():
        mgm.connector.vlm_uni_val_projector[1].weight.normal_()
        moved = mgm.encode_images(px["pixel_values"], px["pixel_values_aux"])
    assert not torch.allclose(moved, want)

    hd = load_model(mod.write_mgm_init(base, tmp_path / "hd", 96, hd=True))
    assert hd.config.vision_aux.image_size == 192 and hd.config.vision_aux.image_grid == 2
    assert hd.tokens_per_image == 5 * src.tokens_per_image
    with pytest.raises(SystemExit, match="already a Mini-Gemini model"):
        mod.write_mgm_init(tmp_path / "mgm", tmp_path / "again", 96, hd=False)


def test_train_data_raises_the_glyph_share(tmp_path):
    mod = _script()
    args = mod.parse_args(["--glyph-weight", "0.4", "--hr-size", "96"])
    synth = mod.train_data(args)["synth"]
    assert synth["image_size"] == 96 and synth["seed"] == 5
    assert synth["mix"]["glyph"] == 0.4 and sum(synth["mix"].values()) == pytest.approx(1.0)


def test_missing_base_says_how_to_train_it(tmp_path, monkeypatch):
    """Without the base checkpoint both ablation scripts stop before writing anything and name the
    recipe that trains it (ablate_moe's default base is a run of recipes/tiny-shapes.yaml)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"/none: not a model directory \(train the base first: "
                                         r"minigem train .*recipes/tiny-shapes.yaml"):
        _script().main(["--base", str(tmp_path / "none"), "--out", str(tmp_path / "abl")])
    with pytest.raises(SystemExit, match=r"runs/tiny-shapes/final: not a model directory \(train the base first: "
                                         r"minigem train .*recipes/tiny-shapes.yaml training.output_dir=.*runs/tiny-shapes,"):
        load_script("ablate_moe").main(["--out", str(tmp_path / "moe")])
    assert not (tmp_path / "abl").exists() and not (tmp_path / "moe").exists()


@pytest.mark.slow
def test_ablation_end_to_end(base, tmp_path, capsys):
    out = tmp_path / "abl"
    assert _script().main(["--base", str(base), "--out", str(out), "--steps", "2", "--batch-size", "4",
                           "--hr-steps", "2", "--freeze-hr", "--n-test", "8", "--threads", "1",
                           "--arms", "lr,mgm,mgm-hd"]) == 0
    res = json.loads((out / "ablation.json").read_text())
    assert list(res["arms"]) == ["lr", "mgm", "mgm-hd"]
    tokens = {k: r["tokens"] for k, r in res["arms"].items()}
    assert tokens["mgm"] == tokens["lr"] and tokens["mgm-hd"] == 5 * tokens["lr"]
    for name, r in res["arms"].items():
        recipe = (out / "recipes" / f"{name}.yaml").read_text()
        assert "init_from" in recipe and "steps: 2" in recipe
        assert 0 <= r["eval"]["accuracy"] <= 1 and r["eval"]["per_category"]
        assert (out / f"{name}.predictions.jsonl").is_file()
    # the HR tower was pretrained, then frozen in the arms: the mgm arm keeps it as pretrained
    pre = load_model(out / "runs" / "hr-pretrain" / "final").vision_tower_aux.state_dict()
    fresh = load_model(out / "init" / "mgm-fresh").vision_tower_aux.state_dict()
    after = load_model(out / "runs" / "mgm" / "final").vision_tower_aux.state_dict()
    assert any(not torch.equal(pre[k], fresh[k]) for k in pre)
    assert all(torch.equal(pre[k], after[k]) for k in pre)
    md = (out / "ablation.md").read_text()
    assert "| mgm-hd |" in md and "frozen in the mgm arms" in md and md in capsys.readouterr().out


def test_run_helpers(tmp_path):
    """The shared helpers of the ablation scripts: mean samples/s of a run, and a CLI call
    that fails is a SystemExit naming the command."""
    from minigem.training.runs import mean_samples_per_s, run_cli

    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "samples_per_s": 10.0}\n{"step": 1, "eval_accuracy": 0.5}\n{"step": 2, "samples_per_s": 20.0}\n')
    assert mean_samples_per_s(tmp_path) == 15.0
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "eval_accuracy": 0.5}\n')
    assert mean_samples_per_s(tmp_path) is None
    out, wall = run_cli(["data", "synth", "--out", str(tmp_path / "d"), "--n", "2", "--seed", "1"], threads=1)
    assert out.strip() == str(tmp_path / "d" / "data.json") and wall > 0
    with pytest.raises(SystemExit, match="failed \\(2\\): eval --data"):
        run_cli(["eval", "--data", str(tmp_path / "missing.json")], threads=1)


def test_probe_mining_reimplements_the_mining_and_runs(tiny_tokenizer, tmp_path, capsys):
    """scripts/probe_mining.py: its `attn` variant is the model's patch mining (same weights, same
    output), and the probe runs every kind of variant on a tiny Mini-Gemini."""
    from conftest import mgm_config

    probe = load_script("probe_mining")
    torch.manual_seed(0)
    model = build_tiny_model(mgm_config(), tiny_tokenizer).eval()
    q, reg, y = probe.features(model, 6, seed=1)
    assert len(y) >= 6 and q.shape[1] == model.connector.vision_dim and reg.shape[1:] == (model.connector.aux_dim, 16)  # M = 4
    mine = probe.ModelMining(model)
    with torch.no_grad():
        mine.v[1].weight.normal_()
        mine.v[1].bias.normal_()
        attn = probe.Attn(q.shape[1], reg.shape[1], {"vrand"})
        attn.q.load_state_dict(mine.q.state_dict())
        attn.k.load_state_dict(mine.k.state_dict())
        attn.v.load_state_dict(mine.v.state_dict())
        torch.testing.assert_close(attn(q, reg), mine(q, reg), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(mine(q, reg), q)
    path = save_model(model, tmp_path / "mgm")
    assert probe.main(["--model", str(path), "--variants", "mining,max,attn-noln-temp-h4",
                       "--steps", "4", "--report", "2", "--train-scenes", "8", "--test-scenes", "4",
                       "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| mining |" in out and "| max |" in out and "| attn-noln-temp-h4 |" in out
    # --train-hr: the HR tower trains with the reader (its weights move), one variant at a time
    before = {k: v.clone() for k, v in model.vision_tower_aux.state_dict().items()}
    model2 = load_model(path)
    train = probe.features(model2, 4, seed=1, keep_pixels=True)
    test = probe.features(model2, 2, seed=2, keep_pixels=True)
    ns = type("Args", (), {"seed": 0, "lr": 1e-2, "batch": 4, "steps": 3, "report": 3, "train_hr": True})()
    r = probe.run("attn", model2, train, test, ns)
    assert 0.0 <= r["test_acc"] <= 1.0
    after = model2.vision_tower_aux.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(SystemExit, match="give one variant"):
        probe.main(["--model", str(path), "--variants", "attn,max", "--train-hr", "--steps", "1"])
    with pytest.raises(SystemExit, match="unknown variant"):
        probe.main(["--model", str(path), "--variants", "attn-wide", "--steps", "1",
                    "--train-scenes", "2", "--test-scenes", "2"])


def test_hr_only_pretrains_the_hr_tower_and_stops(base, tmp_path, capsys):
    mod = _script()
    out = tmp_path / "abl"
    with pytest.raises(SystemExit, match="--hr-only needs --hr-steps"):
        mod.main(["--base", str(base), "--out", str(out), "--hr-only"])
    assert mod.main(["--base", str(base), "--out", str(out), "--hr-only", "--hr-steps", "1",
                     "--batch-size", "4", "--threads", "1"]) == 0
    final = out / "runs" / "hr-pretrain" / "final"
    assert f"HR tower pretrained: {final}" in capsys.readouterr().out
    assert not (out / "runs" / "lr").exists() and not (out / "ablation.json").exists()
    pre = load_model(final).vision_tower_aux.state_dict()
    fresh = load_model(out / "init" / "mgm-fresh").vision_tower_aux.state_dict()
    assert any(not torch.equal(pre[k], fresh[k]) for k in pre)


def test_probe_save_and_mgm_init(base, tiny_tokenizer, tmp_path, capsys):
    """probe_mining --train-hr --save writes the model with its tower and mining as trained;
    ablate_mgm --mgm-init starts the mgm arm from such an init (and refuses what is not an MGM
    of --base)."""
    from conftest import mgm_config

    probe, mod = load_script("probe_mining"), _script()
    init = save_model(build_tiny_model(mgm_config(), tiny_tokenizer), tmp_path / "probe-init")
    saved = tmp_path / "mined"
    with pytest.raises(SystemExit, match="--save writes"):
        probe.main(["--model", str(init), "--variants", "max", "--save", str(saved)])
    assert probe.main(["--model", str(init), "--variants", "mining", "--train-hr", "--save", str(saved),
                       "--steps", "2", "--report", "1", "--train-scenes", "4", "--test-scenes", "2",
                       "--lr", "1e-2", "--threads", "1"]) == 0
    assert f"saved: {saved}" in capsys.readouterr().out
    before, after = load_model(init).state_dict(), load_model(saved).state_dict()
    for prefix in ("vision_tower_aux.", "connector.vlm_uni_val_projector."):  # trained: moved
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)), prefix
    for prefix in ("vision_tower.", "language_model."):  # frozen: kept
        assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)), prefix

    # the `projector` variant: mining (V kept, not reset) and projector train, towers and LLM do not
    proj = tmp_path / "proj"
    assert probe.main(["--model", str(saved), "--variants", "projector", "--save", str(proj), "--steps", "2",
                       "--report", "1", "--train-scenes", "4", "--test-scenes", "2", "--lr", "1e-2",
                       "--threads", "1"]) == 0
    assert "| projector |" in capsys.readouterr().out
    before, after = after, load_model(proj).state_dict()
    for prefix in ("connector.projector.", "connector.vlm_uni_val_projector."):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)), prefix
    assert after["connector.vlm_uni_val_projector.1.weight"].abs().sum() > 0
    for prefix in ("vision_tower.", "vision_tower_aux.", "language_model."):
        assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)), prefix

    # --keep-on mined: the projector's output for every cell's LR token plus its mined detail is
    # pulled towards the starting projector's output for the LR token alone
    start = load_model(saved)
    with torch.no_grad():  # mined detail far from zero, as a glyph-supervised mining leaves it
        start.connector.vlm_uni_val_projector[1].weight.normal_(0, 0.5)
    start = save_model(start, tmp_path / "v-grown")
    q, reg, glyph = probe.features(load_model(start), 3, seed=7, every_cell=True)
    assert len(q) == 27 and set(glyph.tolist()) - {-1} and (glyph == -1).any()

    def drift(path):  # relative squared distance of what the LLM sees from the LR-only output
        m = load_model(path).eval()
        with torch.no_grad():
            want = load_model(start).connector.projector(q)
            return ((probe.ThroughProjector(m)(q, reg) - want).pow(2).mean() / want.pow(2).mean()).item()

    kept = tmp_path / "kept"
    with pytest.raises(SystemExit, match="--keep-on mined is for the `projector` variant"):
        probe.main(["--model", str(saved), "--variants", "max", "--keep-on", "mined"])
    assert probe.main(["--model", str(start), "--variants", "projector", "--keep-on", "mined",
                       "--keep-weight", "100", "--keep-scenes", "3", "--save", str(kept), "--steps", "30",
                       "--report", "10", "--train-scenes", "4", "--test-scenes", "2", "--lr", "1e-2",
                       "--threads", "1"]) == 0
    assert drift(kept) < 0.5 * drift(start)

    # an MGM init of --base whose HR tower has moved, as a pretraining leaves it
    model = load_model(mod.write_mgm_init(base, tmp_path / "fresh", 96, hd=False))
    with torch.no_grad():
        for p in model.vision_tower_aux.parameters():
            p.add_(0.01)
    mined = save_model(model, tmp_path / "mgm-mined")
    out = tmp_path / "abl"
    with pytest.raises(SystemExit, match="not a Mini-Gemini"):
        mod.main(["--base", str(base), "--out", str(out), "--mgm-init", str(base)])
    with pytest.raises(SystemExit, match="drop --hr-steps"):
        mod.main(["--base", str(base), "--out", str(out), "--mgm-init", str(mined), "--hr-steps", "2"])
    src = load_model(base)
    other = save_model(build_tiny_model(src.config, src.tokenizer, seed=9), tmp_path / "other")
    with pytest.raises(SystemExit, match="differ from --base"):
        mod.main(["--base", str(other), "--out", str(out), "--mgm-init", str(mined)])
    assert mod.main(["--base", str(base), "--out", str(out), "--mgm-init", str(mined), "--freeze-hr",
                     "--arms", "mgm", "--steps", "1", "--batch-size", "2", "--n-test", "4", "--threads", "1"]) == 0
    res = json.loads((out / "ablation.json").read_text())
    assert res["setup"]["mgm_init"] == str(mined.resolve())
    assert f"init_from: {mined.resolve()}" in (out / "recipes" / "mgm.yaml").read_text()
    assert not (out / "init" / "mgm-fresh").exists()
    want = model.vision_tower_aux.state_dict()
    got = load_model(out / "runs" / "mgm" / "final").vision_tower_aux.state_dict()
    assert all(torch.equal(want[k], v) for k, v in got.items())


@pytest.mark.slow
def test_glyph_init_builds_the_mgm_init_in_one_command(tiny_tokenizer, tmp_path, capsys):
    """--glyph-init: HR pretraining, then probe_mining's two stages, then the mgm arm from their
    result (the chain of docs/mini-gemini.md as one command); bad combinations are refused."""
    from conftest import mgm_config

    mod = _script()
    cfg = mgm_config()  # its LR side alone: one token per cell of the world's 3x3 grid, as the probe needs
    cfg = cfg.model_copy(update={"vision_aux": None, "connector": cfg.connector.model_copy(update={"type": "mlp2x_gelu"})})
    base = save_model(build_tiny_model(cfg, tiny_tokenizer), tmp_path / "base")
    out = tmp_path / "abl"
    for bad in (["--glyph-init"], ["--glyph-init", "--hr-steps", "1"],
                ["--glyph-init", "--hr-steps", "1", "--freeze-hr", "--hr-only"]):
        with pytest.raises(SystemExit, match="--glyph-init builds the mgm init"):
            mod.main(["--base", str(base), "--out", str(out), *bad])
    assert mod.main(["--base", str(base), "--out", str(out), "--arms", "mgm", "--steps", "1", "--batch-size", "4",
                     "--hr-steps", "1", "--freeze-hr", "--glyph-init", "--init-steps", "2", "2",
                     "--init-scenes", "4", "2", "--n-test", "4", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "| mining |" in printed and "| projector |" in printed  # both probe stages reported
    proj = out / "init" / "glyph-proj"
    assert f"init_from: {proj}" in (out / "recipes" / "mgm.yaml").read_text()
    res = json.loads((out / "ablation.json").read_text())
    assert res["setup"]["glyph_init"]["steps"] == [2, 2] and res["setup"]["glyph_init"]["s"] > 0
    assert "on per-object glyph targets" in (out / "ablation.md").read_text()
    # the init moved the HR tower (mining stage) and the projector (projector stage) ...
    pre = load_model(out / "runs" / "hr-pretrain" / "final").state_dict()
    mined, init = load_model(out / "init" / "glyph-mined").state_dict(), load_model(proj).state_dict()
    assert any(not torch.equal(pre[k], mined[k]) for k in pre if k.startswith("vision_tower_aux."))
    assert any(not torch.equal(mined[k], init[k]) for k in init if k.startswith("connector.projector."))
    # ... and the frozen-tower mgm arm started from it
    after = load_model(out / "runs" / "mgm" / "final").state_dict()
    assert all(torch.equal(init[k], after[k]) for k in init if k.startswith("vision_tower_aux."))
