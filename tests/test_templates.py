"""Chat templates: exact prompt strings, label masks, Jinja templates, image expansion, errors."""

from __future__ import annotations

import copy

import pytest

from minigem.chat import (
    IGNORE_INDEX,
    TEMPLATES,
    Segment,
    count_images,
    encode_segments,
    get_template,
    train_tokenizer,
)
from minigem.data.records import Message
from minigem.errors import ConfigError, DataError

CORPUS = [
    "What colour is the circle? It is red.",
    "Where is it? Top left.",
    "Answer briefly. A small blue square at the bottom right.",
    "Compare the two images. They are the same.",
]

CONV = [
    Message("system", "Answer briefly."),
    Message("user", "<image>\nWhat colour is the circle?"),
    Message("assistant", "It is red."),
    Message("user", "Where is it?"),
    Message("assistant", "Top left."),
]
Q1 = "<image>\nWhat colour is the circle?"

# name -> (full prompt, trainable spans, generation prompt for CONV[:4])
EXPECTED: dict[str, tuple[str, list[str], str]] = {
    "vicuna_v1": (
        f"<s>Answer briefly. USER: {Q1} ASSISTANT: It is red.</s>USER: Where is it? ASSISTANT: Top left.</s>",
        [" It is red.</s>", " Top left.</s>"],
        f"<s>Answer briefly. USER: {Q1} ASSISTANT: It is red.</s>USER: Where is it? ASSISTANT:",
    ),
    "llama_3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnswer briefly.<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{Q1}<|eot_id|>"
        "<|start_header_id|>system<|end_header_id|>\n\nIt is red.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhere is it?<|eot_id|>"
        "<|start_header_id|>system<|end_header_id|>\n\nTop left.<|eot_id|>",
        ["It is red.<|eot_id|>", "Top left.<|eot_id|>"],
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnswer briefly.<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{Q1}<|eot_id|>"
        "<|start_header_id|>system<|end_header_id|>\n\nIt is red.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhere is it?<|eot_id|>"
        "<|start_header_id|>system<|end_header_id|>\n\n",
    ),
    "chatml": (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        f"<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\nIt is red.<|im_end|>\n"
        "<|im_start|>user\nWhere is it?<|im_end|>\n<|im_start|>assistant\nTop left.<|im_end|>\n",
        ["It is red.<|im_end|>\n", "Top left.<|im_end|>\n"],
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        f"<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\nIt is red.<|im_end|>\n"
        "<|im_start|>user\nWhere is it?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "chatml_direct": (
        "<|im_start|>system\nAnswer briefly.<|im_end|>"
        f"<|im_start|>user\n{Q1}<|im_end|><|im_start|>assistant\nIt is red.<|im_end|>"
        "<|im_start|>user\nWhere is it?<|im_end|><|im_start|>assistant\nTop left.<|im_end|>",
        ["It is red.<|im_end|>", "Top left.<|im_end|>"],
        "<|im_start|>system\nAnswer briefly.<|im_end|>"
        f"<|im_start|>user\n{Q1}<|im_end|><|im_start|>assistant\nIt is red.<|im_end|>"
        "<|im_start|>user\nWhere is it?<|im_end|><|im_start|>assistant\n",
    ),
    "gemma": (
        f"<bos><start_of_turn>user\nAnswer briefly.\n\n{Q1}<end_of_turn>\n"
        "<start_of_turn>model\nIt is red.<end_of_turn>\n<eos>"
        "<start_of_turn>user\nWhere is it?<end_of_turn>\n<start_of_turn>model\nTop left.<end_of_turn>\n<eos>",
        ["It is red.<end_of_turn>\n<eos>", "Top left.<end_of_turn>\n<eos>"],
        f"<bos><start_of_turn>user\nAnswer briefly.\n\n{Q1}<end_of_turn>\n"
        "<start_of_turn>model\nIt is red.<end_of_turn>\n<eos>"
        "<start_of_turn>user\nWhere is it?<end_of_turn>\n<start_of_turn>model\n",
    ),
    "mistral_instruct": (
        f"<s>[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\n{Q1} [/INST] It is red. </s>"
        "<s>[INST] Where is it? [/INST] Top left. </s>",
        [" It is red. </s>", " Top left. </s>"],
        f"<s>[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\n{Q1} [/INST] It is red. </s>"
        "<s>[INST] Where is it? [/INST]",
    ),
    # the second user turn has no image, so plain keeps nothing of it
    "plain": ("<s><image>It is red.\nTop left.\n", ["It is red.\nTop left.\n"], "<s><image>It is red.\n"),
}

CHATML_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_JINJA = (
    "{{ bos_token }}{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=256)


def token_runs(tok, ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """Group tokens by trainable / not and decode each run: the mask at token granularity."""
    runs: list[tuple[list[int], bool]] = []
    for i, lab in zip(ids, labels, strict=True):
        train = lab != IGNORE_INDEX
        if train:
            assert lab == i
        if runs and runs[-1][1] == train:
            runs[-1][0].append(i)
        else:
            runs.append(([i], train))
    return [(tok.decode(r, skip_special_tokens=False), t) for r, t in runs]


def test_registry_names():
    assert list(TEMPLATES) == [
        "chatml", "chatml_direct", "gemma", "jinja", "llama_3", "mistral_instruct", "plain", "vicuna_v1",
    ]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_render_prompt_and_label_mask(tok, name):
    full, trainable, gen = EXPECTED[name]
    tpl = get_template(name)
    segs = tpl.render(CONV, tokenizer=tok)
    assert "".join(s.text for s in segs) == full
    assert [s.text for s in segs if s.trainable] == trainable
    assert tpl.render_text(CONV[:4], add_generation_prompt=True, tokenizer=tok) == gen
    assert tpl.missing_tokens(tok) == []

    ids, labels = encode_segments(tok, segs)
    assert len(ids) == len(labels)
    runs = token_runs(tok, ids, labels)
    assert "".join(text for text, _ in runs) == full
    assert [text for text, t in runs if t] == trainable  # token-exact: nothing else trains
    assert labels[ids.index(tok.convert_tokens_to_ids("<image>"))] == IGNORE_INDEX


def test_vicuna_token_mask_is_pinned(tok):
    ids, labels = encode_segments(tok, get_template("vicuna_v1").render(CONV))
    assert token_runs(tok, ids, labels) == [
        (f"<s>Answer briefly. USER: {Q1} ASSISTANT:", False),
        (" It is red.</s>", True),
        ("USER: Where is it? ASSISTANT:", False),
        (" Top left.</s>", True),
    ]


def test_plain_caption_pair(tok):
    conv = [Message("user", "<image>\nDescribe the image."), Message("assistant", "A red circle.")]
    plain = get_template("plain")
    assert plain.render(conv, tokenizer=tok) == [
        Segment("<s><image>", False), Segment("A red circle.\n", True),
    ]
    assert plain.render_text(conv) == "<image>A red circle.\n"  # no tokenizer: no BOS
    assert plain.render_text(conv[:1], add_generation_prompt=True, tokenizer=tok) == "<s><image>"
    assert plain.stop_strings == ("\n",)


def test_system_prompt_precedence():
    conv = [Message("user", "Hi"), Message("assistant", "Hello")]
    vic = get_template("vicuna_v1")
    assert vic.render_text(conv) == (
        "<s>A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions. USER: Hi ASSISTANT: Hello</s>"
    )
    assert vic.render_text(conv, system="") == "<s>USER: Hi ASSISTANT: Hello</s>"
    assert vic.render_text(conv, system="Be kind.") == "<s>Be kind. USER: Hi ASSISTANT: Hello</s>"
    with_msg = [Message("system", "From data."), *conv]
    assert vic.render_text(with_msg, system="Ignored.") == "<s>From data. USER: Hi ASSISTANT: Hello</s>"
    assert get_template("chatml").render_text(conv) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    )
    assert get_template("chatml_direct").render_text(conv).startswith(
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n"
    )
    assert get_template("llama_3").render_text(conv).startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language "
        "and vision assistant."
    )


# ------------------------------------------------------------------ jinja


def with_template(tok, source):
    t = copy.deepcopy(tok)
    t.chat_template = source
    return t


def test_jinja_chatml_matches_builtin(tok):
    t = with_template(tok, CHATML_JINJA)
    jinja, chatml = get_template("jinja"), get_template("chatml")
    assert jinja.render(CONV, tokenizer=t) == chatml.render(CONV)
    assert jinja.render(CONV[:4], True, tokenizer=t) == chatml.render(CONV[:4], True)
    conv = CONV[1:3]
    assert jinja.render(conv, system="Be brief.", tokenizer=t) == chatml.render(conv, system="Be brief.")
    ids, labels = encode_segments(t, jinja.render(CONV, tokenizer=t))
    assert (ids, labels) == encode_segments(t, chatml.render(CONV))


def test_jinja_llama3_style_uses_bos_token(tok):
    t = with_template(tok, LLAMA3_JINJA)
    segs = get_template("jinja").render(CONV, tokenizer=t)
    assert segs[0] == Segment(
        "<s><|start_header_id|>system<|end_header_id|>\n\nAnswer briefly.<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{Q1}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n", False,
    )
    assert [s.text for s in segs if s.trainable] == ["It is red.<|eot_id|>", "Top left.<|eot_id|>"]


def test_jinja_without_prefix_property_errors(tok):
    marks_last = (
        "{% for m in messages %}{% if loop.last %}[LAST]{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    with pytest.raises(ConfigError, match="cannot be used for loss masking.*use a named template"):
        get_template("jinja").render(CONV, tokenizer=with_template(tok, marks_last))
    wrong_header = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    with pytest.raises(ConfigError, match="cannot be used for loss masking"):
        get_template("jinja").render(CONV, tokenizer=with_template(tok, wrong_header))


def test_jinja_errors(tok):
    jinja = get_template("jinja")
    with pytest.raises(ConfigError, match="the tokenizer has no chat_template; set tokenizer.chat_template"):
        jinja.render(CONV, tokenizer=tok)
    with pytest.raises(ConfigError, match="pass tokenizer="):
        jinja.render(CONV)
    with pytest.raises(ConfigError, match="not valid Jinja"):
        jinja.render(CONV, tokenizer=with_template(tok, "{% for m in messages %}"))
    strict = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    with pytest.raises(DataError, match="chat_template rejected the conversation: System role not supported"):
        jinja.render(CONV, tokenizer=with_template(tok, strict))


# ------------------------------------------------------------------ images and truncation


def test_image_expansion_per_image_counts(tok):
    segs = [Segment("<s>USER: <image>\n<image>\nCompare the two images. ASSISTANT:", False),
            Segment(" They are the same.</s>", True)]
    img = tok.convert_tokens_to_ids("<image>")
    base_ids, base_labels = encode_segments(tok, segs)
    ids, labels = encode_segments(tok, segs, tokens_per_image=[3, 5])
    p, q = base_ids.index(img), len(base_ids) - 1 - base_ids[::-1].index(img)
    expected = base_ids[:p] + [img] * 3 + base_ids[p + 1:q] + [img] * 5 + base_ids[q + 1:]
    assert ids == expected
    assert len(ids) == len(base_ids) + 6
    assert [i for i, t in enumerate(ids) if t == img] == [*range(p, p + 3), *range(q + 2, q + 7)]
    assert all(labels[i] == IGNORE_INDEX for i, t in enumerate(ids) if t == img)
    assert [x for x in labels if x != IGNORE_INDEX] == [x for x in base_labels if x != IGNORE_INDEX]
    assert encode_segments(tok, segs, tokens_per_image=4)[0].count(img) == 8


def test_image_count_and_token_errors(tok):
    segs = [Segment("<s><image><image>", False), Segment("Two.\n", True)]
    with pytest.raises(DataError, match="the prompt has 2 <image> placeholders but tokens_per_image lists 3 counts"):
        encode_segments(tok, segs, tokens_per_image=[1, 2, 3])
    with pytest.raises(ConfigError, match="'<img>' is not a single token of this tokenizer; add it with"):
        encode_segments(tok, [Segment("<img>", False)], image_token="<img>")
    assert count_images(CONV) == 1
    assert count_images([Message("user", "<image><image>\nx")]) == 2


def test_truncation_never_splits_images(tok):
    segs = [Segment("<s>USER: <image>\nDescribe. ASSISTANT:", False),
            Segment(" A small blue square at the bottom right.</s>", True)]
    img = tok.convert_tokens_to_ids("<image>")
    full_ids, full_labels = encode_segments(tok, segs, tokens_per_image=5)
    start = full_ids.index(img)
    end = start + 5
    ids, labels = encode_segments(tok, segs, tokens_per_image=5, max_length=end + 2)
    assert ids == full_ids[:end + 2] and labels == full_labels[:end + 2]
    assert encode_segments(tok, segs, tokens_per_image=5, max_length=end)[0] == full_ids[:end]
    for cut in (end - 1, start + 1, start):  # inside the run, or before the image
        with pytest.raises(DataError, match=f"needs {end} tokens to keep its 1 image\\(s\\) whole but max_length is {cut}"):
            encode_segments(tok, segs, tokens_per_image=5, max_length=cut)
    assert encode_segments(tok, segs, tokens_per_image=5, max_length=10_000) == (full_ids, full_labels)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(("messages", "message"), [
    ([], "the conversation is empty"),
    ([Message("assistant", "Hi")], "message 0 has role 'assistant' but 'user' was expected: a conversation must alternate"),
    ([Message("user", "a"), Message("user", "b")], "message 1 has role 'user' but 'assistant' was expected"),
    ([Message("system", "s"), Message("assistant", "a")], "message 1 has role 'assistant' but 'user' was expected"),
    ([Message("user", "a"), Message("assistant", "b"), Message("system", "c")],
     "message 2 has role 'system'; only the first message may be a system message"),
    ([Message("user", "a"), Message("bot", "b")],  # type: ignore[arg-type]
     "message 1 has unknown role 'bot'; expected 'system', 'user' or 'assistant'"),
    ([Message("system", "s")], "the conversation has a system message but no user message"),
])
def test_bad_roles(messages, message):
    for name in ("vicuna_v1", "chatml"):
        with pytest.raises(DataError) as err:
            get_template(name).render(messages)
        assert message in str(err.value)


def test_generation_prompt_needs_user_turn():
    with pytest.raises(DataError, match="add_generation_prompt=True needs a conversation that ends with a user message"):
        get_template("gemma").render(CONV, add_generation_prompt=True)


def test_unknown_template_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        get_template("vicuna")
    assert str(err.value) == (
        "unknown chat template 'vicuna'; valid: chatml, chatml_direct, gemma, jinja, llama_3, "
        "mistral_instruct, plain, vicuna_v1"
    )


def test_missing_template_tokens_reported():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")), unk_token="<unk>",
    )
    assert get_template("chatml").missing_tokens(bare) == ["<|im_start|>", "<|im_end|>"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_to_jinja_renders_like_the_template(tok, name):
    """Exported chat_template (HF checkpoints) == the named template, labels included."""
    tpl, jinja = get_template(name), get_template("jinja")
    t = with_template(tok, tpl.to_jinja())
    no_system = CONV[1:]
    assert jinja.render(CONV, tokenizer=t) == tpl.render(CONV, tokenizer=tok)
    assert jinja.render(no_system, tokenizer=t) == tpl.render(no_system, tokenizer=tok)  # default system
    assert jinja.render(no_system, system="Be kind.", tokenizer=t) == tpl.render(no_system, system="Be kind.", tokenizer=tok)
    assert jinja.render(CONV[:4], True, tokenizer=t) == tpl.render(CONV[:4], True, tokenizer=tok)
    with pytest.raises(ConfigError, match="template 'jinja' has no Jinja form"):
        jinja.to_jinja()
