"""The shipped GPT-2 tokenizer against tiktoken built from the same ranks file, and the file lookup order.

tiktoken is the reference: it reads GPT-2's ranks file directly, so agreeing with it token for token
shows the rebuilt merges, the regex split and the byte mapping are all GPT-2's.
"""

from __future__ import annotations

import hashlib
import json
import random

import pytest
from tokenizers import Tokenizer, models

from export.tokenizer import (
    DEFAULT_RANKS,
    ENDOFTEXT,
    ENDOFTEXT_ID,
    MERGES_SHA256_PREFIX,
    SHIPPED_TOKENIZER,
    VOCAB_SHA256_PREFIX,
    build_gpt2_tokenizer,
    load_shipped_tokenizer,
    merges_txt,
    rebuild_vocab_and_merges,
    tokenizer_for_checkpoint,
    vocab_json,
)

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

SAMPLES = [
    "Hello world! 中文 😀   x",
    "The quick brown fox jumps over the lazy dog. It's what they'd've wanted, isn't it?",
    "GPT-2 is a large transformer-based language model with 1.5 billion parameters.",
    "机器学习是人工智能的一个分支。深度学习模型需要大量数据。",
    "日本語のテキストと한국어 텍스트",
    "😀😃😄😁 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷 👍🏽",
    "   leading spaces",
    "trailing spaces   ",
    "tabs\there\t\tand\t\t\tthere\t",
    "new\nlines\n\n\nand\r\nCRLF\r\n",
    "mixed \t \n \n\t  whitespace  \n  ",
    " ",
    "\n",
    "",
    "def f(x):\n    if x > 0:\n        return x ** 2  # square\n    return -x\n\n\nprint(f(3))\n",
    "class A:\n\tdef __init__(self):\n\t\tself.d = {'k': [1, 2, 3]}\n",
    "café naïve résumé Ångström façade Übermaß São Paulo",
    "e\u0301 (combining acute) vs é (precomposed); Ελληνικά, русский, עברית, العربية, हिन्दी",
    "0 1 12 123 1234 12345 3.14159 -42 1e-10 1,000,000 0x1F ٣٤٥ ⅷ",
    "URLs: https://example.com/path?q=1&r=two#frag, emails: a.b@c.org",
    "I'M SHOUTING 'S 'T 'RE 'VE 'M 'LL 'D and 's 't 're 've 'm 'll 'd",
    "\x00\x01\x7f\u00a0\u2028\u200b\ufeff control and invisible chars",
]


def random_strings(n: int, seed: int = 0) -> list[str]:
    """Seeded strings mixing ASCII, whitespace, Latin-1, CJK, emoji and any non-surrogate code point,
    plus random bytes read as Latin-1 and as lossy UTF-8."""
    rng = random.Random(seed)
    pools = [
        [chr(c) for c in range(32, 127)],
        list(" \t\n\r\x0b\x0c\u00a0\u3000"),
        [chr(c) for c in range(0xA0, 0x250)],
        [chr(c) for c in range(0x4E00, 0x4E80)],
        [chr(c) for c in range(0x1F600, 0x1F650)],
        list("'sdtmlrev"),
    ]
    out = []
    for i in range(n):
        length = rng.randint(1, 40)
        if i % 5 == 3:
            out.append(bytes(rng.randrange(256) for _ in range(length)).decode("latin-1"))
        elif i % 5 == 4:
            out.append(bytes(rng.randrange(256) for _ in range(length)).decode("utf-8", errors="replace"))
        elif i % 5 == 2:
            chars = []
            while len(chars) < length:
                c = rng.randrange(0x110000)
                if not 0xD800 <= c < 0xE000:
                    chars.append(chr(c))
            out.append("".join(chars))
        else:
            out.append("".join(rng.choice(rng.choice(pools)) for _ in range(length)))
    return out


@pytest.fixture(scope="module")
def reference():
    pytest.importorskip("tiktoken")
    import tiktoken.load
    return tiktoken.Encoding(
        name="gpt2_local",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=tiktoken.load.load_tiktoken_bpe(str(DEFAULT_RANKS)),
        special_tokens={ENDOFTEXT: ENDOFTEXT_ID},
    )


@pytest.fixture(scope="module")
def shipped():
    return load_shipped_tokenizer()


@pytest.fixture(scope="module")
def rebuilt():
    return rebuild_vocab_and_merges(DEFAULT_RANKS)


def test_known_ids(shipped):
    # From export/data/README.md; needs no ranks file.
    assert shipped.encode("Hello world! 中文 😀   x").ids == [
        15496, 995, 0, 220, 40792, 23877, 229, 30325, 222, 220, 220, 2124
    ]
    assert shipped.encode("Hello world" + ENDOFTEXT).ids == [15496, 995, ENDOFTEXT_ID]
    assert shipped.get_vocab_size() == ENDOFTEXT_ID + 1


@pytest.mark.parametrize("text", SAMPLES + random_strings(300), ids=lambda t: repr(t)[:40])
def test_matches_tiktoken(shipped, reference, text):
    ids = shipped.encode(text).ids
    assert ids == reference.encode_ordinary(text)
    assert shipped.decode(ids, skip_special_tokens=False) == text


def test_special_token_matches_tiktoken(shipped, reference):
    text = f"{ENDOFTEXT}first document{ENDOFTEXT}\n\nsecond {ENDOFTEXT}"
    ids = shipped.encode(text).ids
    assert ids == reference.encode(text, allowed_special="all")
    assert shipped.decode(ids, skip_special_tokens=False) == text


def test_every_token_decodes_like_tiktoken(shipped, reference):
    # Single tokens include partial UTF-8 sequences: both sides must replace them the same way.
    ids = [[i] for i in range(ENDOFTEXT_ID + 1)]
    assert shipped.decode_batch(ids, skip_special_tokens=False) == [reference.decode(i) for i in ids]


def test_rebuild_reproduces_gpt2_files(rebuilt):
    vocab, merges = rebuilt
    assert hashlib.sha256(vocab_json(vocab).encode()).hexdigest().startswith(VOCAB_SHA256_PREFIX)
    assert hashlib.sha256(merges_txt(merges).encode()).hexdigest().startswith(MERGES_SHA256_PREFIX)


def test_shipped_file_matches_fresh_build():
    fresh = json.loads(build_gpt2_tokenizer(DEFAULT_RANKS).to_str())
    assert json.loads(SHIPPED_TOKENIZER.read_text(encoding="utf-8")) == fresh, (
        "engine/data/gpt2_tokenizer.json is stale: run `python -m export.tokenizer`"
    )


def test_matches_transformers_from_rebuilt_files(rebuilt, shipped, tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab, merges = rebuilt
    (tmp_path / "vocab.json").write_text(vocab_json(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text(merges_txt(merges), encoding="utf-8")
    # from_pretrained, as for a real checkpoint: transformers 5 silently ignores vocab_file/merges_file
    # keyword arguments to the constructor and builds an empty vocabulary.
    hf = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path))
    for text in SAMPLES + [f"a{ENDOFTEXT}b"]:
        assert hf(text)["input_ids"] == shipped.encode(text).ids


def _tiny_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    # "ab" is one token here and two in GPT-2, so the result shows which files were read.
    return {"a": 0, "b": 1, "ab": 2}, [("a", "b")]


def test_checkpoint_tokenizer_json_wins(tmp_path):
    vocab, merges = _tiny_bpe()
    Tokenizer(models.BPE(vocab=vocab, merges=merges)).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    assert tokenizer_for_checkpoint(tmp_path).encode("ab").ids == [2]


def test_checkpoint_vocab_and_merges(tmp_path):
    vocab, merges = _tiny_bpe()
    (tmp_path / "vocab.json").write_text(vocab_json(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text(merges_txt(merges), encoding="utf-8")
    assert tokenizer_for_checkpoint(tmp_path).encode("ab").ids == [2]


def test_checkpoint_gpt2_vocab_and_merges_equal_shipped(rebuilt, shipped, tmp_path):
    vocab, merges = rebuilt
    (tmp_path / "vocab.json").write_text(vocab_json(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text(merges_txt(merges), encoding="utf-8")
    from_files = tokenizer_for_checkpoint(tmp_path)
    for text in SAMPLES + [f"a{ENDOFTEXT}b"]:
        assert from_files.encode(text).ids == shipped.encode(text).ids


def test_no_checkpoint_files_falls_back_to_shipped(tmp_path, shipped):
    assert tokenizer_for_checkpoint(tmp_path).to_str() == shipped.to_str()
    assert tokenizer_for_checkpoint(None).to_str() == shipped.to_str()


def test_the_ranks_file_ships_in_the_repo_byte_identical_to_openais():
    """export/data/gpt2.tiktoken: tiktoken's pinned sha256 for r50k_base (origin: export/data/README.md)."""
    import hashlib
    assert DEFAULT_RANKS.is_file(), DEFAULT_RANKS
    assert hashlib.sha256(DEFAULT_RANKS.read_bytes()).hexdigest() == \
        "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
