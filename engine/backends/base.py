"""The one small interface every backend implements; the generation loop only sees this.

A backend owns the compiled model (session or engine). The engine loop (engine/core.py) allocates one
cache of `max_batch` rows (the slot pool) and runs forwards on row views of it (`view`: prefix rows for
a decode step, one row for a prompt chunk) or on two row ranges at once (`forward_mixed`: the decode rows and
the prompt chunks in one forward), compacting rows with `copy_row`; the bench's static loop
(engine/loop.py run_loop) allocates a cache per call. `forward` must be safe to call from several
threads on different caches (the loop has one thread; the bench and `Generator.logits` add others).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class Segment:
    """Rows [start, stop) of a cache and what one forward feeds them (see Backend.forward's arguments)."""

    start: int
    stop: int
    input_ids: np.ndarray        # int64 (B, T), B = stop - start
    cache_positions: np.ndarray  # int64 (B,)
    logits_indices: np.ndarray   # int64 (B, K)


class KVCache(Protocol):
    batch: int       # rows
    capacity: int    # slots per row; positions 0..capacity-1 may be written


class Backend(Protocol):
    """What the loop and the Generator read of a backend. ONNX Runtime's values are the defaults: no
    prefill limit, any capacity up to the artifact's, any batch."""

    name: str
    max_prompt: int              # longest prefill (new tokens) per forward; 0 = no limit (a TensorRT profile sets one)
    fixed_capacity: int | None   # the only cache capacity the backend serves (TensorRT); None = any
    max_batch: int | None        # most rows per forward (TensorRT profile); None = no limit
    mixed_steps: bool            # forward_mixed runs two segments in one forward (ORT, graph version >= 5)

    def new_cache(self, batch: int, capacity: int, commit: bool = False) -> KVCache:
        """Allocate the per-layer key/value buffers once: (batch, n_head, capacity, head_dim) each.
        commit: back every slot with memory now (a server's warm-up), where the backend would otherwise
        commit memory as rows are first written (ONNX Runtime CPU: lazy_zeros)."""
        ...

    def forward(self, cache: Any, input_ids: np.ndarray, cache_positions: np.ndarray,
                logits_indices: np.ndarray) -> np.ndarray:
        """Run the decoder over new tokens and update `cache` in place.

        input_ids:       int64 (B, T)   new tokens; row b's token t lands in slot cache_positions[b] + t
        cache_positions: int64 (B,)     slots already filled per row (= the row's first new position)
        logits_indices:  int64 (B, K)   which of the T new tokens return logits
        returns:         float32 (B, K, vocab) on the host
        """
        ...

    def forward_mixed(self, cache: Any, first: Segment, chunk: Segment) -> tuple[np.ndarray, np.ndarray]:
        """One forward over two disjoint row ranges of `cache`: `first` one new token per row at any
        positions, or new tokens from position 0, or one row (a decode step, or a prompt when nothing
        decodes); `chunk` any rows with any number of new tokens at any positions (prompt chunks,
        right-padded to one T). Every weight is read once for both. Returns each segment's logits
        (B, K, vocab). Only where `mixed_steps`; others run the segments as two forwards."""
        ...

    def view(self, cache: Any, start: int, stop: int) -> KVCache:
        """Rows [start, stop) of `cache` as a cache of their own, sharing its memory (no copy)."""
        ...

    def copy_row(self, cache: Any, src: int, dst: int, length: int) -> None:
        """Copy row src's first `length` slots over row dst, in every layer's key and value buffer."""
        ...

    def close(self) -> None:
        ...
