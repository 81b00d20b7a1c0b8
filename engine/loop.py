"""The autoregressive loop, shared by every backend: prefill, then one token per step.

Batching: rows are right-padded to the longest prompt; each row's cache slot is its own position, so
rows of different lengths share one forward call. A finished row keeps its slot (it is re-fed its
last token, whose logits nobody reads) until the whole batch is done.

`run_loop` is a generator that yields after every step, so `generate` (drain it) and `stream` (yield
text as it comes) are the same code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from engine.backends.base import Backend
from engine.detokenize import StreamDetokenizer
from engine.sampling import SamplingParams, make_rng, sample_next


@dataclass
class RowState:
    """One prompt's progress through the loop."""

    prompt_ids: list[int]
    params: SamplingParams
    detok: StreamDetokenizer
    rng: np.random.Generator
    generated: list[int] = field(default_factory=list)
    text: str = ""             # detokenized generated text (complete characters only, until the end)
    emitted: int = 0           # chars of `text` already handed to a stream consumer
    stop_scanned: int = 0      # no stop string ends within text[:stop_scanned] (searched, or before min_tokens)
    finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class LoopTimings:
    prefill_s: float = 0.0               # the prefill forward + the first token's sampling (TTFT)
    decode_step_s: list[float] = field(default_factory=list)   # one entry per decode step

    @property
    def decode_s(self) -> float:
        return float(sum(self.decode_step_s))


def prefill(backend: Backend, cache, rows: list[RowState], pad_id: int) -> np.ndarray:
    """Run every prompt through the model; return each row's last-position logits (B, V).

    Backends with a prefill limit (`max_prompt`, e.g. a TensorRT profile) get the prompts in chunks:
    each chunk continues at the slot where the previous one stopped, as a decode step does.
    """
    lengths = np.array([len(r.prompt_ids) for r in rows], np.int64)          # (B,)
    T = int(lengths.max())
    ids = np.full((len(rows), T), pad_id, np.int64)                          # (B, T) right-padded
    for b, r in enumerate(rows):
        ids[b, :lengths[b]] = r.prompt_ids
    chunk = backend.max_prompt or T
    last = lengths - 1                                                       # (B,) each row's last token
    out = None
    for start in range(0, T, chunk):
        width = min(chunk, T - start)
        local = np.clip(last - start, 0, width - 1)[:, None]                 # (B, 1) index within the chunk
        logits = backend.forward(cache, ids[:, start:start + width],
                                 np.full(len(rows), start, np.int64), local)[:, 0]  # (B, V)
        mine = (last >= start) & (last < start + width)                      # rows whose last token is here
        out = logits if out is None else np.where(mine[:, None], logits, out)
    return out


def sequence_logits(backend: Backend, token_ids: np.ndarray) -> np.ndarray:
    """Logits at every position of one sequence (teacher-forced, e.g. for perplexity): (T, V).

    Chunked by the backend's prefill limit (`max_prompt`) as `prefill` is, on one cache of T slots.
    """
    ids = np.asarray(token_ids, np.int64)[None]                              # (1, T)
    T = ids.shape[1]
    chunk = backend.max_prompt or T
    cache = backend.new_cache(1, T)
    parts = [backend.forward(cache, ids[:, s:s + chunk], np.full(1, s, np.int64),
                             np.arange(min(chunk, T - s))[None])[0] for s in range(0, T, chunk)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)          # (T, V)


def decode_step(backend: Backend, cache, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Feed one token per row at its slot; return the next logits (B, V)."""
    zero = np.zeros((len(tokens), 1), np.int64)                              # (B, 1): the only new token
    return backend.forward(cache, tokens[:, None], positions, zero)[:, 0]    # (B, V)


def _stop_hit(row: RowState) -> bool:
    """Cut the text at the earliest stop string (excluded from the output, as OpenAI and vLLM do).

    Only text not searched before: a match must end past `stop_scanned`. Below min_tokens nothing is
    searched (the scan mark just follows the text), so a stop string counts only if it ends in the text of
    a token after the first min_tokens, as vLLM checks them.
    """
    if len(row.generated) <= row.params.min_tokens:
        row.stop_scanned = len(row.text)
        return False
    best = -1
    for s in row.params.stop:
        at = row.text.find(s, max(row.stop_scanned - len(s) + 1, 0))
        if at >= 0 and (best < 0 or at < best):
            best = at
    row.stop_scanned = len(row.text)
    if best < 0:
        return False
    row.text = row.text[:best]
    return True


def advance(row: RowState, token: int, eos_id: int, position: int, capacity: int) -> None:
    """Record a sampled token and decide whether the row is finished.

    <|endoftext|> (unless stop_at_eos is off) and the stop token ids end the row without entering its text or
    token ids; below min_tokens they do not end it (sampling masks them there: see `sampling._adjust`).
    """
    params = row.params
    if len(row.generated) >= params.min_tokens:
        reason = "eos" if params.stop_at_eos and token == eos_id else "stop" if token in params.stop_token_ids else None
        if reason is not None:
            row.finish_reason = reason
            row.text += row.detok.flush()
            _stop_hit(row)        # the flushed tail may complete a stop string: cut there too
            return
    row.generated.append(token)
    row.text += row.detok.push(token)
    if _stop_hit(row):
        row.finish_reason = "stop"
    elif len(row.generated) >= params.max_new_tokens:
        row.finish_reason = "length"
    elif position + 1 >= capacity:  # the next token would have no slot: the context is full
        row.finish_reason = "context"
    if row.done and row.finish_reason != "stop":
        row.text += row.detok.flush()
        if _stop_hit(row):
            row.finish_reason = "stop"


def run_loop(backend: Backend, rows: list[RowState], capacity: int, eos_id: int, timings: LoopTimings):
    """Prefill then decode until every row is done; yields after each step."""
    t0 = time.perf_counter()  # TTFT counts the cache allocation too (one definition: see LoopTimings)
    cache = backend.new_cache(len(rows), capacity)
    positions = np.array([len(r.prompt_ids) for r in rows], np.int64)       # (B,) slot of the next token
    logits = prefill(backend, cache, rows, pad_id=eos_id)
    tokens = sample_rows(logits, rows)
    for b, r in enumerate(rows):
        advance(r, int(tokens[b]), eos_id, int(positions[b]), capacity)
    timings.prefill_s = time.perf_counter() - t0
    yield
    while not all(r.done for r in rows):
        t0 = time.perf_counter()
        # Finished rows re-feed their last slot; their logits are ignored.
        feed_pos = np.array([p if not r.done else min(p, capacity - 1) for p, r in zip(positions, rows)], np.int64)
        logits = decode_step(backend, cache, tokens.astype(np.int64), feed_pos)
        for b, r in enumerate(rows):
            if not r.done:
                positions[b] += 1
        tokens = np.where([r.done for r in rows], tokens, sample_rows(logits, rows))
        for b, r in enumerate(rows):
            if not r.done:
                advance(r, int(tokens[b]), eos_id, int(positions[b]), capacity)
        timings.decode_step_s.append(time.perf_counter() - t0)
        yield


def sample_rows(logits: np.ndarray, rows: list[RowState]) -> np.ndarray:
    """Each row's next token (B,) from its logits (B, V), with its own parameters and RNG."""
    # Only the penalties read the context: skip the O(length) copies for every other row.
    contexts = [np.asarray(r.prompt_ids + r.generated, np.int64)
                if r.params.repetition_penalty != 1.0 and not r.done else None for r in rows]
    outputs = [np.asarray(r.generated, np.int64) if r.params.reads_outputs else None for r in rows]
    return sample_next(logits, [r.params for r in rows], contexts, [r.rng for r in rows], outputs)


def new_row(prompt_ids: list[int], params: SamplingParams, tokenizer) -> RowState:
    return RowState(list(prompt_ids), params, StreamDetokenizer(tokenizer), make_rng(params.seed))
