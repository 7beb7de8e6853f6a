"""The tiny text-to-image model: training data, the pipeline (round trip, guidance, outputs),
`minigem train` on a `t2i` recipe (checkpoints, exact resume, final diffusers directory), and
the quality script."""

from __future__ import annotations

import json
import random
import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minigem.cli import main
from minigem.config import ConfigError, load_recipe
from minigem.data.synth import COLORS, POSITIONS, SHAPES
from minigem.imagegen.t2i import (
    GROUP_CELLS,
    TinyT2IPipeline,
    build_components,
    dominant_color,
    render_small,
    t2i_example,
)

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-shapes-t2i.yaml"
TINY = [  # a very small model for fast CLI runs
    "t2i.resolution=16", "t2i.unet.block_out_channels=[16, 16]",
    "t2i.unet.down_block_types=[DownBlock2D, CrossAttnDownBlock2D]",
    "t2i.unet.up_block_types=[CrossAttnUpBlock2D, UpBlock2D]",
    "t2i.text_encoder.hidden_size=32", "t2i.text_encoder.intermediate_size=64",
    "t2i.text_encoder.num_hidden_layers=1", "t2i.proxy_prompts=2", "t2i.sample_steps=2",
    "training.stages.diffusion.batch_size=4", "training.log_every=1", "training.save_every=2",
    "training.eval_every=3",
]
OBJ = re.compile(rf"\b(?:a|an|two|three) (?:(?:big|small) )?({'|'.join(COLORS)}) ({'|'.join(SHAPES)})s?"
                 rf"(?: (?:on|in|at) the ([a-z ]+?))?(?= and |$)")


def test_examples_show_their_prompt():
    rng = random.Random(0)
    kinds = set()
    for _ in range(300):
        prompt, scene = t2i_example(rng)
        parts = OBJ.findall(prompt)
        assert parts and " and ".join(["x"] * len(parts)).count("and") == prompt.count(" and "), prompt
        objs = scene.objects
        if len(parts) == 2:  # two different objects, each placed
            kinds.add("pair")
            assert [(c, s, p) for c, s, p in parts] == [(o.color, o.shape, o.position) for o in objs]
            continue
        ((color, shape, where),) = parts
        assert all((o.color, o.shape) == (color, shape) for o in objs)
        n = {"a": 1, "an": 1, "two": 2, "three": 3}[prompt.split()[0]]
        assert len(objs) == n and len({o.cell for o in objs}) == n
        kinds.add(n)
        if where and n == 1:
            assert objs[0].position == where
        elif where:
            assert all(o.cell in GROUP_CELLS[where] for o in objs)
        size = "large" if " big " in prompt else "small" if " small " in prompt else None
        if size:
            assert all(o.size == size for o in objs)
    assert kinds == {1, 2, 3, "pair"}
    assert set(POSITIONS) >= set(GROUP_CELLS)


def test_dominant_color_of_rendered_scenes():
    rng = random.Random(1)
    for _ in range(60):
        prompt, scene = t2i_example(rng)
        if len(scene.objects) == 1:
            assert dominant_color(render_small(scene, 32)) == scene.objects[0].color, prompt
    assert dominant_color(Image.new("RGB", (32, 32), (240, 240, 238))) is None


def test_pipeline_round_trip_and_call(tmp_path):
    torch.manual_seed(0)
    unet, sched, text, tok, _ = build_components(
        16, {"block_out_channels": [16, 16], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]},
        {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1})
    pipe = TinyT2IPipeline(unet=unet, scheduler=sched, text_encoder=text, tokenizer=tok)
    pipe.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["_class_name"] == "TinyT2IPipeline"
    assert set(index) >= {"unet", "scheduler", "text_encoder", "tokenizer"}
    again = TinyT2IPipeline.from_pretrained(tmp_path / "p")
    kw = {"num_inference_steps": 3, "guidance_scale": 3.0, "height": 16, "width": 16,
          "negative_prompt": "a red circle", "num_images_per_prompt": 2}
    a = pipe(prompt="a blue square", generator=torch.Generator().manual_seed(1), output_type="pt", **kw).images
    b = again(prompt="a blue square", generator=torch.Generator().manual_seed(1), output_type="pt", **kw).images
    assert a.shape == (2, 3, 16, 16) and torch.allclose(a, b)
    out = again(prompt=["a red circle", "two green triangles"], num_inference_steps=2,
                generator=torch.Generator().manual_seed(0))
    assert len(out.images) == 2 and all(im.size == (16, 16) and im.mode == "RGB" for im in out.images)
    no_cfg = again(prompt="a red circle", num_inference_steps=2, guidance_scale=1.0).images
    assert len(no_cfg) == 1


def test_default_guidance_is_saved_and_used(tmp_path):
    torch.manual_seed(0)
    unet, sched, text, tok, _ = build_components(
        16, {"block_out_channels": [16, 16], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "addition_embed_type": "text",
             "addition_embed_type_num_heads": 4},
        {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}, prediction_type="v_prediction")
    TinyT2IPipeline(unet=unet, scheduler=sched, text_encoder=text, tokenizer=tok,
                    default_guidance_scale=1.5).save_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "model_index.json").read_text())["default_guidance_scale"] == 1.5
    pipe = TinyT2IPipeline.from_pretrained(tmp_path / "p")
    assert pipe.config.default_guidance_scale == 1.5 and pipe.scheduler.config.prediction_type == "v_prediction"

    def draw(**kw):
        return pipe(prompt="a red circle", num_inference_steps=2, output_type="pt",
                    generator=torch.Generator().manual_seed(3), **kw).images

    assert torch.equal(draw(), draw(guidance_scale=1.5))  # no guidance named: the saved one
    assert not torch.allclose(draw(), draw(guidance_scale=4.0))


def test_bundled_size_under_10mb(tmp_path):
    recipe = load_recipe(RECIPE)
    t = recipe.t2i
    unet, sched, text, tok, _ = build_components(t.resolution, t.unet, t.text_encoder, t.vocab_size,
                                                 t.max_text_tokens, sampler=t.sampler)
    TinyT2IPipeline(unet=unet, scheduler=sched, text_encoder=text, tokenizer=tok).save_pretrained(tmp_path / "b")
    size = sum(p.stat().st_size for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert size < 10 * 2**20, size
    assert recipe.training.stages[0].kind == "diffusion"


def test_recipe_validation():
    with pytest.raises(ConfigError, match="exactly one of `model`"):
        load_recipe(RECIPE, ["model.llm.arch=llama"])
    with pytest.raises(ConfigError, match="diffusion"):
        load_recipe(RECIPE, ["training.stages.diffusion.kind=lm"])
    with pytest.raises(ConfigError, match="diffusion stage trains"):
        load_recipe(RECIPE, ["training.stages.diffusion.train=[llm]"])
    with pytest.raises(ConfigError, match="group_by_length is for"):
        load_recipe(RECIPE, ["training.stages.diffusion.group_by_length=true"])


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "unet" / "diffusion_pytorch_model.safetensors"))


def test_cli_train_resume_and_quality_script(tmp_path, capsys):
    full = tmp_path / "full"
    assert main(["train", str(RECIPE), f"training.output_dir={full}", "training.stages.diffusion.steps=3",
                 *TINY]) == 0
    assert capsys.readouterr().out.strip() == f"checkpoint: {full / 'final'}"
    metrics = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    assert all(np.isfinite(m["loss"]) and m["samples_per_s"] > 0 for m in metrics if "loss" in m)
    assert [0 <= m["proxy_color_match"] <= 1 for m in metrics if "proxy_color_match" in m] == [True]
    assert (full / "checkpoints" / "latest").is_file()
    pipe = TinyT2IPipeline.from_pretrained(full / "final")
    assert pipe.unet.config.sample_size == 16

    # interrupted after 2 steps, then resumed: the same weights as the uninterrupted run
    part = tmp_path / "part"
    args = ["train", str(RECIPE), f"training.output_dir={part}", "training.stages.diffusion.steps=3", *TINY]
    assert main([*args, "--stop-after", "2"]) == 0
    assert not (part / "final").exists()
    assert main([*args, "--resume"]) == 0
    capsys.readouterr()
    a, b = _weights(full / "final"), _weights(part / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    calls = json.loads((part / "environment.json").read_text())["calls"]  # what each call ran under
    assert [c["resumed_from"] for c in calls] == [None, "stage0-step0000002"]

    # the quality script, with the bundled VLM
    sys_argv = sys.argv
    try:
        sys.argv = ["eval_t2i.py", str(full / "final"), "--n", "3", "--steps", "2",
                    "--save-images", str(tmp_path / "imgs"), "--items"]
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(RECIPE.parents[1] / "scripts" / "eval_t2i.py"), run_name="__main__")
    finally:
        sys.argv = sys_argv
    assert done.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 3 and len(report["items"]) == 3
    assert 0 <= report["color_match"] <= 1 and 0 <= report["shape_match"] <= 1
    assert len(list((tmp_path / "imgs").glob("*.png"))) == 3


def test_diffusion_stage_weight_average_resumes_exactly(tmp_path, capsys):
    def train(out: Path, *extra: str) -> dict[str, torch.Tensor]:
        args = ["train", str(RECIPE), f"training.output_dir={out}", "training.stages.diffusion.steps=3", *TINY]
        for call in (extra or ((),)):
            assert main([*args, *call]) == 0
        return _weights(out / "final")

    ema = ("training.stages.diffusion.ema_decay=0.5",)
    plain = train(tmp_path / "plain")
    averaged = train(tmp_path / "ema", ema)
    resumed = train(tmp_path / "resumed", (*ema, "--stop-after", "2"), (*ema, "--resume"))
    capsys.readouterr()
    assert all(torch.equal(averaged[k], resumed[k]) for k in averaged)
    assert any(not torch.equal(averaged[k], plain[k]) for k in averaged)
