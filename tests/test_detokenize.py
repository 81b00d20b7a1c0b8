"""Streaming detokenization: no broken characters in any delta, deltas add up to the one-shot decode,
and the work per token stays bounded."""

from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.detokenize import StreamDetokenizer

SHIPPED = Path(__file__).resolve().parents[1] / "engine" / "data" / "gpt2_tokenizer.json"

TEXTS = [
    "Hello world! 😀 Emoji at the end 🎉",
    "混合文本：中文和English，还有表情👨‍👩‍👧‍👦以及日本語のテキスト。",
    "café naïve — “quotes” 🇫🇷 flags and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math letters",
    "😀😀😀🙈🙉🙊 consecutive emoji, then ASCII",
]


def byte_level_bpe() -> Tokenizer:
    """A tiny GPT-2-style byte-level BPE trained here, so the test needs no files.

    A small vocabulary keeps most multibyte characters unmerged: an emoji is then 2-4 tokens.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    corpus = ["the quick brown fox jumps over the lazy dog", "中文文本 中文 你好世界", "😀 smile 😀 😀",
              "English and 日本語 mixed"] * 20
    tok.train_from_iterator(corpus, trainer)
    return tok


def stream(tok, ids) -> list[str]:
    detok = StreamDetokenizer(tok)
    return [detok.push(i) for i in ids] + [detok.flush()]


def check_streams(tok: Tokenizer) -> int:
    """Stream every text token by token; return how many tokens alone decode to a broken character."""
    split_tokens = 0
    for text in TEXTS:
        ids = tok.encode(text).ids
        deltas = stream(tok, ids)
        assert all("\ufffd" not in d for d in deltas), deltas
        assert "".join(deltas) == tok.decode(ids) == text
        assert deltas[-1] == ""  # everything was emitted as soon as it was complete
        split_tokens += sum("\ufffd" in tok.decode([i]) for i in ids)
    return split_tokens


def test_trained_byte_level_bpe_never_emits_broken_characters():
    tok = byte_level_bpe()
    # The texts do split characters across tokens, so a per-token decode would be wrong: the test
    # cannot pass vacuously.
    assert check_streams(tok) > 10


@pytest.mark.skipif(not SHIPPED.exists(), reason=f"{SHIPPED} not built yet")
def test_shipped_gpt2_tokenizer_never_emits_broken_characters():
    tok = Tokenizer.from_file(str(SHIPPED))
    assert check_streams(tok) > 10


def byte_token(tok: Tokenizer, byte: int) -> int:
    """The id of a single-byte token. Byte-level BPE spells bytes with GPT-2's bytes_to_unicode map:
    printable latin-1 stands for itself, the other bytes are chr(256 + n) in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    char = chr(byte) if byte in printable else chr(256 + others.index(byte))
    return tok.token_to_id(char)


def test_incomplete_character_is_held_then_flushed():
    tok = byte_level_bpe()
    emoji = "🙈".encode()  # 4 bytes, not in the training corpus: one token per byte
    ids = tok.encode("ok ").ids + [byte_token(tok, b) for b in emoji[:3]]
    detok = StreamDetokenizer(tok)
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) == "ok " and deltas[-3:] == ["", "", ""]
    assert detok.flush() == "\ufffd"  # the row ended mid-character: say so, once


def test_invalid_byte_mid_stream_is_emitted_when_text_continues():
    # A lone continuation byte can never complete; once valid text follows, it is released, matching
    # the one-shot decode (which also shows U+FFFD there).
    tok = byte_level_bpe()
    ids = [byte_token(tok, 0x80)] + tok.encode("fox 😀").ids
    deltas = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == "\ufffdfox 😀"


def test_special_tokens_follow_skip_special_tokens():
    tok = byte_level_bpe()
    eos = tok.token_to_id("<|endoftext|>")
    ids = tok.encode("the fox").ids + [eos] + tok.encode(" 中文").ids
    assert "".join(stream(tok, ids)) == tok.decode(ids) == "the fox 中文"
    detok = StreamDetokenizer(tok, skip_special_tokens=False)
    text = "".join([detok.push(i) for i in ids] + [detok.flush()])
    assert text == tok.decode(ids, skip_special_tokens=False) == "the fox<|endoftext|> 中文"


def test_work_per_token_is_bounded():
    """Each push decodes a small window, not the whole sequence: total ids decoded grow linearly."""
    tok = byte_level_bpe()

    class Counting:
        decoded = 0

        def decode(self, ids, skip_special_tokens=True):
            Counting.decoded += len(ids)
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tok.encode(" ".join(TEXTS) * 20).ids
    deltas = stream(Counting(), ids)
    assert "".join(deltas) == tok.decode(ids)
    assert len(ids) > 2000
    assert Counting.decoded < 10 * len(ids)  # a whole-sequence re-decode would be ~len(ids)^2 / 2
