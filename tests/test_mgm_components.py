"""Mini-Gemini components: patch info mining, the HR ConvNeXt tower, HR/LR/HD views."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from minigem.config import ConnectorConfig, VisionAuxConfig
from minigem.connectors.base import build_connector
from minigem.connectors.patch_mining import PatchMiningConnector, default_form
from minigem.errors import CheckpointError
from minigem.vision.base import VisionFeatures
from minigem.vision.convnext import (
    HRTower,
    build_hr_tower,
    load_hr_weights,
    mgm_aux_key_to_timm,
    timm_key_to_mgm,
)
from minigem.vision.hd import mgm_views, split_hr_views

C, C_HR, D = 16, 24, 32
TINY = {"dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1)}


def _connector(projector: str = "mlp2x_gelu", seed: int = 0, **kw) -> PatchMiningConnector:
    torch.manual_seed(seed)
    conn = PatchMiningConnector(projector, C, D, C_HR, **kw)
    with torch.no_grad():  # non-trivial LayerNorm affines, so folding them is really tested
        for name, p in conn.named_parameters():
            if name.endswith(("0.weight", "0.bias")) and p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return conn


def _paper_formula(conn: PatchMiningConnector, q: torch.Tensor, hr: torch.Tensor):
    """T = MLP(Q + softmax(phi(Q) phi(K)^T / sqrt(C)) phi(V)), one LR token at a time."""
    b, n, c = q.shape
    side = math.isqrt(n)
    m = hr.shape[-1] // side
    toks, attns = [], []
    for bi in range(b):
        for i in range(n):
            r, col = divmod(i, side)
            region = hr[bi, :, r * m : (r + 1) * m, col * m : (col + 1) * m]  # [C_hr, M, M]
            cells = region.reshape(hr.shape[1], m * m).T  # [M*M, C_hr], row-major cells
            qi = conn.vlm_uni_query_projector(q[bi, i])  # [C]
            k = conn.vlm_uni_aux_projector(cells)  # [M*M, C]
            v = conn.vlm_uni_val_projector(cells)
            a = torch.softmax(k @ qi / math.sqrt(c), dim=-1)  # [M*M]
            toks.append(q[bi, i] + a @ v)
            attns.append(a)
    t = torch.stack(toks).view(b, n, c)
    return conn.projector(t), torch.stack(attns).view(b, n, m * m)


# ----------------------------------------------------------------------------- mining

# the map read in place a few token rows per step (the CPU's default), each token's block gathered
# into a copy, the map read in place an image per step with its rows as one batched GEMM (the GPU's)
FORMS = ["rows", "gathered", "image"]


# one token row, a few rows, two of the three images, all images per step
@pytest.mark.parametrize("chunk_cells", [1, 40, 300, 10**6])
@pytest.mark.parametrize("n,side_hr", [(4, 6), (9, 12), (1, 1), (36, 12)])  # 36: 5 rows + 1
@pytest.mark.parametrize("form", FORMS)
def test_mining_matches_paper_formula(chunk_cells: int, n: int, side_hr: int, form: str) -> None:
    conn = _connector(chunk_cells=chunk_cells)
    conn.form = form
    q = torch.randn(3, n, C)
    hr = torch.randn(3, C_HR, side_hr, side_hr) * 2 + 0.5
    before = hr.clone()
    ref, ref_attn = _paper_formula(conn, q, hr)
    with torch.no_grad():
        out = conn(VisionFeatures(q, hr))
        attn = conn.mining_attention(VisionFeatures(q, hr))
    assert out.shape == (3, n, D)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn, ref_attn, atol=1e-6, rtol=1e-5)
    assert torch.equal(hr, before)  # normalised in place only on its own copies


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")
def test_mining_forms_agree_on_cuda() -> None:
    """On a GPU (where `default_form` picks them): the image and gathered forms match the row form
    in fp32 (outputs and every gradient) and stay close to it with a bf16 model and map."""
    conn = _connector().cuda()
    q = torch.randn(3, 16, C, device="cuda")
    hr = torch.randn(3, C_HR, 64, 64, device="cuda") * 1.5 + 0.7  # 64 x 64: the image form's size
    assert default_form(True, 64 * 64) == "image"
    grads, outs = {}, {}
    for form in FORMS:
        conn.form = form
        conn.zero_grad()
        qq, hh = q.clone().requires_grad_(True), hr.clone().requires_grad_(True)
        outs[form] = conn(VisionFeatures(qq, hh))
        outs[form].square().sum().backward()
        grads[form] = {k: p.grad.clone() for k, p in [*conn.named_parameters(), ("q", qq), ("hr", hh)]}
    for form in ("image", "gathered"):
        torch.testing.assert_close(outs[form], outs["rows"], atol=1e-4, rtol=1e-4)
        for k, g in grads["rows"].items():
            assert (grads[form][k] - g).abs().max() <= 1e-4 * g.abs().max() + 1e-6, (form, k)
    half = conn.to(torch.bfloat16)
    with torch.no_grad():
        for form in ("image", "gathered"):
            half.form = form
            out = half(VisionFeatures(q.bfloat16(), hr.bfloat16())).float()
            assert (out - outs["rows"]).abs().max() < 0.03 * outs["rows"].abs().max()


def test_mining_default_form() -> None:
    """rows on the CPU; on a GPU an image per step from 64 x 64 maps up (768 px: 192 x 192),
    gathered blocks below (tiny-mgm's 24 x 24); a bad form is named."""
    assert default_form(False, 192 * 192) == "rows"
    assert default_form(True, 192 * 192) == default_form(True, 64 * 64) == "image"
    assert default_form(True, 24 * 24) == default_form(True, 63 * 63) == "gathered"
    conn = _connector()
    conn.form = "blocks"
    with pytest.raises(ValueError, match="rows, gathered or image; got 'blocks'"):
        conn(VisionFeatures(torch.randn(1, 4, C), torch.randn(1, C_HR, 4, 4)))


@pytest.mark.parametrize("form", FORMS)
def test_mining_folded_weights_follow_parameter_changes(form: str) -> None:
    """Without autograd the folded key/value weights are kept between calls; a weight changed in
    place (an optimizer step) or replaced (a state_dict load) must not serve stale ones."""
    conn = _connector()
    conn.form = form
    q, hr = torch.randn(2, 4, C), torch.randn(2, C_HR, 4, 4)
    with torch.no_grad():
        conn(VisionFeatures(q, hr))
        conn.vlm_uni_val_projector[1].weight.mul_(2.0)
        conn.vlm_uni_aux_projector[0].bias.add_(0.3)
        torch.testing.assert_close(conn(VisionFeatures(q, hr)), _paper_formula(conn, q, hr)[0],
                                   atol=1e-5, rtol=1e-5)
        other = _connector(seed=1)
        conn.load_state_dict(other.state_dict())
        torch.testing.assert_close(conn(VisionFeatures(q, hr)), _paper_formula(other, q, hr)[0],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_cells", [4, None])  # token rows of one image; whole images
@pytest.mark.parametrize("form", FORMS)
def test_mining_gradients_match_reference(chunk_cells: int | None, form: str) -> None:
    """Gradients of every mining weight, of the LR features and of the HR map (a trainable HR
    tower) equal the paper's formula's."""
    conn = _connector(chunk_cells=chunk_cells)
    conn.form = form
    q = torch.randn(2, 4, C, requires_grad=True)
    hr = (torch.randn(2, C_HR, 4, 4) * 2 + 0.5).requires_grad_(True)
    conn(VisionFeatures(q, hr)).square().sum().backward()
    ours = {k: p.grad.clone() for k, p in [*conn.named_parameters(), ("q", q), ("hr", hr)]}
    conn.zero_grad()
    q.grad = hr.grad = None
    _paper_formula(conn, q, hr)[0].square().sum().backward()
    for k, p in [*conn.named_parameters(), ("q", q), ("hr", hr)]:
        torch.testing.assert_close(ours[k], p.grad, atol=1e-4, rtol=1e-4, msg=k)


@pytest.mark.parametrize("n,side_hr", [(1, 5), (4, 8), (16, 16), (36, 48), (576, 48)])
def test_mining_keeps_n_tokens(n: int, side_hr: int) -> None:
    conn = _connector(projector="linear")
    with torch.no_grad():
        out = conn(VisionFeatures(torch.randn(2, n, C), torch.randn(2, C_HR, side_hr, side_hr)))
    assert out.shape == (2, n, D) and conn.num_tokens(n) == n
    assert torch.isfinite(out).all()


def test_mining_with_pool_mines_wider_regions() -> None:
    """pool 2: a 6x6 LR grid becomes 3x3 tokens, each mining a 2x-wider HR block (M 4 -> 8)."""
    from minigem.connectors.base import pool_grid

    conn = _connector(projector="linear")
    pooled = _connector(projector="linear")
    pooled.pool = 2
    q, hr = torch.randn(2, 36, C), torch.randn(2, C_HR, 24, 24)
    with torch.no_grad():
        out = pooled(VisionFeatures(q, hr))
        ref = conn(VisionFeatures(pool_grid(q, 2), hr))
        att = pooled.mining_attention(VisionFeatures(q, hr))
    assert out.shape == (2, 9, D) and pooled.num_tokens(36) == 9
    torch.testing.assert_close(out, ref)
    assert att.shape == (2, 9, 8 * 8)


def test_mining_state_dict_names_match_release() -> None:
    conn = build_connector(ConnectorConfig(type="patch_mining"), C, D, C_HR)
    prefixes = {k.rsplit(".", 1)[0] for k in conn.state_dict()}
    assert prefixes == {
        "vlm_uni_query_projector.0", "vlm_uni_query_projector.1",
        "vlm_uni_aux_projector.0", "vlm_uni_aux_projector.1",
        "vlm_uni_val_projector.0", "vlm_uni_val_projector.1",
        "projector.0", "projector.2",
    }  # fmt: skip
    assert conn.vlm_uni_aux_projector[1].weight.shape == (C, C_HR)


@pytest.mark.parametrize(
    "n,hr_shape,needle",
    [
        (5, (C_HR, 10, 10), "square number of low-res tokens; got N=5"),
        (4, (C_HR, 7, 7), "HR map is 7x7 but the low-res grid is 2x2 (N=4)"),
        (4, (C_HR, 8, 4), "HR map is 8x4 but the low-res grid is 2x2"),
        (
            4,
            (12, 8, 8),
            "high_res features have 12 channels but the connector was built for aux_dim=24",
        ),
    ],
)
def test_mining_bad_sizes(n: int, hr_shape: tuple[int, ...], needle: str) -> None:
    conn = _connector()
    with pytest.raises(ValueError) as err:
        conn(VisionFeatures(torch.randn(1, n, C), torch.randn(1, *hr_shape)))
    assert needle in str(err.value)


def test_mining_missing_inputs_errors() -> None:
    conn = _connector()
    with pytest.raises(ValueError, match="needs high-res features"):
        conn(VisionFeatures(torch.randn(1, 4, C)))
    with pytest.raises(ValueError, match="low_res has 2 image views but high_res has 1"):
        conn(VisionFeatures(torch.randn(2, 4, C), torch.randn(1, C_HR, 4, 4)))
    with pytest.raises(ValueError, match="needs aux_dim"):
        build_connector(ConnectorConfig(type="patch_mining"), C, D, None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", FORMS)
def test_mining_half_precision_large_inputs(dtype: torch.dtype, form: str) -> None:
    conn = _connector()
    conn.form = form
    q, hr = torch.randn(2, 4, C), torch.randn(2, C_HR, 8, 8)
    with torch.no_grad():
        ref = conn.mining_attention(VisionFeatures(q, hr))
        conn = conn.to(dtype)
        big = VisionFeatures((q * 1e3).to(dtype), (hr * 3e3 + 1e4).to(dtype))  # LN: scale moot
        out, attn = conn(big), conn.mining_attention(big)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert attn.dtype == torch.float32
    assert (attn - ref).abs().max() < 0.05


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", FORMS)
def test_mining_softmax_fp32_no_nan(dtype: torch.dtype, form: str) -> None:
    conn = _connector()
    conn.form = form
    with torch.no_grad():  # scores ~1e7: beyond fp16's range, coarse in bf16
        conn.vlm_uni_query_projector[1].weight.mul_(1000)
        conn.vlm_uni_aux_projector[1].weight.mul_(1000)
        conn = conn.to(dtype)
        q, hr = torch.randn(2, 4, C).to(dtype), torch.randn(2, C_HR, 8, 8).to(dtype)
        out = conn(VisionFeatures(q, hr))
        attn = conn.mining_attention(VisionFeatures(q, hr))
        # what the release computes for token 0: scores in the model dtype
        k = conn.vlm_uni_aux_projector(hr[0, :, :4, :4].reshape(C_HR, -1).T)
        naive = (k @ conn.vlm_uni_query_projector(q[0, 0]) / math.sqrt(C)).softmax(-1)
    assert torch.isfinite(out).all() and torch.isfinite(attn).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4))
    if dtype == torch.float16:
        assert not torch.isfinite(naive).all()  # the release's fp16 softmax gives NaN here


# ----------------------------------------------------------------------------- HR tower


def _tower(**config) -> HRTower:
    torch.manual_seed(0)
    return HRTower(VisionAuxConfig(timm_name="convnext_tiny", config={**TINY, **config}))


def _timm_trunk(**config) -> nn.Module:
    import timm

    torch.manual_seed(1)
    return timm.create_model("convnext_tiny", pretrained=False, **TINY, **config).eval()


def test_hr_tower_shapes_and_upsampling() -> None:
    tower = _tower().freeze()
    assert tower.out_channels == 120 and tower.dims == [8, 16, 32, 64]
    px = torch.randn(2, 3, 64, 64)
    out = tower(px)
    assert out.shape == (2, 120, 16, 16)
    x, stages = tower.vision_stem(px), []
    for stage in tower.vision_stages:
        x = stage(x)
        stages.append(x)
    expect = [stages[0]] + [
        F.interpolate(s, size=(16, 16), mode="bilinear", align_corners=False) for s in stages[1:]
    ]
    torch.testing.assert_close(out, torch.cat(expect, 1))


def test_hr_tower_key_names_and_mapping() -> None:
    keys = set(_tower().state_dict())
    assert "vision_stem.0.weight" in keys and "vision_stem.1.bias" in keys
    assert "vision_stages.1.downsample.1.weight" in keys
    assert (
        "vision_stages.3.blocks.0.gamma" in keys and "vision_stages.0.blocks.0.mlp.fc2.bias" in keys
    )
    assert mgm_aux_key_to_timm(
        "model.vision_tower_aux.vision_stages.2.blocks.0.conv_dw.weight"
    ) == ("stages.2.blocks.0.conv_dw.weight")
    assert timm_key_to_mgm("stem.1.weight") == "vision_stem.1.weight"
    assert timm_key_to_mgm("head.fc.weight") is None
    assert {mgm_aux_key_to_timm(k) for k in keys} <= set(_timm_trunk().state_dict())


def test_frozen_tower_has_no_drop_path() -> None:
    tower = _tower(drop_path_rate=0.5)
    parent = nn.ModuleDict({"aux": tower, "head": nn.Linear(2, 2)})
    px = torch.randn(2, 3, 32, 32)
    parent.train()
    torch.manual_seed(0)
    a = tower(px)
    b = tower(px)
    assert not torch.allclose(a, b)  # unfrozen in train mode: drop-path is active
    tower.freeze()
    parent.train()
    assert parent["head"].training and not any(m.training for m in tower.modules())
    torch.manual_seed(0)
    a, b = tower(px), tower(px)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not a.requires_grad
    parent.requires_grad_(True)  # a stage that trains the tower (requires_grad set directly)
    parent.train()
    assert tower.training and not tower.frozen and tower(px).requires_grad
    parent.requires_grad_(False)  # ... and one that does not: eval again on .train()
    parent.train()
    assert tower.frozen and not tower.training


def _save(state: dict[str, torch.Tensor], path) -> None:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, str(path))


@pytest.mark.parametrize("style", ["timm", "open_clip", "open_clip_dir", "mgm"])
def test_load_hr_weights(tmp_path, style: str) -> None:
    trunk = _timm_trunk()
    state = trunk.state_dict()  # includes head.* keys, which are ignored
    if style == "timm":
        path = tmp_path / "convnext.safetensors"
        _save(state, path)
    elif style.startswith("open_clip"):
        state = {f"visual.trunk.{k}": v for k, v in state.items()}
        state["visual.head.proj.weight"] = torch.zeros(4, 64)  # not trunk: ignored
        state["transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(3, 3)
        state["logit_scale"] = torch.zeros(())
        path = tmp_path / "open_clip.bin"
        if style == "open_clip_dir":  # a directory holding open_clip's file name
            _save(state, tmp_path / "open_clip_pytorch_model.bin")
            path = tmp_path
        else:
            _save(state, path)
    else:
        state = {f"model.vision_tower_aux.{timm_key_to_mgm(k)}": v for k, v in state.items()
                 if timm_key_to_mgm(k)}  # fmt: skip
        state["model.mm_projector.0.weight"] = torch.zeros(2, 2)
        path = tmp_path / "mgm.safetensors"
        _save(state, path)
    tower = _tower()
    load_hr_weights(tower, path)
    px = torch.randn(1, 3, 32, 32)
    feats = trunk.forward_intermediates(px, intermediates_only=True)  # timm's own stages
    expect = [feats[0]] + [
        F.interpolate(f, size=(8, 8), mode="bilinear", align_corners=False) for f in feats[1:]
    ]
    with torch.no_grad():
        torch.testing.assert_close(tower.freeze()(px), torch.cat(expect, 1))


def test_load_hr_weights_errors(tmp_path) -> None:
    state = {f"visual.trunk.{k}": v for k, v in _timm_trunk().state_dict().items()}
    del state["visual.trunk.stages.2.blocks.0.gamma"]
    state["visual.trunk.stages.4.blocks.0.gamma"] = torch.zeros(3)
    state["visual.trunk.stem.0.bias"] = torch.zeros(5)
    _save(state, tmp_path / "bad.bin")
    with pytest.raises(CheckpointError) as err:
        load_hr_weights(_tower(), tmp_path / "bad.bin")
    msg = str(err.value)
    assert "missing keys (1): vision_stages.2.blocks.0.gamma" in msg
    assert "unexpected keys (1): vision_stages.4.blocks.0.gamma" in msg
    assert "vision_stem.0.bias (5,) != (8,)" in msg
    _save({"text.weight": torch.zeros(2)}, tmp_path / "other.bin")
    with pytest.raises(CheckpointError, match="no ConvNeXt trunk keys"):
        load_hr_weights(_tower(), tmp_path / "other.bin")
    with pytest.raises(CheckpointError, match="no HR tower checkpoint; expected one of"):
        load_hr_weights(_tower(), tmp_path)  # a directory without a known checkpoint file


def test_build_hr_tower_loads_and_freezes(tmp_path) -> None:
    _save(_timm_trunk().state_dict(), tmp_path / "t.safetensors")
    cfg = VisionAuxConfig(
        timm_name="convnext_tiny", config=TINY, path=str(tmp_path / "t.safetensors")
    )
    tower = build_hr_tower(cfg)
    assert tower.frozen and not tower.training
    assert not any(p.requires_grad for p in tower.parameters())


# ----------------------------------------------------------------------------- views


QUAD = [[(255, 0, 0), (0, 255, 0)], [(0, 0, 255), (255, 255, 0)]]
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _quadrants(side: int = 32) -> Image.Image:
    img = Image.new("RGB", (side, side))
    h = side // 2
    for r in range(2):
        for c in range(2):
            img.paste(QUAD[r][c], (c * h, r * h, (c + 1) * h, (r + 1) * h))
    return img


def _norm(rgb) -> torch.Tensor:
    return torch.tensor([(v / 255 - m) / s for v, m, s in zip(rgb, MEAN, STD, strict=True)])


def test_hd_views_order_and_pixels() -> None:
    lr, hr = mgm_views(_quadrants(), 8, 32, 2, True, "square", MEAN, STD)
    assert lr.shape == (5, 3, 8, 8) and hr.shape == (3, 32, 32)
    for r in range(2):
        for c in range(2):
            crop = lr[1 + r * 2 + c]  # crop (r, c) is a solid quadrant
            torch.testing.assert_close(crop, _norm(QUAD[r][c])[:, None, None].expand_as(crop))
            glob = lr[0, :, r * 4 : (r + 1) * 4, c * 4 : (c + 1) * 4]  # global: whole image
            torch.testing.assert_close(glob, _norm(QUAD[r][c])[:, None, None].expand_as(glob))
    big = F.interpolate(hr[None], size=(16, 16), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(lr[2], big[:, :8, 8:])  # LR is a bilinear downscale of HR


def test_views_single_and_pad() -> None:
    img = Image.new("RGB", (20, 10), (255, 255, 255))
    lr, hr = mgm_views(img, 8, 16, aspect="pad", mean=MEAN, std=STD)
    assert lr.shape == (1, 3, 8, 8) and hr.shape == (3, 16, 16)
    fill = _norm(tuple(int(m * 255) for m in MEAN))
    torch.testing.assert_close(hr[:, 0, 8], fill, atol=1e-5, rtol=0)  # padded band: mean colour
    torch.testing.assert_close(hr[:, 8, 8], _norm((255, 255, 255)), atol=1e-5, rtol=0)
    _, hr_sq = mgm_views(img, 8, 16, aspect="square", mean=MEAN, std=STD)
    torch.testing.assert_close(hr_sq[:, 0, 8], _norm((255, 255, 255)), atol=1e-5, rtol=0)
    tiny, _ = mgm_views(Image.new("RGB", (1, 1)), 8, 16)  # upscaled: fine
    assert tiny.shape == (1, 3, 8, 8)


def test_views_errors() -> None:
    with pytest.raises(ValueError, match=r"empty image \(0x5\)"):
        mgm_views(Image.new("RGB", (0, 5)), 8, 16)
    with pytest.raises(ValueError, match="global view needs image_grid >= 2"):
        mgm_views(_quadrants(), 8, 16, 1, True)
    with pytest.raises(ValueError, match="unknown image aspect 'crop'"):
        mgm_views(_quadrants(), 8, 16, aspect="crop")


def test_split_hr_views_order() -> None:
    hr = torch.randn(2, 6, 8, 8)
    out = split_hr_views(hr, 2, True)
    assert out.shape == (10, 6, 4, 4)
    for b in range(2):
        torch.testing.assert_close(out[5 * b], F.avg_pool2d(hr[b], 2))  # halved map
        for r in range(2):
            for c in range(2):
                torch.testing.assert_close(
                    out[5 * b + 1 + 2 * r + c], hr[b, :, r * 4 : (r + 1) * 4, c * 4 : (c + 1) * 4]
                )
    assert split_hr_views(hr, 2, False).shape == (8, 6, 4, 4)
    assert split_hr_views(hr, 1, False) is hr
    with pytest.raises(ValueError, match="HR map 8x8 cannot be split into a 3x3 grid"):
        split_hr_views(hr, 3, False)


@pytest.mark.parametrize("grid,global_view", [(1, False), (2, False), (2, True), (4, True)])
def test_tower_writes_hd_views_directly(grid: int, global_view: bool) -> None:
    tower = _tower().freeze()
    px = torch.randn(2, 3, 64, 64)
    views = tower(px, grid, global_view)
    torch.testing.assert_close(views, split_hr_views(tower(px), grid, global_view))


def test_hd_pipeline_tokens() -> None:
    """HD end to end: 5 LR views + split HR map -> 5N tokens per image."""
    tower = _tower().freeze()
    conn = PatchMiningConnector("linear", C, D, tower.out_channels)
    lr, hr_px = mgm_views(_quadrants(64), 16, 64, 2, True)
    hr = tower(hr_px[None], 2, True)  # [5, 120, 8, 8], = split_hr_views(tower(px), 2, True)
    with torch.no_grad():
        out = conn(VisionFeatures(torch.randn(lr.shape[0], 4, C), hr))
    assert out.shape == (5, 4, D)


def test_mgm_starts_from_the_same_seed_llava(tiny_tokenizer) -> None:
    """The HR tower and the mining projections draw from streams of their own (minigem.rng): every
    weight a Mini-Gemini shares with its LR-only LLaVA (same config without the HR path, same
    seed) starts equal, and the extras still differ from seed to seed."""
    from conftest import build_tiny_model, mgm_config

    mgm_cfg = mgm_config()
    llava_cfg = mgm_cfg.model_copy(update={"vision_aux": None,
                                           "connector": ConnectorConfig(type="mlp2x_gelu")})
    mgm = build_tiny_model(mgm_cfg, tiny_tokenizer, seed=3).state_dict()
    llava = build_tiny_model(llava_cfg, tiny_tokenizer, seed=3).state_dict()
    assert set(llava) < set(mgm)
    for key, value in llava.items():
        torch.testing.assert_close(mgm[key], value, rtol=0, atol=0, msg=key)
    extras = [k for k in mgm if k not in llava]
    assert any(k.startswith("vision_tower_aux.") for k in extras)
    assert any(k.startswith("connector.vlm_uni_") for k in extras)
    other = build_tiny_model(mgm_cfg, tiny_tokenizer, seed=4).state_dict()
    for key in extras:
        if key.endswith("weight") and mgm[key].ndim > 1:  # LayerNorm weights start at 1 anyway
            assert not torch.equal(mgm[key], other[key]), key
