"""Decoding: KV cache == recomputation, batched == one-by-one, stop strings, token limits,
seeded sampling, top-p."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from minigem.errors import MinigemError
from minigem.generation.decode import GenerationConfig, generate, left_pad

N_NEW = 12


def _img(color) -> Image.Image:
    return Image.new("RGB", (20, 14), color)


# (images, question): different lengths, 0-2 images, so the batch needs left padding
REQUESTS = [
    ([_img((255, 0, 0))], "What color is the circle?"),
    ([], "How many objects are there?"),
    ([_img((0, 0, 255)), _img((0, 180, 0))], "<image> and <image>: is there a green square at the top left?"),
    ([_img((250, 220, 0))], "Where?"),
]


def _prompts(model, requests=REQUESTS):
    prompts, images = [], []
    for imgs, q in requests:
        prompts.append(model.encode_prompt(model.user_messages(q, len(imgs)), len(imgs)))
        images += imgs
    pix = model.processor(images)["pixel_values"]
    return prompts, pix


def _split_pix(requests, pix):
    out, k = [], 0
    for imgs, _ in requests:
        out.append(pix[k : k + len(imgs)] if imgs else None)
        k += len(imgs)
    return out


def _gen(model, prompts, pix, **kw):
    return generate(model, prompts, pix, None, GenerationConfig(**kw))


@torch.no_grad()
def _naive_greedy(model, prompt: list[int], pix, n: int) -> list[int]:
    """Recompute the whole sequence every step: no cache, no padding."""
    ids = list(prompt)
    eos = model.tokenizer.eos_token_id
    out: list[int] = []
    for _ in range(n):
        logits = model(torch.tensor([ids]), pixel_values=pix).logits[0, -1]
        t = int(logits.argmax())
        if t == eos:
            break
        out.append(t)
        ids.append(t)
    return out


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_kv_cache_matches_recomputation(tiny_model):
    prompts, pix = _prompts(tiny_model)
    n_tokens = 0
    for prompt, p, req in zip(prompts, _split_pix(REQUESTS, pix), REQUESTS, strict=True):
        got = _gen(tiny_model, [prompt], p, max_new_tokens=N_NEW)[0]
        want = _naive_greedy(tiny_model, prompt, p, N_NEW)
        assert got.token_ids == want, req[1]
        assert got.prompt_tokens == len(prompt)
        assert got.text == tiny_model.tokenizer.decode(want, skip_special_tokens=True)
        n_tokens += len(want)
    assert n_tokens > 2 * N_NEW  # long enough continuations to mean something


def test_batched_equals_one_by_one(tiny_model):
    prompts, pix = _prompts(tiny_model)
    assert len({len(p) for p in prompts}) == len(prompts)  # all lengths differ: real padding
    batched = _gen(tiny_model, prompts, pix, max_new_tokens=N_NEW)
    single = [_gen(tiny_model, [pr], p, max_new_tokens=N_NEW)[0]
              for pr, p in zip(prompts, _split_pix(REQUESTS, pix), strict=True)]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.finish_reason for g in batched] == [g.finish_reason for g in single]
    # and through the public API
    texts = tiny_model.chat_batch(REQUESTS, max_new_tokens=N_NEW)
    assert texts == [tiny_model.chat(imgs, q, max_new_tokens=N_NEW) for imgs, q in REQUESTS]


def test_max_new_tokens(tiny_model):
    prompts, pix = _prompts(tiny_model)
    long = _gen(tiny_model, prompts, pix, max_new_tokens=N_NEW)
    assert all(len(g.token_ids) <= N_NEW for g in long)
    assert any(g.finish_reason == "length" and len(g.token_ids) == N_NEW for g in long)
    short = _gen(tiny_model, prompts, pix, max_new_tokens=3)
    assert all(len(g.token_ids) == min(3, len(lg.token_ids)) for g, lg in zip(short, long, strict=True))
    for g, lg in zip(short, long, strict=True):
        assert g.token_ids == lg.token_ids[:3]
        if len(lg.token_ids) >= 3:
            assert g.finish_reason == "length"
    one = _gen(tiny_model, prompts[:1], pix[:1], max_new_tokens=1)[0]
    assert len(one.token_ids) == 1


def test_eos_stops_and_is_not_emitted(tiny_model):
    prompts, pix = _prompts(tiny_model, REQUESTS[:1])
    tok = tiny_model.tokenizer
    free = _gen(tiny_model, prompts, pix, max_new_tokens=N_NEW)[0].token_ids
    cut = next(k for k in range(2, len(free)) if free[k] not in free[:k])  # first occurrence
    tok.eos_token = tok.convert_ids_to_tokens(free[cut])  # pretend that token ends the answer
    g = _gen(tiny_model, prompts, pix, max_new_tokens=N_NEW)[0]
    assert g.token_ids == free[:cut]
    assert g.finish_reason == "stop"


def test_stop_strings_truncate(tiny_model):
    prompts, pix = _prompts(tiny_model)
    free = _gen(tiny_model, prompts, pix, max_new_tokens=N_NEW)
    text = free[0].text
    assert len(text) >= 6, text
    stop = text[3:6]
    want = text[: text.index(stop)]
    got = _gen(tiny_model, prompts, pix, max_new_tokens=N_NEW, stop=(stop, "@@never@@"))
    assert got[0].text == want and got[0].finish_reason == "stop"
    assert stop not in got[0].text
    for g, f in zip(got[1:], free[1:], strict=True):  # other rows: cut at their own hit, if any
        expect = f.text[: f.text.index(stop)] if stop in f.text else f.text
        assert g.text == expect
    # a single string is accepted too, and chat() forwards it
    assert _gen(tiny_model, prompts[:1], pix[:1], max_new_tokens=N_NEW, stop=stop)[0].text == want
    imgs, q = REQUESTS[0]
    assert tiny_model.chat(imgs, q, max_new_tokens=N_NEW, stop=[stop]) == want.strip()  # chat strips


def test_earliest_stop_string_wins(tiny_model):
    """Two stop strings completed by the same token: cut at the one that starts first,
    whatever their order in the list."""
    prompts, pix = _prompts(tiny_model)
    per_row = _split_pix(REQUESTS, pix)
    tok = tiny_model.tokenizer

    def find_case():
        for row, g in enumerate(_gen(tiny_model, prompts, pix, max_new_tokens=N_NEW)):
            for k in range(len(g.token_ids)):
                a = len(tok.decode(g.token_ids[:k], skip_special_tokens=True))
                text = tok.decode(g.token_ids[: k + 1], skip_special_tokens=True)
                if len(text) - a >= 2 and text[a] not in text[:a] and text[a + 1] not in text[: a + 1]:
                    return row, text[a], text[a + 1], text[:a]
        return None

    case = find_case()
    assert case is not None  # some token adds two new characters at once
    row, first, second, want = case
    for stops in ((second, first), (first, second)):
        got = _gen(tiny_model, [prompts[row]], per_row[row], max_new_tokens=N_NEW, stop=stops)[0]
        assert got.text == want, stops
        assert got.finish_reason == "stop"


def test_callback_cancels_a_row(tiny_model):
    prompts, pix = _prompts(tiny_model)
    free = _gen(tiny_model, prompts, pix, max_new_tokens=N_NEW)
    seen: list[tuple[int, int]] = []

    def on_token(row, gen):
        seen.append((row, len(gen.token_ids)))
        return not (row == 0 and len(gen.token_ids) == 2)

    got = generate(tiny_model, prompts, pix, None, GenerationConfig(max_new_tokens=N_NEW), on_token)
    assert got[0].finish_reason == "cancelled" and got[0].token_ids == free[0].token_ids[:2]
    assert [g.token_ids for g in got[1:]] == [g.token_ids for g in free[1:]]
    assert (0, 3) not in seen


def test_seeded_sampling_is_reproducible(tiny_model):
    prompts, pix = _prompts(tiny_model)
    a = _gen(tiny_model, prompts, pix, max_new_tokens=8, temperature=1.5, seed=3)
    b = _gen(tiny_model, prompts, pix, max_new_tokens=8, temperature=1.5, seed=3)
    c = _gen(tiny_model, prompts, pix, max_new_tokens=8, temperature=1.5, seed=4)
    greedy = _gen(tiny_model, prompts, pix, max_new_tokens=8)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    assert [g.token_ids for g in a] != [g.token_ids for g in greedy]
    imgs, q = REQUESTS[0]
    kw = {"max_new_tokens": 8, "temperature": 1.5, "seed": 11}
    assert tiny_model.chat(imgs, q, **kw) == tiny_model.chat(imgs, q, **kw)


def test_tiny_top_p_is_greedy(tiny_model):
    prompts, pix = _prompts(tiny_model)
    greedy = _gen(tiny_model, prompts, pix, max_new_tokens=N_NEW)
    for seed in (0, 1):
        nucleus = _gen(tiny_model, prompts, pix, max_new_tokens=N_NEW, temperature=2.0,
                       top_p=1e-6, seed=seed)
        assert [g.token_ids for g in nucleus] == [g.token_ids for g in greedy]


@pytest.mark.parametrize("kw, message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
    ({"temperature": -0.5}, "temperature must be >= 0, got -0.5"),
    ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
    ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
])
def test_bad_generation_settings(kw, message):
    with pytest.raises(MinigemError) as err:
        GenerationConfig(**kw)
    assert str(err.value) == message


def test_no_deprecated_transformers_arguments(tiny_model):
    """The decode loops pass the KV cache under the name the installed transformers uses (`cache`
    from 5.24, where `past_key_values` warns and goes in 5.40): no FutureWarning from either loop."""
    import warnings

    from minigem.llm.backbone import cache_kwarg

    assert cache_kwarg(tiny_model.language_model) in ("cache", "past_key_values")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        one = tiny_model.chat(*REQUESTS[0], max_new_tokens=N_NEW)
        batch = tiny_model.chat_batch(REQUESTS[:2], max_new_tokens=N_NEW)
    assert batch[0] == one
