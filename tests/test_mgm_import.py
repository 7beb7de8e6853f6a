"""`minigem convert --from mgm`: a tiny checkpoint in the released Mini-Gemini layout, and the
MGM recipes (one step of each stage)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from minigem.chat import train_tokenizer
from minigem.checkpoints.mgm import import_mgm
from minigem.checkpoints.native import load_model
from minigem.cli import main
from minigem.config import load_recipe
from minigem.data.synth import world_texts
from minigem.errors import CheckpointError

timm = pytest.importorskip("timm")

REPO = Path(__file__).resolve().parents[1]
LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": False}
# OpenAI CLIP conventions (64-dim heads), so the tower config inferred from the weights is exact
CLIP = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 1,
        "image_size": 16, "patch_size": 8}
DIMS, DEPTHS = (8, 16, 32, 64), (1, 1, 1, 1)
HR_SIZE = 64


def _ln_linear(i: int, o: int) -> torch.nn.Sequential:
    seq = torch.nn.Sequential(torch.nn.LayerNorm(i), torch.nn.Linear(i, o))
    with torch.no_grad():  # non-trivial LayerNorm affines
        seq[0].weight.uniform_(0.5, 1.5)
        seq[0].bias.normal_(0, 0.1)
    return seq


class Release:
    """The reference modules of a tiny MGM release (random weights)."""

    def __init__(self, vocab: int) -> None:
        from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        self.llm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **LLAMA)).eval()
        self.clip = CLIPVisionModel(CLIPVisionConfig(**CLIP)).eval()
        self.hr = timm.create_model("convnext_large", pretrained=False, num_classes=0, dims=DIMS,
                                    depths=DEPTHS).eval()
        c, c_hr = CLIP["hidden_size"], sum(DIMS)
        self.q, self.k, self.v = _ln_linear(c, c), _ln_linear(c_hr, c), _ln_linear(c_hr, c)
        self.proj = torch.nn.Sequential(torch.nn.Linear(c, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))

    def weights(self, towers: bool = True, mining: bool = True) -> dict[str, torch.Tensor]:
        sd = dict(self.llm.state_dict())
        sd.update({f"model.mm_projector.{k}": v for k, v in self.proj.state_dict().items()})
        if mining:
            for name, mod in (("query", self.q), ("aux", self.k), ("val", self.v)):
                sd.update({f"model.vlm_uni_{name}_projector.{k}": v for k, v in mod.state_dict().items()})
        if towers:
            sd.update({f"model.vision_tower.vision_tower.{k}": v for k, v in self.clip.state_dict().items()})
            sd.update({f"model.vision_tower_aux.vision_{k}": v for k, v in self.hr.state_dict().items()
                       if k.startswith(("stem.", "stages."))})
        return {k: v.contiguous() for k, v in sd.items()}

    # ------------------------------------------------------------ the paper's formula

    @torch.no_grad()
    def visual_tokens(self, px: torch.Tensor, px_aux: torch.Tensor, grid: int, glob: bool) -> torch.Tensor:
        q_raw = self.clip(px, output_hidden_states=True).hidden_states[-2][:, 1:]  # [V, N, C]
        x = self.hr.stem(px_aux)
        stages = []
        for st in self.hr.stages:
            x = st(x)
            stages.append(x)
        h = stages[0].shape[-1]
        hr = torch.cat([stages[0]] + [F.interpolate(s, size=(h, h), mode="bilinear", align_corners=False)
                                      for s in stages[1:]], 1)[0]  # [C_hr, H, H]
        views = []
        if grid > 1:
            hh = h // grid
            if glob:
                views.append(F.interpolate(hr[None], size=(hh, hh), mode="bilinear", align_corners=False)[0])
            views += [hr[:, r * hh:(r + 1) * hh, c * hh:(c + 1) * hh] for r in range(grid) for c in range(grid)]
        else:
            views = [hr]
        out = []
        for v_i, view in enumerate(views):
            n, c = q_raw.shape[1:]
            side = math.isqrt(n)
            m = view.shape[-1] // side
            rows = []
            for t in range(n):
                r, col = divmod(t, side)
                cells = view[:, r * m:(r + 1) * m, col * m:(col + 1) * m].reshape(view.shape[0], -1).T
                qq = self.q(q_raw[v_i, t])
                att = torch.softmax(self.k(cells) @ qq / math.sqrt(c), -1) @ self.v(cells)
                rows.append(q_raw[v_i, t] + att)
            out.append(self.proj(torch.stack(rows)))
        return torch.cat(out)  # [V*N, D]


def write_release(path: Path, rel: Release, tok, *, hd: bool = False, towers: bool = True,
                  mining: bool = True, sharded: bool = False, **cfg_extra) -> Path:
    path.mkdir(parents=True)
    cfg = {"model_type": "mgm", "architectures": ["MGMLlamaForCausalLM"], "vocab_size": len(tok),
           **LLAMA, "mm_vision_tower": "openai/clip-vit-large-patch14-336",
           "mm_vision_tower_aux": "model_zoo/OpenAI/openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup",
           "mm_hidden_size": CLIP["hidden_size"], "mm_hidden_size_aux": sum(DIMS),
           "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
           "mm_vision_select_feature": "patch", "image_size_aux": HR_SIZE,
           "image_grid": 2 if hd else 1, "image_global": hd, "image_aspect_ratio": "pad",
           "tokenizer_model_max_length": 256, **cfg_extra}
    (path / "config.json").write_text(json.dumps(cfg))
    sd = rel.weights(towers=towers, mining=mining)
    if sharded:
        keys = sorted(sd)
        parts = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, ks in parts.items():
            save_file({k: sd[k] for k in ks}, str(path / name))
        index = {"weight_map": {k: n for n, ks in parts.items() for k in ks}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(sd, str(path / "model.safetensors"))
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(world_texts(), vocab_size=300)


@pytest.fixture(scope="module")
def rel(tok):
    return Release(len(tok))


def _image() -> Image.Image:
    g = torch.Generator().manual_seed(1)
    arr = (torch.rand(40, 56, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


def _check_logits(dst: Path, rel: Release, hd: bool) -> None:
    model = load_model(dst).float().eval()
    assert model.config.connector.type == "patch_mining"
    assert model.config.vision_aux.config == {"dims": list(DIMS), "depths": list(DEPTHS)}
    assert model.config.template == "vicuna_v1"
    pix = model.processor([_image()])
    grid, glob = (2, True) if hd else (1, False)
    assert pix["pixel_values"].shape[0] == (5 if hd else 1)
    visual = rel.visual_tokens(pix["pixel_values"], pix["pixel_values_aux"], grid, glob)
    text = model.tokenizer("the red circle", add_special_tokens=False)["input_ids"]
    t = visual.shape[0]
    ids = torch.tensor([text + [model.image_token_id] * t + text])
    with torch.no_grad():
        got = model(ids, pixel_values=pix["pixel_values"], pixel_values_aux=pix["pixel_values_aux"]).logits
        emb = rel.llm.get_input_embeddings()(torch.tensor([text + [0] * t + text]))
        emb[0, len(text):len(text) + t] = visual
        want = rel.llm(inputs_embeds=emb).logits
    v = want.shape[-1]
    torch.testing.assert_close(got[..., :v], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("hd,sharded", [(False, False), (True, True)])
def test_import_matches_paper_formula(hd, sharded, rel, tok, tmp_path, capsys):
    src = write_release(tmp_path / "src", rel, tok, hd=hd, sharded=sharded)
    assert main(["convert", "--from", "mgm", str(src), str(tmp_path / "dst")]) == 0
    _check_logits(tmp_path / "dst", rel, hd)


def _fails(capsys, pattern: str, *argv: str) -> None:
    """The CLI reports the CheckpointError (exit status != 0) with a matching message."""
    assert main(["convert", "--from", "mgm", *argv]) != 0
    err = capsys.readouterr().err
    assert re.search(pattern, err, re.S), err


def test_import_separate_towers(rel, tok, tmp_path, capsys):
    src = write_release(tmp_path / "src", rel, tok, towers=False)
    clip_dir = tmp_path / "clip"
    rel.clip.save_pretrained(clip_dir)
    trunk = {f"visual.trunk.{k}": v.contiguous() for k, v in rel.hr.state_dict().items()}
    trunk["text.token_embedding.weight"] = torch.zeros(4, 4)  # open_clip's text tower: ignored
    hr_file = tmp_path / "open_clip_model.safetensors"
    save_file(trunk, str(hr_file))
    # without the towers: a clear error
    _fails(capsys, "pass --vision-tower DIR", str(src), str(tmp_path / "x"))
    _fails(capsys, "pass --vision-tower-aux", str(src), str(tmp_path / "x"), "--vision-tower", str(clip_dir))
    assert main(["convert", "--from", "mgm", str(src), str(tmp_path / "dst"), "--vision-tower", str(clip_dir),
                 "--vision-tower-aux", str(hr_file)]) == 0
    _check_logits(tmp_path / "dst", rel, hd=False)


def test_import_errors(rel, tok, tmp_path, capsys):
    def convert(src, pattern):
        _fails(capsys, pattern, str(src), str(tmp_path / "out"))

    src = write_release(tmp_path / "nomine", rel, tok, mining=False)
    convert(src, "patch-mining weights")
    src = write_release(tmp_path / "wide", rel, tok, mm_hidden_size_aux=2880)
    convert(src, r"mm_hidden_size_aux 2880 .* channels 120")
    src = write_release(tmp_path / "mt", rel, tok, model_type="llava_llama")
    convert(src, "not a Mini-Gemini model")
    src = write_release(tmp_path / "extra", rel, tok)
    sd = rel.weights()
    sd["model.something_else.weight"] = torch.zeros(2)
    del sd["model.norm.weight"]
    save_file(sd, str(src / "model.safetensors"))
    convert(src, r"missing \(1\): language_model.model.norm.weight.*unexpected \(1\): language_model.model.something_else.weight")
    with pytest.raises(CheckpointError, match="not a Mini-Gemini model"):  # the Python API raises
        import_mgm(tmp_path / "mt", tmp_path / "out")
    with pytest.raises(SystemExit):
        main(["convert", "--from", "mgm", str(src)])


# ----------------------------------------------------------------------------- recipes

RECIPES = {
    "mgm-2b": ("gemma", "gemma", {"head_dim": 16}),
    "mgm-7b": ("llama", "vicuna_v1", {}),
    "mgm-7b-hd": ("llama", "vicuna_v1", {}),
    "mgm-8x7b": ("mixtral", "mistral_instruct", {"num_local_experts": 2, "num_experts_per_tok": 1}),
}


@pytest.fixture(scope="module")
def tokenizer_dir(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_runs_every_stage(name, tokenizer_dir, tmp_path):
    recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
    arch, template, extra = RECIPES[name]
    assert recipe.model.template == template and recipe.model.connector.type == "patch_mining"
    st = recipe.training.stages
    assert [s.train for s in st] == [["mining", "projector"], ["mining", "projector", "llm"]]
    assert st[0].data.template == "plain"
    assert [(s.batch_size * s.grad_accum, s.epochs) for s in st] == [(256, 1), (128, 1)]
    assert st[0].lr == 1e-3 and st[1].lr == (1e-5 if name == "mgm-8x7b" else 2e-5)
    hd = name == "mgm-7b-hd"
    aux = recipe.model.vision_aux
    assert (aux.image_size, aux.image_grid, aux.image_global) == ((1536, 2, True) if hd else (768, 1, False))

    llm = {**LLAMA, **extra}
    if arch != "llama":
        llm.pop("tie_word_embeddings")
    overrides = [
        "model.llm.path=null", f"model.llm.arch={arch}", f"model.llm.config={json.dumps(llm)}",
        "model.vision.path=null", f"model.vision.config={json.dumps(CLIP)}",
        "model.vision_aux.path=null", "model.vision_aux.timm_name=convnext_large",
        f"model.vision_aux.config={json.dumps({'dims': list(DIMS), 'depths': list(DEPTHS)})}",
        f"model.vision_aux.image_size={HR_SIZE}",
        f"model.tokenizer={tokenizer_dir}", "model.max_length=96", "model.system_prompt=''",
        f"training.output_dir={tmp_path / 'run'}", "training.bf16='off'", "training.gradient_checkpointing=false",
    ]
    for s in st:
        data = {"synth": {"n": 4, "seed": 1, "image_size": 96}, "template": s.data.template}
        overrides += [f"training.stages.{s.name}.{k}" for k in (
            f"data={json.dumps(data)}", "steps=1", "epochs=null", "batch_size=2", "grad_accum=1")]
    assert main(["train", str(REPO / "recipes" / f"{name}.yaml"), *overrides]) == 0
    final = load_model(tmp_path / "run" / "final")
    assert final.config.vision_aux.image_grid == (2 if hd else 1)
