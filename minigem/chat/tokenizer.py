"""Train a small byte-level BPE tokenizer that knows every template marker; add special tokens.

Byte-level: spaces and newlines are ordinary symbols, so ``decode(encode(text)) == text``
for any text made of printable ASCII, tab, newline and the characters seen in training
(other characters map to ``<unk>`` unless ``full_byte_alphabet=True``).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from minigem.errors import ConfigError

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"

# Order fixes the ids: <unk>=0, <s>=1, </s>=2, <pad>=3, <image>=4, then the template markers.
SPECIAL_TOKENS: tuple[str, ...] = (
    UNK, BOS, EOS, PAD, "<image>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",  # llama_3
    "<|im_start|>", "<|im_end|>",  # chatml, chatml_direct
    "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>",  # gemma
)


def _ascii_alphabet(byte_level: pre_tokenizers.ByteLevel) -> list[str]:
    """Printable ASCII, tab and newline as the byte-level symbols BPE works on."""
    chars = [chr(b) for b in range(32, 127)] + ["\t", "\n"]
    return [byte_level.pre_tokenize_str(c)[0][0] for c in chars]


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 512,
    extra_special_tokens: Iterable[str] = (),
    full_byte_alphabet: bool = False,
    min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE over ``texts`` holding ``SPECIAL_TOKENS`` (+ extras).

    ``vocab_size`` counts special tokens and the alphabet (~97 ASCII symbols, or all 256
    bytes with ``full_byte_alphabet``); a small corpus may stop short of it. No BOS/EOS is
    added by ``encode``: templates write them into the text.
    """
    specials = list(dict.fromkeys([*SPECIAL_TOKENS, *extra_special_tokens]))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if full_byte_alphabet else _ascii_alphabet(byte_level)
    if vocab_size < len(specials) + len(alphabet):
        raise ConfigError(
            f"vocab_size {vocab_size} is below the {len(specials)} special tokens + "
            f"{len(alphabet)} alphabet symbols every tokenizer holds"
        )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
        initial_alphabet=sorted(alphabet), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        extra_special_tokens=[t for t in specials if t not in (BOS, EOS, PAD, UNK)],
        clean_up_tokenization_spaces=False,
    )


def ensure_special_tokens(tokenizer: PreTrainedTokenizerBase, tokens: Iterable[str]) -> int:
    """Register ``tokens`` as special (never split); return how many new ids the vocab gained.

    A non-zero return means the model's embedding matrix must be resized.
    """
    have = set(tokenizer.all_special_tokens)
    missing = [t for t in dict.fromkeys(tokens) if t not in have]
    if not missing:
        return 0
    before = len(tokenizer)
    tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    return len(tokenizer) - before
