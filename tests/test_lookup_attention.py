"""scripts/lookup_attention.py: the answer position's attention on the question's words and on the
named object's cell, bucketed as lookup_report does."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_model, load_script, mgm_config

from minigem.data.synth import make_conversation, write_dataset


def test_token_cells_map_each_token_to_the_cell_of_its_centre() -> None:
    la = load_script("lookup_attention")
    assert la.token_cells(9) == list(range(9))
    assert la.token_cells(4) == [0, 2, 6, 8]  # a 2 x 2 grid: each centre in a corner cell
    cells = la.token_cells(576)  # 24 x 24: 8 x 8 tokens per cell
    assert [cells.count(c) for c in range(9)] == [64] * 9
    assert cells[:8] == [0] * 8 and cells[8] == 1 and cells[24 * 8] == 3 and cells[-1] == 8
    with pytest.raises(SystemExit, match="10 visual tokens"):
        la.token_cells(10)


def test_word_positions_cover_split_words_and_skip_bare_spaces() -> None:
    la = load_script("lookup_attention")
    pieces = ["Where", " is", " the", " re", "d", " ", "circle", "?", " ASSISTANT", ":"]
    assert la.word_positions(pieces, "red circle?", ("red", "circle")) == [[3, 4], [6]]
    # the last occurrence is the one asked about (an earlier turn may name other objects)
    pieces = [" red", " circle", "?", " Where", " is", " the", " red", " circle", "?"]
    assert la.word_positions(pieces, "red circle?", ("red", "circle")) == [[6], [7]]
    with pytest.raises(SystemExit, match="not found"):
        la.word_positions(pieces, "blue circle?", ("blue", "circle"))


def test_analyse_a_tiny_mgm(tmp_path, tiny_tokenizer) -> None:
    """On a random tiny Mini-Gemini (3 x 3 visual tokens, the HR path on): every position question
    is counted in one bucket, attention shares are shares (the target's cell and the other objects'
    cells never add past what the head pays to all visual tokens, and the words never past 1), and
    a bucket has a same-shape (same-colour) entry exactly when its objects share the shape
    (colour). A glyph split and an HD model are errors or counted as asked."""
    la = load_script("lookup_attention")
    T = ["position", "glyph"]
    torch.manual_seed(0)
    model = build_tiny_model(mgm_config(), tiny_tokenizer).eval()
    data = write_dataset(tmp_path / "d", n=60, seed=4, image_size=96, tasks=T)
    records = json.loads(data.read_text())
    n_pos = sum(r["category"] == "position" for r in records)
    out = la.analyse(model, data, data.parent, "position", tasks=T)
    assert out["n"] == n_pos > 5
    assert sum(e["n"] for e in out["lookup"].values()) == n_pos
    layers, heads = 2, 2  # TINY_LLAMA
    for key in ("colour", "shape"):
        g = torch.tensor(out["gather"][key])
        assert g.shape == (layers, heads) and (g >= 0).all() and (g <= 1 + 1e-5).all()
    word_total = torch.tensor(out["gather"]["colour"]) + torch.tensor(out["gather"]["shape"])
    assert (word_total <= 1 + 1e-5).all() and (word_total > 0).any()
    for bucket, e in out["lookup"].items():
        target = torch.tensor(e["target"])
        assert target.shape == (layers, heads) and (target > 0).all()  # softmax: never exactly 0
        assert ("same_shape" in e) == ("shape" in bucket or "both" in bucket), bucket
        assert ("same_colour" in e) == ("colour" in bucket or "both" in bucket), bucket
        for key in ("same_shape", "same_colour"):
            if key in e:
                assert (target + torch.tensor(e[key]) <= 1 + 1e-5).all(), bucket
    # the same numbers for the first question, computed here without the script's bookkeeping
    first = next(r for r in records if r["category"] == "position")
    one = la.analyse(model, data, data.parent, "position", limit=1, tasks=T)
    scene, _, messages = make_conversation(int(first["id"].split("-")[2]), 4, T)
    question = messages[0].content
    color, shape = question.removeprefix("<image>\nWhere is the ").rstrip("?").split()
    (target,) = [o for o in scene.objects if (o.color, o.shape) == (color, shape)]
    ids = model.encode_prompt(model.user_messages(question.removeprefix("<image>\n"), 1), 1)
    from PIL import Image

    pix = model.processor([Image.open(data.parent / first["image"]).convert("RGB")])
    t = torch.tensor([ids])
    with torch.inference_mode():
        att = model.language_model(inputs_embeds=model.embed(t, pix["pixel_values"], pix["pixel_values_aux"]),
                                   output_attentions=True).attentions
    vis = (t[0] == model.image_token_id).nonzero().squeeze(-1)
    want = torch.stack([a[0, :, -1, vis[target.cell]] for a in att])  # one token per cell
    (entry,) = one["lookup"].values()
    torch.testing.assert_close(torch.tensor(entry["target"]), want.float(), rtol=1e-5, atol=1e-6)

    glyph = la.analyse(model, data, data.parent, "glyph", tasks=T)
    assert glyph["n"] == sum(r["category"] == "glyph" for r in records)
    hd = build_tiny_model(mgm_config(hd=True), tiny_tokenizer)
    with pytest.raises(SystemExit, match="HD models"):
        la.analyse(hd, data, data.parent, tasks=T)
