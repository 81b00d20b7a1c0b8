"""GPT-2's tokenizer, rebuilt from its exact BPE ranks file and shipped with the package.

`python -m export.tokenizer` turns GPT-2's ranks file (`base64(token) rank` per line, rank = token id)
into GPT-2's vocab.json and merges.txt, builds a Hugging Face `tokenizers` byte-level BPE tokenizer
from them, and writes it to `engine/data/gpt2_tokenizer.json`. The engine then tokenizes GPT-2 text
with no download; a checkpoint's own tokenizer files still take precedence (`tokenizer_for_checkpoint`).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

import engine

ENDOFTEXT = "<|endoftext|>"
ENDOFTEXT_ID = 50256
N_MERGES = 50_000  # 50,256 ranks - 256 single bytes
# sha256 prefixes of GPT-2's original encoder.json (vocab.json) and vocab.bpe (merges.txt).
VOCAB_SHA256_PREFIX = "196139668be6"
MERGES_SHA256_PREFIX = "1ce1664773c5"
SHIPPED_TOKENIZER = Path(engine.__file__).resolve().parent / "data" / "gpt2_tokenizer.json"
DEFAULT_RANKS = Path(__file__).resolve().parent / "data" / "gpt2.tiktoken"  # origin + licence: data/README.md


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes map to themselves, the rest
    (control bytes, space, ...) to code points from 256 up, so every token is a visible string."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_order, chars = printable[:], printable[:]
    for b in range(256):
        if b not in printable:
            byte_order.append(b)
            chars.append(256 + len(chars) - len(printable))
    return {b: chr(c) for b, c in zip(byte_order, chars)}


def load_ranks(ranks_path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in Path(ranks_path).read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _bpe_parts(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """Run BPE over `token`'s bytes using only merges ranked below `max_rank`."""
    parts = [bytes([b]) for b in token]
    while True:
        best_i, best_rank = None, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_i, best_rank = i, rank
        if best_i is None:
            return parts
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]


def rebuild_vocab_and_merges(ranks_path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """GPT-2's vocab.json (with `<|endoftext|>`) and merges.txt, in id / rank order.

    A token of rank r is the merge of the two parts that BPE leaves when it may only use ranks < r:
    the merge that creates it is exactly the one ranked r.
    """
    ranks = load_ranks(ranks_path)
    byte_char = bytes_to_unicode()

    def as_str(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    vocab, merges = {}, []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[as_str(token)] = rank
        if len(token) > 1:
            parts = _bpe_parts(token, ranks, rank)
            if len(parts) != 2:
                raise ValueError(f"token {token!r} (rank {rank}) leaves {len(parts)} BPE parts, expected 2")
            merges.append((as_str(parts[0]), as_str(parts[1])))
    vocab[ENDOFTEXT] = ENDOFTEXT_ID
    if len(vocab) != ENDOFTEXT_ID + 1 or len(merges) != N_MERGES:
        raise ValueError(f"rebuilt {len(vocab)} tokens and {len(merges)} merges, expected 50257 and 50000")
    return vocab, merges


def vocab_json(vocab: dict[str, int]) -> str:
    """vocab.json serialized the way GPT-2's original encoder.json is (its sha256 starts 196139668be6)."""
    return json.dumps(vocab)


def merges_txt(merges: list[tuple[str, str]]) -> str:
    """merges.txt serialized the way GPT-2's original vocab.bpe is (its sha256 starts 1ce1664773c5)."""
    return "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)


def _byte_level_bpe(bpe: models.BPE) -> Tokenizer:
    """GPT-2's pipeline around a BPE model: GPT-2's regex split with no prefix space, bytes mapped to
    printable characters, and `<|endoftext|>` matched as a special token before any of that."""
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    # Offsets only: ids are unchanged. trim_offsets=False keeps offsets on the raw text, as GPT-2's does.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    if tokenizer.token_to_id(ENDOFTEXT) is not None:
        tokenizer.add_special_tokens([AddedToken(ENDOFTEXT, special=True, normalized=False)])
    return tokenizer


def build_gpt2_tokenizer(ranks_path: Path) -> Tokenizer:
    vocab, merges = rebuild_vocab_and_merges(ranks_path)
    tokenizer = _byte_level_bpe(models.BPE(vocab=vocab, merges=merges))
    assert tokenizer.token_to_id(ENDOFTEXT) == ENDOFTEXT_ID
    return tokenizer


def load_shipped_tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(SHIPPED_TOKENIZER))


def tokenizer_for_checkpoint(checkpoint_dir: Path | None) -> Tokenizer:
    """The checkpoint's own tokenizer (tokenizer.json, else vocab.json + merges.txt), else GPT-2's."""
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir)
        if (checkpoint_dir / "tokenizer.json").is_file():
            return Tokenizer.from_file(str(checkpoint_dir / "tokenizer.json"))
        vocab, merges = checkpoint_dir / "vocab.json", checkpoint_dir / "merges.txt"
        if vocab.is_file() and merges.is_file():
            return _byte_level_bpe(models.BPE.from_file(str(vocab), str(merges)))
    return load_shipped_tokenizer()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m export.tokenizer", description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=Path, default=DEFAULT_RANKS, help=f"GPT-2 ranks file (default {DEFAULT_RANKS})")
    parser.add_argument("--out", type=Path, default=SHIPPED_TOKENIZER, help=f"tokenizer.json to write (default {SHIPPED_TOKENIZER})")
    args = parser.parse_args(argv)
    if not args.ranks.is_file():
        parser.error(f"ranks file not found: {args.ranks} (GPT-2's gpt2.tiktoken, see export/data/README.md)")

    vocab, merges = rebuild_vocab_and_merges(args.ranks)
    # The rebuild is exact only if it reproduces GPT-2's original files byte for byte.
    for name, text, expected in (
        ("vocab.json", vocab_json(vocab), VOCAB_SHA256_PREFIX),
        ("merges.txt", merges_txt(merges), MERGES_SHA256_PREFIX),
    ):
        digest = hashlib.sha256(text.encode()).hexdigest()
        if not digest.startswith(expected):
            sys.exit(f"rebuilt {name} has sha256 {digest[:12]}, GPT-2's original starts {expected}")
    tokenizer = build_gpt2_tokenizer(args.ranks)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out), pretty=False)
    print(f"wrote {args.out}: {tokenizer.get_vocab_size()} tokens, {len(merges)} merges "
          f"(vocab.json and merges.txt match GPT-2's original hashes)")


if __name__ == "__main__":
    main()
