"""Tokenizer training: round-trips, special tokens, determinism, save/load, adding tokens."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from minigem.chat import SPECIAL_TOKENS, ensure_special_tokens, get_template, train_tokenizer
from minigem.data.records import Message
from minigem.errors import ConfigError

WORLD = [
    f"There is a {c} {s} at the {p}."
    for c in ("red", "green", "blue", "yellow")
    for s in ("circle", "square", "triangle")
    for p in ("top left", "top right", "bottom left", "bottom right", "center")
] + [f"How many {s}s are there? {n}" for s in ("circle", "square") for n in range(10)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(WORLD, vocab_size=400)


@pytest.mark.parametrize("text", [
    "There is a red circle at the top left.",
    "  two leading spaces,   three inside and a tab\there",
    "line one\nline two\n\n\nafter blank lines\n",
    "\n",
    " ",
    "digits 0123456789 and punctuation !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "How many squares are there? 7",
])
def test_round_trip_ordinary_text(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("name", ["vicuna_v1", "llama_3", "chatml", "chatml_direct", "gemma", "mistral_instruct", "plain"])
def test_round_trip_template_text(tok, name):
    conv = [Message("system", "Be brief."), Message("user", "<image>\nWhat colour is the circle?"),
            Message("assistant", "It is red."), Message("user", "Where?\n  Say it twice."),
            Message("assistant", "top left\ntop left")]
    text = get_template(name).render_text(conv, tokenizer=tok)
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == text
    visible = text
    for t in SPECIAL_TOKENS:
        visible = visible.replace(t, "")
    assert tok.decode(ids, skip_special_tokens=True) == visible


def test_special_tokens_are_single_fixed_ids(tok):
    assert tok.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == list(SPECIAL_TOKENS)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    for t in SPECIAL_TOKENS:
        assert tok.encode(f"a{t}b", add_special_tokens=False)[1] == tok.convert_tokens_to_ids(t)
        assert len(tok.encode(t, add_special_tokens=False)) == 1
    assert tok.encode("red", add_special_tokens=True) == tok.encode("red", add_special_tokens=False)
    assert len(tok) <= 400
    assert len(tok.encode(" red circle at the top left", add_special_tokens=False)) <= 6  # merges learned


def test_deterministic():
    a = train_tokenizer(WORLD, vocab_size=300)
    b = train_tokenizer(list(WORLD), vocab_size=300)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


def test_save_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    text = "<s>USER: <image>\nHow many circles are there? ASSISTANT: 3</s>"
    ids = tok.encode(text, add_special_tokens=False)
    for loaded in (AutoTokenizer.from_pretrained(tmp_path), PreTrainedTokenizerFast.from_pretrained(tmp_path)):
        assert len(loaded) == len(tok)
        assert loaded.encode(text, add_special_tokens=False) == ids
        assert loaded.decode(ids) == text
        assert loaded.special_tokens_map == tok.special_tokens_map
        assert loaded.all_special_tokens == tok.all_special_tokens
        assert loaded.decode(loaded.encode("a  b\n c")) == "a  b\n c"


def test_unseen_characters(tok):
    assert tok.encode("é", add_special_tokens=False) == [tok.unk_token_id] * 2  # two UTF-8 bytes
    full = train_tokenizer(WORLD, vocab_size=400, full_byte_alphabet=True)
    for text in ("café ☕ naïve", "日本"):
        assert full.decode(full.encode(text)) == text


def test_extra_special_tokens_and_vocab_guard():
    t = train_tokenizer(WORLD, vocab_size=300, extra_special_tokens=["<h>", "</h>", "<image>"])
    assert t.convert_ids_to_tokens([len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + 1]) == ["<h>", "</h>"]
    assert len(t.encode("<h>x</h>", add_special_tokens=False)) == 3
    with pytest.raises(ConfigError, match="vocab_size 50 is below the 15 special tokens \\+ 97 alphabet symbols"):
        train_tokenizer(WORLD, vocab_size=50)


def test_ensure_special_tokens():
    t = train_tokenizer(WORLD, vocab_size=300)
    n = len(t)
    assert ensure_special_tokens(t, ["<image>", "<s>"]) == 0
    assert ensure_special_tokens(t, ["<obj>", "<obj>", "<box>"]) == 2
    assert len(t) == n + 2
    assert ensure_special_tokens(t, ["<obj>"]) == 0
    obj = t.convert_tokens_to_ids("<obj>")
    assert t.encode("a<obj>b", add_special_tokens=False)[1] == obj
    assert "<obj>" in t.all_special_tokens and "<image>" in t.all_special_tokens
    assert t.decode([obj], skip_special_tokens=True) == ""
