"""Prefix caching: which row of the slot pool already holds the longest prefix of a new prompt, and
which free row gives up its content first. Pure: token ids and ticks in, decisions out; no backend,
no threads, no clock (the engine core, engine/core.py, makes the copies and passes the rows in).

GPT-2's positions are learned and absolute: a row's key and value at slot p are valid for the token at
position p given exactly the tokens before it, and nowhere else. What a row can give a new prompt is
therefore an exact prefix at the same positions, the longest common prefix of the two token sequences
(no shifting). A prefix that ends inside a multi-byte character is as good as any other: the cache
holds tokens, and the text of a prompt is never decoded again.

Where prefixes come from (`Row`):
  - live rows: requests running or prefilling. Slots [0, length) hold their prompt and the generated
    tokens fed so far; a prefilling row's prompt beyond `length` will be there after its next chunks.
    A new request copies the shared prefix into its own row: a memcpy of the filled slots (gpt2: 3.3 ms
    for 600 tokens on 2 cores) against ~1 ms per token to prefill them;
  - held rows: a finished request's row, kept while its slot is free: its prompt and every generated
    token but the last (sampled, never fed). The new request may take that slot itself (no copy).
    Only slots [0, length) are ever trusted: a chunk's right padding may have written past them.

At least one prompt token is always computed: its logits give the first generated token.

Prompt logprobs (SamplingParams.prompt_logprobs): the logits at position p score prompt token p + 1, and
a reused prefix skips those logits, so a request that asks for them reuses a prefix only from a row
that scored it itself (its own prompt logprobs, with at least as many alternatives); the entries are
copied. m reused tokens need the source's entries for tokens 1..m, and token m must be shared too (it
is scored by the logits at position m - 1, which nobody recomputes): m <= common - 1.

Which free row gives up its content (`PrefixCache.victim`, `spare`): a written row that holds nothing
first, then held rows least recently used first (a held row is used when it is kept; moving it between
slots is no use), and a row never written only when a request needs a slot. The pool commits memory
where it is first written (engine/backends/ort.py lazy_zeros; a first write into a gpt2 row cost ~160
ms of page faults on the 2-core VM, and ~75 MB of RSS): the cache keeps what requests left in written
rows and never writes a fresh row of its own, so a request that shares nothing pays none of that
(measured before this rule: unrelated 100-token requests after a 600-token one had their TTFT go from
115 to 250-400 ms while held rows were moved into fresh rows).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

KEEP_TAIL = 16                # a held row whose content past the reused prefix is longer is kept (copy the prefix)
PRIOR_TOKENS_PER_FIXED = 32   # before the cost model has a fit: waiting must save this many tokens


@dataclass
class Row:
    """What one row of the pool holds: keys and values for tokens[:length] at slots [0, length)."""

    tokens: np.ndarray                 # int64: the row's sequence (a prefilling row's whole prompt)
    length: int                        # slots holding valid keys and values
    prefilling: bool = False           # tokens[length:] are the rest of its prompt, on their way
    scores: Sequence[Any] | None = None   # prompt logprob entries: [j] scores token j given < j ([0]: None)
    scores_k: int | None = None        # alternatives per entry in `scores`
    draft_length: int = 0              # slots of the draft pool's row holding tokens[:draft_length]
    used: int = 0                      # tick of its last use (held rows)


@dataclass(frozen=True)
class Match:
    """The best source for a prompt: `length` tokens from row `slot` (held: a free row, else a request's)."""

    slot: int
    length: int
    held: bool


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two int arrays."""
    n = min(len(a), len(b))
    if n == 0 or a[0] != b[0]:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def reusable(prompt: np.ndarray, row: Row, prompt_logprobs: int | None = None) -> tuple[int, int]:
    """(tokens of `prompt` this row gives now, tokens it will give once its prompt is prefilled)."""
    common = common_prefix(prompt, row.tokens)

    def gives(length: int, scored: int) -> int:           # scored: prompt logprob entries, [0] included
        cap = len(prompt) - 1                              # one prompt token is always computed
        if prompt_logprobs is not None:
            if row.scores is None or row.scores_k is None or row.scores_k < prompt_logprobs:
                return 0
            cap = min(cap, common - 1, scored - 1)         # token m is scored by the logits at m - 1
        return max(min(common, length, cap), 0)

    now = gives(row.length, len(row.scores) if row.scores is not None else 0)
    # A prefilling row will hold (and have scored) its whole prompt; any other row is what it is.
    later = gives(len(row.tokens), len(row.tokens)) if row.prefilling else now
    return now, max(later, now)


def lookup(prompt: np.ndarray, held: dict[int, Row], live: dict[int, Row],
           prompt_logprobs: int | None = None) -> tuple[Match | None, int]:
    """The row that gives `prompt` the most tokens now (None: no row shares any; a held row first on a
    tie: no copy), and how many tokens more a live row still prefilling them would give (0: none)."""
    best: Match | None = None
    later = 0
    for is_held, rows in ((True, held), (False, live)):
        for slot, row in rows.items():
            now, then = reusable(prompt, row, prompt_logprobs)
            later = max(later, then)
            if now > 0 and (best is None or now > best.length):
                best = Match(slot, now, is_held)
    return best, max(later - (best.length if best else 0), 0)


def worth_waiting(gain: int, fixed_s: float, per_token_s: float) -> bool:
    """Wait for a row to prefill `gain` more shared tokens, rather than compute them alongside it, when
    they cost more than the fixed part of a forward (the step the waiting request may add)."""
    if per_token_s <= 0:
        return gain >= PRIOR_TOKENS_PER_FIXED
    return gain * per_token_s >= fixed_s


class PrefixCache:
    """The held rows: free slots of the pool that keep a finished request's keys and values."""

    def __init__(self):
        self._held: dict[int, Row] = {}
        self._written: set[int] = set()   # rows written at least once: their memory is committed
        self._tick = 0

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, slot: int) -> bool:
        return slot in self._held

    def held(self, slot: int) -> Row | None:
        return self._held.get(slot)

    def rows(self) -> dict[int, Row]:
        return dict(self._held)

    def written(self, slots: Iterable[int]) -> None:
        """These rows are being written (a forward's rows, a copy's destination)."""
        self._written.update(slots)

    def is_written(self, slot: int) -> bool:
        return slot in self._written

    def clear(self) -> None:
        """Forget every held row (prefix caching switched off); which rows were written stays known."""
        self._held.clear()

    def hold(self, slot: int, row: Row) -> None:
        """A finished request's row stays in `slot` (its slot is free) until the slot is needed."""
        if row.length <= 0:
            self._held.pop(slot, None)
            return
        self._written.add(slot)
        self._tick += 1
        row.used = self._tick
        self._held[slot] = row

    def forget(self, slot: int) -> Row | None:
        """`slot` is overwritten (or taken by a request): what it held is gone from the cache."""
        return self._held.pop(slot, None)

    def move(self, src: int, dst: int) -> None:
        """The row held in `src` was copied into free slot `dst` (src is about to be overwritten)."""
        self._held[dst] = self._held.pop(src)     # a move is not a use: it keeps its place in the LRU order

    def victim(self, free: Sequence[int]) -> int:
        """The free slot a new request should overwrite: a written row holding nothing (lowest first), else
        the held row least recently used, else a row never written."""
        empty = [s for s in free if s in self._written and s not in self._held]
        if empty:
            return min(empty)
        held = [s for s in free if s in self._held]
        if held:
            return min(held, key=lambda s: self._held[s].used)
        return min(free)

    def spare(self, free: Sequence[int], than: Row) -> int | None:
        """A free slot to keep `than` in: a written row holding nothing, else a held row used before it;
        None when there is none (then `than` is the one to lose: a fresh row is not written for it)."""
        if not free:
            return None
        s = self.victim(free)
        if s in self._held:
            return s if self._held[s].used < than.used else None
        return s if s in self._written else None

    def slot_for(self, free: Sequence[int], match: Match | None) -> int:
        """Where a new request goes: the held row it reuses when what that row holds past the prefix is
        short (< KEEP_TAIL tokens) or no other free slot can take the copy (`spare`); else the victim."""
        if match is not None and match.held and match.length > 0:
            source = self._held[match.slot]
            if source.length - match.length < KEEP_TAIL:
                return match.slot
            s = self.spare([s for s in free if s != match.slot], source)
            return match.slot if s is None else s
        return self.victim(free)
