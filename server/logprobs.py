"""OpenAI's legacy `logprobs` object: `tokens`, `token_logprobs`, `top_logprobs`, `text_offset`.

Token strings: each token's own text when its bytes are whole UTF-8, else OpenAI's `bytes:\\xNN` form
(GPT-2 is byte-level: one character may span two tokens, and neither half decodes alone). Offsets are
character offsets into the choice's `text` (with echo, the prompt is the start of that text), counted
from the tokens' bytes: a token that ends inside a character is placed at that character's start.

`top_logprobs` holds the `logprobs` most likely tokens at each position plus the chosen one (so up to
logprobs + 1 entries, as OpenAI documents). Values are log-softmax of the model's raw logits (before
temperature, top-k/top-p and penalties), as vLLM reports by default; -inf is sent as -9999.0 (JSON has
no infinity).
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Sequence

import numpy as np

from engine.sampling import sequence_logprobs

NEG_INF_LOGPROB = -9999.0


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the vocabulary is written in these characters)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_OF = {c: b for b, c in _bytes_to_unicode().items()}


class TokenText:
    """Token id -> its bytes and its display string (memoized; shared by every request)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._strings: dict[int, str] = {}
        self._bytes: dict[int, bytes] = {}

    def bytes(self, token_id: int) -> bytes:
        b = self._bytes.get(token_id)
        if b is None:
            piece = self.tokenizer.id_to_token(token_id) or ""
            if all(ch in _BYTE_OF for ch in piece):
                b = bytes(_BYTE_OF[ch] for ch in piece)
            else:  # an added token written in plain text
                b = piece.encode("utf-8")
            self._bytes[token_id] = b
        return b

    def string(self, token_id: int) -> str:
        s = self._strings.get(token_id)
        if s is None:
            b = self.bytes(token_id)
            try:
                s = b.decode("utf-8")
            except UnicodeDecodeError:
                s = "bytes:" + "".join(f"\\x{x:02x}" for x in b)
            self._strings[token_id] = s
        return s


def _lp(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return NEG_INF_LOGPROB if math.isinf(x) and x < 0 else x


class LogprobsBuilder:
    """Accumulates one choice's logprobs; `take()` returns the part added since the last take (a stream chunk)."""

    def __init__(self, table: TokenText, start_offset: int = 0):
        self.table = table
        self.offset = start_offset
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._parts: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, token_id: int, logprob: float | None, top: Sequence[tuple[int, float]] | None) -> None:
        p = self._parts
        p["tokens"].append(self.table.string(token_id))
        p["token_logprobs"].append(_lp(logprob))
        if logprob is None:
            p["top_logprobs"].append(None)
        else:
            d = {self.table.string(t): _lp(v) for t, v in top or ()}
            d.setdefault(self.table.string(token_id), _lp(logprob))
            p["top_logprobs"].append(d)
        p["text_offset"].append(self.offset)
        self.offset += len(self._decoder.decode(self.table.bytes(token_id)))

    def add_engine(self, token_logprobs) -> None:
        """Engine TokenLogprob objects (token_id, logprob, top)."""
        for t in token_logprobs or ():
            self.add(int(t.token_id), t.logprob, t.top)

    def take(self) -> dict:
        out = self._parts
        self._parts = {k: [] for k in out}
        return out


def merge(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a}


def prompt_logprobs(logits: np.ndarray, ids: Sequence[int], k: int) -> list[tuple[int, float | None, list]]:
    """(token, logprob, top-k) for every prompt token from teacher-forced logits (T, V); the first token
    has no logprob (nothing predicts it), as OpenAI reports. Vectorised over (T, V) by the engine's
    `sequence_logprobs` (1023 tokens, logprobs 1: 0.1-0.2 s on 2 cores; a loop over the positions took ~2 s)."""
    ids = list(ids)
    out: list[tuple[int, float | None, list]] = [(ids[0], None, [])]
    if len(ids) < 2:
        return out
    nxt = np.asarray(ids[1:], np.int64)                                  # (T-1,): row t predicts ids[t+1]
    lp, top_ids, top_lp = sequence_logprobs(logits[:-1], nxt, k)         # (T-1,), (T-1, k), (T-1, k)
    tops = [list(zip(i, v)) for i, v in zip(top_ids.tolist(), top_lp.tolist())]
    out.extend(zip(nxt.tolist(), lp.tolist(), tops))
    return out
