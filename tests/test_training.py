"""Training through the CLI a user types: artifacts, exact resume, learning, gradient
accumulation, and the errors a user sees for a bad recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_recipe
from safetensors.torch import load_file

from minigem.cli import main

CONTRASTIVE = {
    "name": "contrastive", "kind": "contrastive", "train": ["vision"],
    "data": {"synth": {"n": 32, "seed": 1, "image_size": 96, "tasks": ["caption"]}},
    "lr": 1e-3, "batch_size": 4, "steps": 3,
    "contrastive": {"embed_dim": 16, "text_width": 32, "text_layers": 1, "text_heads": 2,
                    "max_text_tokens": 64},
}
INSTRUCT = {
    "name": "instruct", "train": ["connector", "llm"],
    "data": {"synth": {"n": 32, "seed": 3, "image_size": 96}},
    "lr": 1e-3, "batch_size": 4, "steps": 3,
}
# Dropout makes the result depend on the RNG stream, so exact resume must restore it right.
DROPOUT = ["model.llm.config.attention_dropout=0.2", "model.vision.config.attention_dropout=0.2"]
EVAL = {"eval_data": {"synth": {"n": 3, "seed": 9, "image_size": 96}}}


def _train(recipe: Path, *args: str) -> None:
    assert main(["train", str(recipe), *args]) == 0


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """Both stages, 3 + 3 steps, uninterrupted."""
    tmp = tmp_path_factory.mktemp("full")
    _train(tiny_recipe(tmp, [CONTRASTIVE, {**INSTRUCT, **EVAL}], eval_every=2), *DROPOUT)
    return tmp / "run"


def test_run_writes_its_artifacts(full_run):
    from minigem.checkpoints.native import load_model
    from minigem.config import load_recipe

    final = full_run / "final"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in final.iterdir()}
    assert (full_run / "loss.png").stat().st_size > 1000
    assert list((full_run / "logs").glob("events.out.tfevents.*"))
    recipe = load_recipe(full_run / "recipe.yaml")  # the resolved recipe, loadable as is
    assert [s.name for s in recipe.training.stages] == ["contrastive", "instruct"]
    assert recipe.model.llm.config["attention_dropout"] == 0.2  # CLI overrides are recorded
    rows = _metrics(full_run)
    train_rows = [r for r in rows if "loss" in r]
    assert [(r["stage"], r["step"]) for r in train_rows] == [
        ("contrastive", 1), ("contrastive", 2), ("contrastive", 3),
        ("instruct", 1), ("instruct", 2), ("instruct", 3),
    ]
    assert all(r["loss"] > 0 and "lr" in r and "samples_per_s" in r for r in train_rows)
    assert "retrieval_acc" in train_rows[0] and "retrieval_acc" not in train_rows[-1]
    evals = [r for r in rows if "eval_accuracy" in r]  # every eval_every steps and at the end
    assert [(r["stage"], r["step"]) for r in evals] == [("instruct", 2), ("instruct", 3)]
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in evals)
    model = load_model(final)  # the final checkpoint is usable
    assert isinstance(model.chat(None, "How many objects are there?", max_new_tokens=2), str)
    # only the trained towers changed: the contrastive stage trains the vision tower, the
    # instruct stage connector + llm; all differ from the seeded initial model
    from minigem.training.build import build_for_recipe

    init = build_for_recipe(recipe).state_dict()
    w = _weights(full_run)
    for prefix in ("vision_tower.", "connector.", "language_model."):
        assert any(not torch.equal(w[k], init[k]) for k in w if k.startswith(prefix)), prefix


def test_resume_is_bit_identical(full_run, tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, [CONTRASTIVE, {**INSTRUCT, **EVAL}], eval_every=2)
    run = tmp_path / "run"
    latest = run / "checkpoints" / "latest"
    _train(recipe, *DROPOUT, "--stop-after", "2")  # interrupted inside the contrastive stage
    assert not (run / "final").exists()
    assert "checkpoint: " + str(run / "checkpoints" / "stage0-step0000002") in capsys.readouterr().out
    _train(recipe, *DROPOUT, "--resume", "--stop-after", "1")  # stops exactly at the stage boundary
    assert latest.read_text().strip() == "stage1-step0000000"
    _train(recipe, *DROPOUT, "--resume", "--stop-after", "2")  # inside the instruct stage
    assert latest.read_text().strip() == "stage1-step0000002"
    assert not (run / "final").exists()
    _train(recipe, *DROPOUT, "--resume")
    a, b = _weights(full_run), _weights(run)
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert diff == []
    # the logged numbers are the same, each step logged once
    fields = ("stage", "step", "loss", "eval_accuracy", "retrieval_acc")
    rows = [tuple(r.get(f) for f in fields) for r in _metrics(full_run)]
    assert [tuple(r.get(f) for f in fields) for r in _metrics(run)] == rows


@pytest.mark.parametrize("keep_boundaries", [False, True])
def test_checkpoints_pruned_to_the_newest_two_unless_boundaries_are_kept(tmp_path, keep_boundaries):
    first = {**INSTRUCT, "name": "first", "steps": 2}
    recipe = tiny_recipe(tmp_path, [first, {**INSTRUCT, "steps": 2}], save_every=1,
                         keep_boundaries=keep_boundaries)
    _train(recipe)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("stage*"))
    # saved: stage0-step1, stage1-step0 (boundary), stage1-step1, stage1-step2, stage2-step0 (end)
    newest = ["stage1-step0000002", "stage2-step0000000"]
    assert names == (["stage1-step0000000", *newest] if keep_boundaries else newest)


def test_checkpoint_order_is_numeric(tmp_path):
    """stage10 is newer than stage9 (a name sort would prune the newest)."""
    from minigem.training.checkpoint import save_checkpoint

    def write(model, directory):
        (directory / "w").write_text("x")

    for stage, step in [(9, 5), (10, 0), (10, 5)]:
        save_checkpoint(tmp_path, None, {"stage": stage, "step": step}, write=write)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("stage*"))
    assert names == ["stage10-step0000000", "stage10-step0000005"]


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    stage = {**INSTRUCT, "steps": 2}
    _train(tiny_recipe(tmp_path, [stage], name="a.yaml"), "--resume")
    fresh = tmp_path / "run"
    assert (fresh / "final").is_dir()
    (tmp_path / "b").mkdir()
    _train(tiny_recipe(tmp_path / "b", [stage]))
    a, b = _weights(fresh), _weights(tmp_path / "b" / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loss_goes_down_on_a_tiny_overfit_task(tmp_path):
    stage = {"name": "instruct", "train": ["connector", "llm"],
             "data": {"synth": {"n": 8, "seed": 5, "image_size": 96, "tasks": ["color", "shape"]}},
             "lr": 1e-2, "batch_size": 8, "steps": 25, "schedule": "constant", "warmup_ratio": 0.0}
    _train(tiny_recipe(tmp_path, [stage]))
    losses = [r["loss"] for r in _metrics(tmp_path / "run")]
    assert len(losses) == 25
    assert losses[-1] < 0.3 * losses[0], losses
    assert min(losses[-5:]) < 1.0, losses


def _accum_run(tmp_path: Path, name: str, batch: int, accum: int) -> dict[str, torch.Tensor]:
    stage = {"name": "instruct", "train": ["connector", "llm"],
             # one-token answers ("yes"/"no"): every row supervises the same number of tokens,
             # so the mean of micro-batch losses equals the loss of the whole batch
             "data": {"synth": {"n": 16, "seed": 2, "image_size": 96, "tasks": ["existence"]}},
             "lr": 1e-3, "batch_size": batch, "grad_accum": accum, "steps": 2,
             "schedule": "constant", "warmup_ratio": 0.0}
    d = tmp_path / name
    d.mkdir()
    _train(tiny_recipe(d, [stage]))
    return _weights(d / "run")


def test_grad_accumulation_matches_a_big_batch(tmp_path):
    big = _accum_run(tmp_path, "big", 8, 1)
    accum = _accum_run(tmp_path, "accum", 4, 2)
    half = _accum_run(tmp_path, "half", 4, 1)  # what accumulation must not be
    moved = max((big[k] - half[k]).abs().max().item() for k in big)
    assert moved > 1e-3  # the test can tell a half batch from a whole one
    for k in big:
        torch.testing.assert_close(accum[k], big[k], rtol=0, atol=2e-5, msg=k)


def test_missing_tokenizer(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, [INSTRUCT])
    data = yaml.safe_load(recipe.read_text())
    del data["model"]["tokenizer_train"]
    recipe.write_text(yaml.safe_dump(data))
    assert main(["train", str(recipe)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: no tokenizer: set model.tokenizer to a tokenizer directory "
        "(or model.llm.path to a model directory that has one)"
    )
    assert main(["train", str(recipe), f"model.tokenizer={tmp_path / 'nope'}"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: model.tokenizer: {tmp_path / 'nope'} is not a directory"
    )


def test_empty_dataset(tmp_path, capsys):
    data = tmp_path / "empty.json"
    data.write_text("[]")
    stage = {**INSTRUCT, "data": {"path": str(data)}}
    assert main(["train", str(tiny_recipe(tmp_path, [stage]))]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {data}: no usable records"


def test_dataset_smaller_than_a_batch(tmp_path, tiny_data, capsys):
    stage = {**INSTRUCT, "batch_size": 16, "data": {"path": str(tiny_data)}}
    assert main(["train", str(tiny_recipe(tmp_path, [stage]))]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: dataset has 12 samples, fewer than one batch of 16"
    )


def test_bad_recipe_and_override(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, [INSTRUCT])
    assert main(["train", str(recipe), "training.stages.instruct.lr=-1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "  training.stages.0.lr: Input should be greater than 0"
    )
    assert main(["train", str(recipe), "model.llm.config.hidden_sise=8"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: model.llm.config: unknown LlamaConfig keys: hidden_sise"
    )
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope.yaml'}: no such recipe file"


# ----------------------------------------------------------------------- pieces of the loop


def test_batch_order_resumes_exactly():
    from minigem.training.data import ResumableBatchSampler

    full = list(ResumableBatchSampler(10, 3, seed=5, total=7))
    assert len(full) == 7 and all(len(b) == 3 for b in full)
    # one epoch = 3 batches of a permutation (the remainder is dropped), then a new permutation
    epoch0 = [i for b in full[:3] for i in b]
    assert len(set(epoch0)) == 9
    assert full[3:6] != full[0:3]
    for k in range(7):
        assert list(ResumableBatchSampler(10, 3, seed=5, start=k, total=7)) == full[k:]
    assert list(ResumableBatchSampler(10, 3, seed=6, total=7)) != full
    # ranks split each global batch without overlap
    r0 = list(ResumableBatchSampler(12, 3, seed=5, total=2, rank=0, world=2))
    r1 = list(ResumableBatchSampler(12, 3, seed=5, total=2, rank=1, world=2))
    assert all(not set(a) & set(b) for a, b in zip(r0, r1, strict=True))


def test_group_by_length_batches_similar_lengths_and_resumes():
    import random

    from minigem.training.data import ResumableBatchSampler

    rng = random.Random(0)
    lens = [rng.choice((5, 6, 40, 60)) + rng.randrange(3) for _ in range(100)]
    kw = {"seed": 5, "total": 30, "lengths": lens.__getitem__, "group": 4}
    full = list(ResumableBatchSampler(100, 4, **kw))  # 25 batches per epoch, then epoch 1
    assert len(full) == 30 and all(len(b) == 4 for b in full)
    assert sorted(i for b in full[:25] for i in b) == list(range(100))  # every record once
    for k in (0, 3, 4, 7, 24, 25, 29):  # resumes inside, at and across mega-batches and epochs
        assert list(ResumableBatchSampler(100, 4, start=k, **kw)) == full[k:]
    plain = list(ResumableBatchSampler(100, 4, seed=5, total=25))
    # the same records as the plain order mega-batch by mega-batch, with far less padding
    for lo, hi in [(0, 4), (4, 8), (20, 24), (24, 25)]:  # the last mega-batch is short
        assert sorted(i for b in full[lo:hi] for i in b) == sorted(i for b in plain[lo:hi] for i in b)

    def padded(batches):
        return sum(len(b) * max(lens[i] for i in b) for b in batches)

    assert padded(full[:25]) < 0.7 * padded(plain)
    assert full[:25] != sorted(full[:25], key=lambda b: -max(lens[i] for i in b))  # shuffled
    # two ranks of 2 split the same global batches that one rank of 4 sees
    ranks = [list(ResumableBatchSampler(100, 2, rank=r, world=2, **kw)) for r in (0, 1)]
    assert [sorted(a + b) for a, b in zip(*ranks, strict=True)] == [sorted(b) for b in full]


def test_length_proxies_need_no_pixels(tmp_path, monkeypatch):
    import minigem.data.synth as synth
    from minigem.data.llava_json import LlavaJsonDataset

    src = synth.SynthSource(50, 3, 96, None, {"color": 1, "conversation": 1, "generation": 1})
    monkeypatch.setattr(synth, "render", None)  # drawing would fail
    lens = {i: src.length(i, tokens_per_image=9) for i in range(50)}
    monkeypatch.undo()
    for i, n in lens.items():
        msgs = src[i].messages
        words = sum(len(m.content.split()) for m in msgs)
        assert n == words + 8 * sum(m.content.count("<image>") for m in msgs)
    by_cat = {}
    for i, n in lens.items():
        by_cat.setdefault(src[i].category, []).append(n)
    assert max(by_cat["color"]) < min(by_cat["conversation"])
    (tmp_path / "a.png").write_bytes(b"")  # unreadable: length must not open it
    rows = [{"id": "r0", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert LlavaJsonDataset(tmp_path / "d.json").length(0, tokens_per_image=4) == 3 + 4  # 3 words, 4 visual tokens


def test_group_by_length_trains_and_resumes_exactly(tmp_path):
    stage = {**INSTRUCT, "group_by_length": True, "batch_size": 2, "steps": 4,
             "data": {"synth": {"n": 32, "seed": 3, "image_size": 96,
                                "mix": {"color": 1, "conversation": 1}}}}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _train(tiny_recipe(tmp_path / "a", [stage]))
    recipe = tiny_recipe(tmp_path / "b", [stage])
    _train(recipe, "--stop-after", "3")
    _train(recipe, "--resume")
    a, b = _weights(tmp_path / "a" / "run"), _weights(tmp_path / "b" / "run")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    (tmp_path / "c").mkdir()  # the option is used: the same stage without it sees other batches
    _train(tiny_recipe(tmp_path / "c", [{**stage, "group_by_length": False}]))
    c = _weights(tmp_path / "c" / "run")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_sampler_needs_one_batch():
    from minigem.errors import DataError
    from minigem.training.data import ResumableBatchSampler

    with pytest.raises(DataError) as err:
        ResumableBatchSampler(3, 4, seed=0)
    assert str(err.value) == "dataset has 3 samples, fewer than one batch of 4"


def test_optimizer_takes_the_stage_betas_and_eps():
    from minigem.config import StageConfig
    from minigem.training.loop import make_optimizer

    base = {"name": "s", "train": ["connector"], "data": {"synth": {"n": 1}}, "steps": 10}
    p = [torch.nn.Parameter(torch.zeros(2))]
    group = make_optimizer(p, StageConfig(**base)).param_groups[0]
    assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
    st = StageConfig(**base, lr=3e-4, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6)
    group = make_optimizer(p, st).param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (3e-4, 0.1, (0.8, 0.95), 1e-6)
    with pytest.raises(ValueError, match="adam_beta2"):
        StageConfig(**base, adam_beta2=1.0)


def test_lr_scale_trains_a_component_at_its_own_lr(tiny_model):
    """{vision: 0.1}: AdamW's first step moves each weight by about its lr (m/sqrt(v) = sign of
    the gradient), so the tower moves a tenth as far as the connector and LLM."""
    from minigem.config import StageConfig
    from minigem.training.loop import make_optimizer, make_scheduler
    from minigem.training.stages import apply_stage, component_parameters

    st = StageConfig(name="s", train=["vision", "connector", "llm"], data={"synth": {"n": 1}}, steps=4,
                     lr=1e-3, warmup_ratio=0.0, lr_scale={"vision": 0.1})
    apply_stage(tiny_model, st)
    opt = make_optimizer([p for p in tiny_model.parameters() if p.requires_grad], st, tiny_model)
    sched = make_scheduler(opt, st, 4)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, pytest.approx(1e-4)]
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    sum((p.float() ** 2).sum() for p in tiny_model.parameters() if p.requires_grad).backward()
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 * 0.8535534, 1e-4 * 0.8535534])

    def moved(comp):
        return max((p.detach() - before[n]).abs().max().item() for n, p in component_parameters(tiny_model, comp))

    assert moved("vision") == pytest.approx(1e-4, rel=1e-3)
    assert moved("llm") == pytest.approx(1e-3, rel=1e-3) and moved("connector") == pytest.approx(1e-3, rel=1e-3)


def test_lr_scale_errors(tiny_model):
    from minigem.config import StageConfig
    from minigem.errors import ConfigError
    from minigem.training.loop import make_optimizer

    base = {"name": "s", "data": {"synth": {"n": 1}}, "steps": 10}
    with pytest.raises(ValueError, match=r"lr_scale \{'vision': 0.1\}: each key must be a component the "
                                         r"stage trains \(connector, llm\)"):
        StageConfig(**base, train=["connector", "llm"], lr_scale={"vision": 0.1})
    with pytest.raises(ValueError, match="each scale > 0"):
        StageConfig(**base, train=["llm"], lr_scale={"llm": 0})
    # the projector is part of the connector: one parameter, two scales
    mgm = StageConfig(**base, train=["connector", "projector"], lr_scale={"connector": 1.0, "projector": 0.5})
    params = list(tiny_model.parameters())
    with pytest.raises(ConfigError, match=r"lr_scale: connector\.projector\..* is in components with "
                                          r"different scales \(1.0 and 0.5\)"):
        make_optimizer(params, mgm, tiny_model)
    with pytest.raises(ConfigError, match="needs the model"):
        make_optimizer(params, StageConfig(**base, train=["llm"], lr_scale={"llm": 0.5}))


def test_lr_scale_stage_resumes_exactly(tmp_path):
    """Through the CLI: the param groups are rebuilt in the same order, so an interrupted run with
    lr_scale ends with the weights of an uninterrupted one."""
    stage = {**INSTRUCT, "train": ["vision", "connector", "llm"], "lr_scale": {"vision": 0.2}}
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    _train(tiny_recipe(a, [stage]))
    _train(tiny_recipe(b, [stage]), "--stop-after", "2")
    _train(tiny_recipe(b, [stage]), "--resume")
    wa, wb = _weights(a / "run"), _weights(b / "run")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_steps_from_epochs_and_schedules():
    from minigem.config import StageConfig
    from minigem.training.loop import make_scheduler, stage_steps

    def stage(**kw):
        base = {"name": "s", "train": ["connector"], "data": {"synth": {"n": 1}}, "steps": 10}
        return StageConfig(**{**base, **kw})

    assert stage_steps(stage(), 1000, 1) == 10
    assert stage_steps(stage(steps=None, epochs=2, batch_size=4, grad_accum=2), 100, 1) == 25
    assert stage_steps(stage(steps=None, epochs=1, batch_size=4), 100, 2) == 12
    assert stage_steps(stage(steps=None, epochs=0.01, batch_size=4), 100, 1) == 1

    def lrs(**kw):
        st = stage(lr=1.0, **kw)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=st.lr)
        sched = make_scheduler(opt, st, 10)
        out = []
        for _ in range(10):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    assert lrs(schedule="constant", warmup_ratio=0.0) == [1.0] * 10
    lin = lrs(schedule="linear", warmup_ratio=0.2)  # 2 warmup steps
    assert lin[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lin[3:] == pytest.approx([1 - k / 8 for k in range(1, 8)])
    cos = lrs(schedule="cosine", warmup_ratio=0.0)
    assert cos[0] == 1.0 and cos[5] == pytest.approx(0.5) and all(a > b for a, b in zip(cos, cos[1:], strict=False))


def test_bf16_on_trains_on_this_machine(tmp_path):
    """`training.bf16: on` builds one Accelerator with bf16 autocast (a second Accelerator with
    another mixed_precision is refused by accelerate: this broke bf16 training on GPUs)."""
    stage = {**INSTRUCT, "steps": 1, "batch_size": 2}
    _train(tiny_recipe(tmp_path, [stage], bf16="on"))
    assert [r["step"] for r in _metrics(tmp_path / "run")] == [1]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_contrastive_max_pool_is_the_per_channel_max(tmp_path):
    from types import SimpleNamespace

    from minigem.training.contrastive import pooled_image_features

    low = torch.randn(2, 9, 4)
    high = torch.randn(2, 3, 5, 5)
    model = SimpleNamespace(vision_tower=lambda px: low, vision_tower_aux=lambda px: high)
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "pixel_values": None, "pixel_values_aux": None}
    got = pooled_image_features(model, batch, ["vision", "vision_aux"], "max")
    torch.testing.assert_close(got, torch.cat([low.amax(1), high.amax((2, 3))], -1))
    got = pooled_image_features(model, batch, ["vision_aux"], "mean")
    torch.testing.assert_close(got, high.mean((2, 3)))
    with pytest.raises(ValueError, match="'mean' or 'max'"):
        pooled_image_features(model, batch, ["vision"], "sum")
    stage = {**CONTRASTIVE, "steps": 2, "contrastive": {**CONTRASTIVE["contrastive"], "pool": "max"}}
    _train(tiny_recipe(tmp_path, [stage]))
    assert [r["step"] for r in _metrics(tmp_path / "run")] == [1, 2]
