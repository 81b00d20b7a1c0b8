"""The in-flight engine: one loop thread serves every request from one pool of KV-cache slots.
(~490 lines, one job: the loop. Admission, prefill, decode, speculation and freeing share the slot pool's
invariants (rows [0, n), each request's fill level); split apart, each would have to re-establish them.)

    submit() ──> waiting queue (bounded) ──> loop thread, each iteration:
                   1. admit waiting requests into free slots (FIFO), drop aborted / expired ones
                   2. prefill: prompts into their slots, within a token budget while others decode
                   3. one batched decode forward over rows [0, n) of the pool, sample, stream deltas out
                   4. free finished rows at once (the pool stays compact: see `_free`)

The pool is one backend cache of `max_batch` rows, allocated once; a request owns a row from admission
to its end. Rows stay packed at [0, n_active): a freed row is filled by moving the last active row into
it (a copy of that row's filled slots only), so the decode forward is always a contiguous prefix view,
a lone request decodes at batch 1, and new requests are admitted into a contiguous run of rows that
can be prefilled in one forward.

Prefill policy (chunked prefill, as vLLM and TensorRT-LLM do it):
  - no row is decoding: every admitted prompt is prefilled whole, fresh prompts together in one
    forward (nobody waits on it, and a lone user's TTFT is the plain prefill's);
  - rows are decoding: prompts are fed in chunks of at most `prefill_budget()` tokens per iteration,
    the tokens that take about PREFILL_SHARE of one decode step (measured online: decode step time
    and prefill time per token, moving averages), at least MIN_CHUNK. A long prompt then adds at most
    ~PREFILL_SHARE of a step to the decoding rows' inter-token latency, instead of its whole prefill.
  ONNX Runtime's GroupQueryAttention accepts several new tokens on a filled cache only at batch 1, so
  continuation chunks run on a one-row view of the request's own row.

Speculative decoding (with a draft backend): when exactly one request is decoding and no prompt is
waiting for prefill, a round proposes k <= `draft_k` tokens with the draft (its own slot pool, caught
up lazily with the tokens it has not seen), verifies them in one target forward of k+1 tokens on the
request's one-row view, and emits the accepted drafts plus one target token (engine/speculative.py).
k is chosen per round by SpeculationPolicy (engine/speculative.py): the k with the best expected
tokens per unit of time from the request's acceptance so far and the draft's cost (its weight bytes
over the target's), or no round at all (a plain step; probes after 32, 64, 128... tokens) when drafting
does not pay; it never reads a clock, so seeded requests reproduce. speculate="always": draft_k every round.
Rejected positions roll back for free: the row's fill level moves back and later writes overwrite the
slots. With several requests decoding, the batched step already shares each weight read among them
and GroupQueryAttention verifies several tokens only at batch 1, so the loop does not speculate.
Each output reports its acceptance rate (accepted / proposed drafts).

Batch invariance: every request has its own RNG (seeded from its params), penalties and stop
strings; its row's cache holds only its own tokens. What can differ with the batch is float rounding
inside the kernels (batch-size-dependent GEMM blocking); tests check token equality against the
request run alone.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.backends.base import Backend
from engine.errors import EngineClosed, EngineError, EngineOverloaded
from engine.loop import RowState, advance, decode_step, prefill, sample_rows
from engine.sampling import logits_to_probs, top_logprobs
from engine.speculative import SpeculationPolicy, accept_drafts, draw

PREFILL_SHARE = 0.75   # a prefill chunk may cost this fraction of a decode step while rows decode
MIN_CHUNK = 16         # never fewer prompt tokens per iteration (progress for long prompts)
EMA = 0.2              # weight of the newest measurement in the moving averages


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability (log-softmax of the raw logits) and its top alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]   # (token id, logprob), most likely first; params.logprobs of them


@dataclass
class Delta:
    """What one request gained since its previous delta (sent from the loop thread)."""

    text: str = ""                                         # whole characters; stop strings held back
    token_ids: list[int] = field(default_factory=list)     # tokens sampled since the previous delta
    logprobs: list[TokenLogprob] | None = None             # one per token id, when asked for
    finish_reason: str | None = None                       # set on the last delta
    error: BaseException | None = None                     # the request failed (last delta)
    request: Request | None = None                         # set on the last delta: the whole record
    output: Any = None                                     # the GenerationOutput, set by the Generator


@dataclass(frozen=True)
class EngineStats:
    running: int        # requests holding a slot
    waiting: int        # requests queued for a slot
    free_slots: int
    max_batch: int
    max_queue: int
    forward_calls: int  # backend forwards since start (prefill and decode): tests count batching with it


class Request:
    """One request's state in the loop. Times are time.perf_counter() values."""

    _ids = itertools.count()

    def __init__(self, row: RowState, sink: Callable[[Delta], None], deadline_s: float | None = None):
        self.id = next(Request._ids)
        self.row = row
        self.sink = sink
        self.submitted = time.perf_counter()
        self.deadline = None if deadline_s is None else self.submitted + deadline_s
        self.admitted: float | None = None
        self.token_times: list[float] = []                 # when each token (eos included) was sampled
        self.finished: float | None = None
        self.abort_requested = False
        self.error: BaseException | None = None
        self.slot: int | None = None
        self.prefilled = 0                                 # prompt tokens already in the cache
        self.last_token = 0                                # the token the next decode step feeds
        self.logprobs: list[TokenLogprob] | None = [] if row.params.logprobs is not None else None
        self.draft_filled = 0                              # slots of the draft's pool row holding this sequence
        self.drafts_proposed = self.drafts_accepted = 0
        self.draft_trials = 0                              # drafts judged (accepted + the first rejected of each round)
        self.plain_since_round = 0                         # plain decode steps since its last speculative round
        self.probes = 0                                    # speculative rounds made only to re-measure acceptance
        self._sent_tokens = 0                              # generated ids already handed out in deltas
        self._hold = max((len(s) - 1 for s in row.params.stop), default=0)

    @property
    def filled(self) -> int:
        """Cache slots this request has written: its prompt, then one per decode step."""
        return self.prefilled + max(len(self.token_times) - 1, 0) if self.decoding else self.prefilled

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.row.prompt_ids)

    @property
    def done(self) -> bool:
        return self.row.done or self.error is not None

    def _delta(self) -> Delta | None:
        """New text (held back by the longest stop string - 1 until the end) and tokens, if any."""
        r = self.row
        safe = len(r.text) if self.done else max(len(r.text) - self._hold, r.emitted)
        text = r.text[r.emitted:safe] if safe > r.emitted else ""
        tokens = r.generated[self._sent_tokens:]
        if not text and not tokens and not self.done:
            return None
        lp = None if self.logprobs is None else self.logprobs[self._sent_tokens:len(r.generated)]
        r.emitted = max(r.emitted, safe)
        self._sent_tokens = len(r.generated)
        return Delta(text, list(tokens), lp, r.finish_reason if self.error is None else None, self.error,
                     self if self.done else None)


class EngineCore:
    """One loop thread, one slot pool. Thread-safe: submit/abort/stats/close from any thread."""

    def __init__(self, backend: Backend, eos_id: int, capacity: int, max_batch: int = 8, max_queue: int = 256,
                 prefill_chunk: int | None = None, draft: Backend | None = None, draft_k: int = 4,
                 draft_cost: float = 0.35, speculate: str = "auto"):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise EngineError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if backend.max_batch is not None and max_batch > backend.max_batch:
            raise EngineError(f"max_batch {max_batch} exceeds the backend's maximum batch {backend.max_batch} "
                              "(a TensorRT engine's profile): lower max_batch or rebuild with a larger --max-batch")
        if not isinstance(max_queue, int) or max_queue < 0:
            raise EngineError(f"max_queue must be an int >= 0, got {max_queue!r}")
        if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 0):
            raise EngineError(f"prefill_chunk must be None (adaptive), 0 (never split a prompt: for measuring the "
                              f"policy) or an int >= 1, got {prefill_chunk!r}")
        if draft is not None and (not isinstance(draft_k, int) or not 1 <= draft_k <= 16):
            raise EngineError(f"draft_k must be an int in [1, 16], got {draft_k!r}")
        if speculate not in ("auto", "always"):
            raise EngineError(f"speculate must be 'auto' (rounds only when they pay) or 'always' (draft_k every "
                              f"round), got {speculate!r}")
        self.backend, self.eos_id, self.capacity = backend, eos_id, capacity
        self.draft, self.draft_k = draft, draft_k
        self._draft_cache = None
        # draft_cost: a draft step in target steps (the Generator passes the weight-bytes ratio).
        self._policy = SpeculationPolicy(draft_k, draft_cost, always=speculate == "always") if draft is not None else None
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self._cache = None                        # the pool: allocated on the loop thread's first admission
        self._active: list[Request] = []          # index == slot
        self._waiting: deque[Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.forward_calls = 0
        self._step_s: float | None = None         # moving average of a decode step's time
        self._prefill_token_s: float | None = None  # moving average of prefill time per prompt token
        self._thread = threading.Thread(target=self._run, name="gpt2-engine-loop", daemon=True)
        self._thread.start()

    # --- any thread -------------------------------------------------------------------------------

    def submit(self, requests: list[Request]) -> None:
        """Queue requests (all or none: admitted together when slots allow). Overloaded at once if full."""
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is closed: create a new Generator")
            if len(self._waiting) + len(requests) > self.max_queue + max(self.max_batch - len(self._active), 0):
                raise EngineOverloaded(f"the engine is overloaded: {len(self._waiting)} requests are waiting "
                                       f"(max_queue {self.max_queue}) and all {self.max_batch} slots are busy; "
                                       "retry later or raise max_queue / max_batch")
            self._waiting.extend(requests)
            self._cond.notify()

    def abort(self, request: Request) -> None:
        """End a request at the next iteration (finish reason 'abort'); its slot frees at once."""
        with self._cond:
            request.abort_requested = True
            self._cond.notify()

    def abort_all(self) -> None:
        """Abort every request waiting or running (a server past its drain bound)."""
        with self._cond:
            for r in self._active + list(self._waiting):
                r.abort_requested = True
            self._cond.notify()

    def stats(self) -> EngineStats:
        with self._cond:
            n = len(self._active)
            return EngineStats(n, len(self._waiting), self.max_batch - n, self.max_batch, self.max_queue,
                               self.forward_calls)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the loop; requests still waiting or running end with EngineClosed."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # --- the loop thread --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._iteration():
                pass
            err: BaseException = EngineClosed("the engine was closed before this request finished")
        except BaseException as e:  # a bug in the loop: fail every request rather than leave callers hanging
            err = EngineError(f"the engine loop stopped: {type(e).__name__}: {e}")
        with self._cond:
            self._closed = True
            pending = self._active + list(self._waiting)
            self._active, self._waiting = [], deque()
        for r in pending:
            self._fail(r, err)

    def _iteration(self) -> bool:
        with self._cond:
            while not self._closed and not self._waiting and not self._active:
                self._cond.wait()
            if self._closed:
                return False
            now = time.perf_counter()
            for r in [r for r in self._waiting if r.abort_requested or _expired(r, now)]:
                self._waiting.remove(r)
                self._finish_unadmitted(r, "abort" if r.abort_requested else "deadline")
            while self._waiting and len(self._active) < self.max_batch:
                r = self._waiting.popleft()
                r.slot, r.admitted = len(self._active), now
                self._active.append(r)
        if self._cache is None:
            self._cache = self.backend.new_cache(self.max_batch, self.capacity)
            if self.draft is not None:
                self._draft_cache = self.draft.new_cache(self.max_batch, self.capacity)
        now = time.perf_counter()
        for r in self._active:
            if r.abort_requested:
                r.row.finish_reason = "abort"
            elif _expired(r, now):
                r.row.finish_reason = "deadline"
        self._prefill()
        self._decode()
        self._send_and_free()
        return True

    def _forward_guarded(self, rows: list[Request], fn):
        """Run one backend call; on failure the requests in it fail (the others go on)."""
        try:
            self.forward_calls += 1
            return fn()
        except Exception as e:  # noqa: BLE001 -- any backend error ends these requests, not the engine
            for r in rows:
                r.error = e if isinstance(e, EngineError) else EngineError(f"{type(e).__name__}: {e}")
            return None

    def prefill_budget(self) -> int:
        """Prompt tokens per iteration while rows decode: ~PREFILL_SHARE of a decode step."""
        if self.prefill_chunk is not None:
            return self.prefill_chunk
        if self._step_s is None or not self._prefill_token_s:
            return MIN_CHUNK
        return max(MIN_CHUNK, int(PREFILL_SHARE * self._step_s / self._prefill_token_s))

    def _prefill(self) -> None:
        pending = [r for r in self._active if not r.decoding and not r.done]
        if not pending:
            return
        decoding = any(r.decoding and not r.done for r in self._active)
        budget = self.prefill_budget() if decoding and self.prefill_chunk != 0 else None   # None: no limit
        limit = self.backend.max_prompt or None
        # Fresh prompts that fit whole, in consecutive rows: one batched forward from position 0.
        group: list[Request] = []
        for r in pending:
            n = len(r.row.prompt_ids)
            if r.prefilled or (group and r.slot != group[-1].slot + 1) or \
                    (budget is not None and sum(len(g.row.prompt_ids) for g in group) + n > budget):
                break
            group.append(r)
        if len(group) > 1:
            view = self.backend.view(self._cache, group[0].slot, group[-1].slot + 1)
            t0 = time.perf_counter()
            logits = self._forward_guarded(group, lambda: prefill(self.backend, view, [g.row for g in group],
                                                                  self.eos_id))
            self._observe_prefill(time.perf_counter() - t0, sum(len(g.row.prompt_ids) for g in group))
            if budget is not None:
                budget -= sum(len(g.row.prompt_ids) for g in group)
            if logits is not None:
                for g in group:
                    g.prefilled = len(g.row.prompt_ids)
                self._first_tokens(group, logits)
            pending = [r for r in pending if r not in group]
        # Everything else: a chunk at a time on the request's own one-row view.
        for r in pending:
            if budget is not None and budget <= 0:
                break
            ids = r.row.prompt_ids
            n = len(ids) - r.prefilled
            if budget is not None:
                n = min(n, budget)
            if limit:
                n = min(n, limit)
            view = self.backend.view(self._cache, r.slot, r.slot + 1)
            start = r.prefilled
            chunk = np.asarray(ids[start:start + n], np.int64)[None]                # (1, n)
            t0 = time.perf_counter()
            logits = self._forward_guarded([r], lambda v=view, c=chunk, s=start, k=n: self.backend.forward(
                v, c, np.array([s], np.int64), np.array([[k - 1]], np.int64)))
            self._observe_prefill(time.perf_counter() - t0, n)
            if budget is not None:
                budget -= n
            if logits is None:
                continue
            r.prefilled += n
            if r.decoding:
                self._first_tokens([r], logits[:, 0])

    def _observe_prefill(self, seconds: float, tokens: int) -> None:
        if tokens >= MIN_CHUNK:  # tiny prompts measure call overhead, not per-token cost
            per = seconds / tokens
            self._prefill_token_s = per if self._prefill_token_s is None else (1 - EMA) * self._prefill_token_s + EMA * per

    def _first_tokens(self, rows: list[Request], logits: np.ndarray) -> None:
        """Sample each freshly prefilled row's first token (its TTFT)."""
        self._sample(rows, logits)

    def _decode(self) -> None:
        decoders = [r for r in self._active if r.decoding and not r.done and r.token_times]
        # Rows that got their first token in this iteration's prefill join this step too.
        if not decoders:
            return
        solo = self._policy is not None and len(decoders) == len(self._active) == 1
        if solo:
            r = decoders[0]
            k_cap = min(self.draft_k, self.capacity - 1 - r.filled, r.row.params.max_new_tokens - len(r.row.generated) - 1)
            k, probe = self._policy.choose_k(r.drafts_accepted, r.draft_trials, r.plain_since_round, r.probes, k_cap)
            r.probes += probe
            if k >= 1:
                self._speculate(r, k)
                r.plain_since_round = 0
                return
            r.plain_since_round += 1
        hi = max(r.slot for r in decoders) + 1
        tokens = np.full(hi, self.eos_id, np.int64)                                   # (hi,)
        positions = np.zeros(hi, np.int64)                                            # (hi,)
        for r in self._active[:hi]:
            # Rows still prefilling sit inside the range: a dummy token at their next prompt slot, which
            # their next chunk overwrites (compaction keeps such rows few and at the end).
            positions[r.slot] = min(r.filled, self.capacity - 1)
        for r in decoders:
            tokens[r.slot] = r.last_token
        view = self.backend.view(self._cache, 0, hi)
        t0 = time.perf_counter()
        logits = self._forward_guarded(decoders, lambda: decode_step(self.backend, view, tokens, positions))
        dt = time.perf_counter() - t0
        self._step_s = dt if self._step_s is None else (1 - EMA) * self._step_s + EMA * dt
        if logits is not None:
            self._sample(decoders, logits[[r.slot for r in decoders]])

    def _speculate(self, r: Request, k: int) -> None:
        """One speculative round for the lone decoding request r (slot r.slot): draft k, verify, accept."""
        row, params = r.row, r.row.params
        seq = row.prompt_ids + row.generated                 # the last one (r.last_token) is not in the cache yet
        p = r.filled                                         # == len(seq) - 1: where r.last_token goes
        dview = self.draft.view(self._draft_cache, r.slot, r.slot + 1)
        # The draft catches up on what it has not seen (after batched steps, or the prompt), then proposes.
        feed = np.asarray(seq[r.draft_filled:], np.int64)[None]                     # (1, n)
        logits = self._forward_guarded([r], lambda: self.draft.forward(
            dview, feed, np.array([r.draft_filled], np.int64), np.array([[feed.shape[1] - 1]], np.int64)))
        if logits is None:
            return
        drafts: list[int] = []
        q = np.empty((k, logits.shape[-1]))                                         # (k, V)
        for i in range(k):
            q[i] = logits_to_probs(logits[0, 0], params, *_contexts(row, drafts))
            drafts.append(int(np.argmax(q[i])) if params.is_greedy else draw(q[i], row.rng))
            if i < k - 1:
                logits = self._forward_guarded([r], lambda i=i: self.draft.forward(
                    dview, np.array([[drafts[-1]]], np.int64), np.array([p + 1 + i], np.int64),
                    np.zeros((1, 1), np.int64)))
                if logits is None:
                    return
        # The target scores the last token and every draft in one forward of k + 1 tokens.
        tview = self.backend.view(self._cache, r.slot, r.slot + 1)
        ids = np.asarray([r.last_token] + drafts, np.int64)[None]                  # (1, k+1)
        logits = self._forward_guarded([r], lambda: self.backend.forward(
            tview, ids, np.array([p], np.int64), np.arange(k + 1, dtype=np.int64)[None]))   # (1, k+1, V)
        if logits is None:
            return
        target = np.stack([logits_to_probs(logits[0, i], params, *_contexts(row, drafts[:i]))
                           for i in range(k + 1)])                                  # (k+1, V)
        tokens, accepted = accept_drafts(target, q, drafts, row.rng, params.is_greedy)
        r.drafts_proposed += k
        r.drafts_accepted += accepted
        r.draft_trials += accepted + (accepted < k)
        # The draft holds the last token and drafts 1..k-1; the accepted ones stay valid.
        r.draft_filled = p + 1 + min(accepted, k - 1)
        now = time.perf_counter()
        for i, tok in enumerate(tokens):
            n_before = len(row.generated)
            advance(row, tok, self.eos_id, len(row.prompt_ids) + n_before, self.capacity)
            if r.logprobs is not None and len(row.generated) > n_before:
                r.logprobs.append(TokenLogprob(tok, *top_logprobs(logits[0, i], tok, params.logprobs)))
            r.token_times.append(now)
            r.last_token = tok
            if row.done:
                break

    def _sample(self, rows: list[Request], logits: np.ndarray) -> None:
        """Next token per row (logits (len(rows), V)), then the row's stop checks."""
        tokens = sample_rows(logits, [r.row for r in rows])
        now = time.perf_counter()
        for r, lg, tok in zip(rows, logits, tokens):
            tok = int(tok)
            position = len(r.row.prompt_ids) + len(r.row.generated)                   # where tok is written
            n_before = len(r.row.generated)
            advance(r.row, tok, self.eos_id, position, self.capacity)
            if r.logprobs is not None and len(r.row.generated) > n_before:
                r.logprobs.append(TokenLogprob(tok, *top_logprobs(lg, tok, r.row.params.logprobs)))
            r.token_times.append(now)
            r.last_token = tok

    def _send_and_free(self) -> None:
        """Free finished rows first, then deliver: a caller that sees its last delta sees its slot free."""
        now = time.perf_counter()
        deltas = []
        for r in self._active:
            if r.done:
                r.finished = now
            d = r._delta()
            if d is not None:
                deltas.append((r, d))
        done = [r for r in self._active if r.done]
        if done:
            with self._cond:
                for r in sorted(done, key=lambda r: r.slot, reverse=True):
                    self._free(r)
        for r, d in deltas:
            _deliver(r, d)

    def _free(self, r: Request) -> None:
        """Give r's row back; the last active row moves into it (its filled slots are copied), so the
        active rows stay [0, n). Called in descending slot order: the last row is never one being freed."""
        last = self._active[-1]
        if last is not r:
            self.backend.copy_row(self._cache, last.slot, r.slot, last.filled)
            if self.draft is not None:
                self.draft.copy_row(self._draft_cache, last.slot, r.slot, last.draft_filled)
            self._active[r.slot] = last
            last.slot = r.slot
        self._active.pop()
        r.slot = None

    def _finish_unadmitted(self, r: Request, reason: str) -> None:
        r.row.finish_reason = reason
        r.finished = time.perf_counter()
        _deliver(r, r._delta())

    def _fail(self, r: Request, err: BaseException) -> None:
        r.error = err
        r.finished = time.perf_counter()
        _deliver(r, Delta(error=err, request=r))


def _contexts(row: RowState, drafts: list[int]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(prompt + generated + drafts, generated + drafts) when the penalties read them, else None."""
    gen = row.generated + drafts
    ctx = np.asarray(row.prompt_ids + gen, np.int64) if row.params.repetition_penalty != 1.0 else None
    out = np.asarray(gen, np.int64) if row.params.reads_outputs else None
    return ctx, out


def _expired(r: Request, now: float) -> bool:
    return r.deadline is not None and now >= r.deadline


def _deliver(r: Request, d: Delta) -> None:
    try:
        r.sink(d)
    except Exception:  # noqa: BLE001 -- a consumer gone (closed event loop, say) must not stop the engine
        pass
