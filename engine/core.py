"""The in-flight engine: one loop thread serves every request from one pool of KV-cache slots.
(One job: execute the scheduler's plans on the pool. Admission, the forward, sampling, speculation and
freeing share the pool's invariants (which request holds which row, each row's fill level); split
apart, each would have to re-establish them. What to run is decided in engine/scheduler.py.)

    submit() ──> waiting queue (bounded) ──> loop thread, each iteration:
                   0. with nothing admitted: wait while requests keep arriving (`_gather_arrivals`)
                   1. admit waiting requests into free slots (FIFO), drop aborted / expired ones; with
                      prefix caching each starts after the longest prefix of its prompt a row holds
                   2. plan = scheduler.schedule(rows, budget from the cost model)
                   3. arrange the pool: each segment's rows a contiguous run, where the fewest copies
                      put them (`_runs`)
                   4. ONE forward: decode tokens and prompt chunks together (backend.forward_mixed),
                      timed into the cost model; sample; stream deltas out
                   5. free finished rows' slots

The pool is one backend cache of `max_batch` rows plus a scratch row, allocated once; a request owns
a row from admission to its end, though not always the same row: `_arrange` moves rows so that each
segment of the next forward is a contiguous row range, anywhere in the pool (a move copies a row's
filled slots only; a swap goes through the scratch row). In a steady decode the rows stay put, a lone
request decodes at batch 1, and a finished row leaves a hole that the next plan fills with one copy, or
none when the run can shift past it.

Prefix caching (on by default; engine/prefix_cache.py decides, this file copies): a finished
request's row keeps its keys and values while its slot is free (least recently used first to go), and
a new request starts its prefill after the longest prefix of its prompt that any row holds: it takes a
finished row's slot (no copy) or copies the prefix from another row, running or prefilling (a copy of
the filled slots is far cheaper than a prefill). A request whose prefix another row is still prefilling
waits in the queue for it when that saves more than a forward's fixed part (the cost model's fit): a
burst of prompts sharing a context prefills the context once. Only slots [0, filled) of a row are ever
reused (a chunk's right padding may have written past them). The runs avoid held rows where they can
(a held row counts as a copy in `_runs`); `_arrange` moves a held row out of the way of the plan's
rows (into a free slot outside them) rather than overwrite it, when one is free.

Graphs without the chunk segment (exports before graph version 5, the TensorRT fp16 graph) run the
chunk rows as a forward of their own after the first segment's: the same plans, two forwards.

Speculative decoding (with a draft backend): when exactly one request is active (decoding, nothing
waiting for a slot or a prefill), a round proposes k <= `draft_k` tokens with the draft (its own slot
pool, caught up lazily with the tokens it has not seen), verifies them in one target forward of k+1
tokens on the request's one-row view, and emits the accepted drafts plus one target token
(engine/speculative.py). k is chosen per round by SpeculationPolicy (engine/speculative.py): the k
with the best expected tokens per unit of time from the request's acceptance so far and the draft's
cost (its weight bytes over the target's), or no round at all (a plain step; probes after 32, 64,
128... tokens) when drafting does not pay; it never reads a clock, so seeded requests reproduce.
speculate="always": draft_k every round. Rejected positions roll back for free: the row's fill level
moves back and later writes overwrite the slots. With several requests active, the batched step
already shares each weight read among them and GroupQueryAttention verifies several tokens only at
batch 1, so the loop does not speculate. Each output reports its acceptance rate.

Batch invariance: every request has its own RNG (seeded from its params), penalties and stop
strings; its row's cache holds only its own tokens. What can differ with the batch is float rounding
inside the kernels (batch-size-dependent GEMM blocking); tests check token equality against the
request run alone.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from engine.backends.base import Backend, Segment
from engine.errors import EngineClosed, EngineError, EngineOverloaded
from engine.loop import RowState, advance, decode_step, sample_rows
from engine.prefix_cache import PrefixCache, Row, lookup, worth_waiting
from engine.sampling import logits_to_probs, sequence_logprobs, top_logprobs
from engine.scheduler import MAX_IDLE_TOKENS, Budget, Chunk, CostModel, RowInfo, StepPlan, Work, schedule, step_budget
from engine.speculative import SpeculationPolicy, accept_drafts, draw

ARRIVAL_QUIET_S = 0.0005    # _gather_arrivals: a gap this long ends a burst of arrivals (they come ~0.1 ms apart)
ARRIVAL_WINDOW_S = 0.002    # ... and it waits this long at most


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
    prefix_cache_queries: int = 0   # prompt tokens looked up in the prefix cache (vLLM's counter: tokens)
    prefix_cache_hits: int = 0      # prompt tokens served from it (not computed)


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
        self.cached_tokens = 0                             # of them, reused from the pool at admission
        self._prompt_array: np.ndarray | None = None       # prompt ids as int64 (prefix lookups), made once
        self.last_token = 0                                # the token the next decode step feeds
        self.logprobs: list[TokenLogprob] | None = [] if row.params.logprobs is not None else None
        # Prompt token j's logprob given tokens < j (None for token 0), when params.prompt_logprobs is set.
        self.prompt_logprobs: list[TokenLogprob | None] | None = \
            [None] if row.params.prompt_logprobs is not None else None
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
                 draft_cost: float = 0.35, speculate: str = "auto", prefix_caching: bool = True):
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
        self.prefix_caching = bool(prefix_caching)
        self._prefix = PrefixCache()              # free rows that keep a finished request's keys and values
        self.prefix_queries = self.prefix_hits = 0
        # Mixed steps need the graph's chunk segment; others run the chunk segment as a forward of its own.
        self.mixed_steps = bool(getattr(backend, "mixed_steps", False))   # a backend without it: two forwards
        self.cost = CostModel()                   # a forward's time by its tokens (the scheduler's prices)
        self._cache = None                        # the pool: allocated on the loop thread's first admission
        self._slots: list[Request | None] = [None] * max_batch   # slot -> request; row max_batch: scratch
        self._active: list[Request] = []          # admitted, in arrival order
        self._waiting: deque[Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.forward_calls = 0
        self.host_s = 0.0                         # loop time outside forwards (planning, sampling, deltas)
        self.steps = 0                            # iterations that ran a forward
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
                               self.forward_calls, self.prefix_queries, self.prefix_hits)

    def set_prefix_caching(self, on: bool) -> None:
        """Turn prefix caching on or off from the next admission; off also forgets what free rows hold (A/B
        measurements on one engine: benchmarks/prefix_cache.py)."""
        with self._cond:
            self.prefix_caching = bool(on)

    def warm_up(self) -> None:
        """Allocate the slot pool now with all of its memory committed (backend.new_cache(commit=True)),
        so that no forward under load pays for rows it touches first. A server calls this before it
        takes requests; an embedded engine that serves one request at a time need not (the pool then
        commits memory only where rows are written). Does nothing once the pool exists."""
        with self._cond:
            self._new_pool(commit=True)

    def _new_pool(self, commit: bool) -> None:
        """The slot pool, once: one row more than max_batch, the scratch row that swaps go through. Under the lock."""
        if self._cache is None:
            self._cache = self.backend.new_cache(self.max_batch + 1, self.capacity, commit=commit)
            if self.draft is not None:
                self._draft_cache = self.draft.new_cache(self.max_batch + 1, self.capacity, commit=commit)

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
        t_start = time.perf_counter()
        with self._cond:
            while not self._closed and not self._waiting and not self._active:
                self._cond.wait()
                t_start = time.perf_counter()
            if not self._closed and not self._active:
                self._gather_arrivals()
                t_start = time.perf_counter()     # idle time, not the loop's host work
            if self._closed:                      # (also while gathering)
                return False
            now = time.perf_counter()
            for r in [r for r in self._waiting if r.abort_requested or _expired(r, now)]:
                self._waiting.remove(r)
                self._finish_unadmitted(r, "abort" if r.abort_requested else "deadline")
            copies = self._admit(now)
            self._new_pool(commit=False)
        for c in copies:          # reused prefixes, in the order admission decided them
            self._copy(*c)
        now = time.perf_counter()
        for r in self._active:
            if r.abort_requested:
                r.row.finish_reason = "abort"
            elif _expired(r, now):
                r.row.finish_reason = "deadline"
        forward_s = self._step()
        self._send_and_free()
        if forward_s is not None:
            self.steps += 1
            self.host_s += time.perf_counter() - t_start - forward_s
        return True

    def _gather_arrivals(self) -> None:
        """Nothing is admitted and a request waits: let the requests sent with it arrive first, so that
        one forward prefills them all. Clients that send together reach submit() ~0.1 ms apart (they
        take turns at the GIL), and a prompt that comes one forward late waits behind the decode budget:
        8 threads calling generate at once got their first tokens up to 2.9x the static batch's TTFT
        when this loop planned after the first 3-5 had arrived. Waits while each ARRIVAL_QUIET_S brings
        another request, ARRIVAL_WINDOW_S at most; a lone request pays one quiet period. Under the lock."""
        deadline = time.perf_counter() + ARRIVAL_WINDOW_S
        seen = 0
        while not self._closed and len(self._waiting) != seen and len(self._waiting) < self.max_batch:
            seen = len(self._waiting)
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._cond.wait(min(ARRIVAL_QUIET_S, left))

    def _admit(self, now: float) -> list[tuple[int, int, int, int]]:
        """Waiting requests into free slots in arrival order, all that fit (scheduler policy 1); with prefix
        caching, after the longest cached prefix of each prompt, and a request that is better off waiting
        for a row still prefilling its prefix stays queued (later ones go past it). Returns the row copies
        to make before the next forward, in order: (src, dst, slots, draft slots). Under the lock."""
        copies: list[tuple[int, int, int, int]] = []
        deferred = []
        if not self.prefix_caching and len(self._prefix):     # switched off (set_prefix_caching)
            self._prefix.clear()
        while self._waiting and len(self._active) < self.max_batch:
            r = self._waiting.popleft()
            slot = self._place(r, copies) if self.prefix_caching else self._slots.index(None)
            if slot is None:
                deferred.append(r)
                continue
            r.slot, r.admitted = slot, now
            self._slots[slot] = r
            self._active.append(r)
        self._waiting.extendleft(reversed(deferred))
        return copies

    def _place(self, r: Request, copies: list) -> int | None:
        """r's slot, with its prefill set to start after the longest prefix a row holds (engine/prefix_cache.py);
        None: wait for a row that is prefilling more of r's prefix."""
        prompt = _prompt_array(r)
        k = r.row.params.prompt_logprobs
        free = [s for s in range(self.max_batch) if self._slots[s] is None]
        held = {s: self._prefix.held(s) for s in free if s in self._prefix}
        live = {q.slot: _live_row(q) for q in self._active if q.error is None and not q.done}
        match, gain = lookup(prompt, held, live, k)
        if gain and worth_waiting(gain, *self.cost.fit()):
            return None
        slot = self._prefix.slot_for(free, match)
        self._prefix.forget(slot)                      # taken, or evicted
        n = match.length if match is not None else 0
        self.prefix_queries += len(prompt)
        self.prefix_hits += n
        if n:
            source = held.get(match.slot) or live[match.slot]
            draft_n = min(source.draft_length, n) if self.draft is not None else 0
            if match.slot != slot:
                copies.append((match.slot, slot, n, draft_n))
            r.prefilled = r.cached_tokens = n
            r.draft_filled = draft_n
            if k is not None:   # the reused positions' prompt logprobs: the source scored them (prefix_cache.reusable)
                r.prompt_logprobs = [None] + [_first_k(e, k) for e in source.scores[1:n + 1]]
        return slot

    def _copy(self, src: int, dst: int, n: int, draft_n: int = 0) -> None:
        """Copy row src's first n slots over row dst (and the draft pool's first draft_n)."""
        self._prefix.written((dst,))
        self._copy_row(src, dst, n)
        if draft_n and self.draft is not None:
            self.draft.copy_row(self._draft_cache, src, dst, draft_n)

    def _forward_guarded(self, rows: list[Request], fn):
        """Run one backend call; on failure the requests in it fail (the others go on)."""
        try:
            self.forward_calls += 1
            return fn()
        except Exception as e:  # noqa: BLE001 -- any backend error ends these requests, not the engine
            for r in rows:
                r.error = e if isinstance(e, EngineError) else EngineError(f"{type(e).__name__}: {e}")
            return None

    def step_budget(self, n_decoding: int) -> Budget:
        """Prompt work this iteration (engine/scheduler.py), or the fixed `prefill_chunk` override."""
        if n_decoding and self.prefill_chunk:
            return Budget(self.prefill_chunk)
        if self.prefill_chunk == 0:
            return Budget(MAX_IDLE_TOKENS)
        return step_budget(n_decoding, self.max_batch, self.cost)

    def _step(self) -> float | None:
        """Plan one iteration, arrange the pool to fit it, run it as one forward, sample. Returns the
        forward time (None: nothing ran)."""
        live = [r for r in self._active if not r.done]
        if not live:
            return None
        if self._policy is not None and len(self._active) == 1 and live[0].decoding and live[0].token_times:
            return self._decode_alone(live[0])
        infos = [RowInfo(r.id, len(r.row.prompt_ids), r.prefilled, r.decoding and bool(r.token_times)) for r in live]
        n_dec = sum(i.decoding for i in infos)
        budget = self.step_budget(n_dec)

        def plan_within(b: Budget) -> StepPlan:
            return schedule(infos, b, self.capacity, self.backend.max_prompt or 0, self.backend.max_batch, self.cost)
        plan = plan_within(budget)
        if plan.empty:
            return None
        by_key = {r.id: r for r in live}
        first, pairs, at, chunk_at, copied = self._placed(plan, by_key)
        if copied and plan.chunks and math.isfinite(budget.seconds):
            # The copies run in this iteration: they come out of its budget (scheduler policy 2). Once:
            # a replanned step may copy a little differently, within a step's noise.
            left = max(budget.seconds - self.cost.predict_copy(copied), 0.0)
            replanned = plan_within(replace(budget, seconds=left))
            if replanned != plan:
                plan = replanned
                first, pairs, at, chunk_at, _ = self._placed(plan, by_key)
        decode = [] if plan.first_chunk else first
        chunks, chunk_plan = [r for r, _ in pairs], [c for _, c in pairs]
        self._arrange([(r, at + i) for i, r in enumerate(first)] + [(r, chunk_at + i) for i, r in enumerate(chunks)])
        segs = self._segments(plan, first, at, chunks, chunk_plan, chunk_at)
        t0 = time.perf_counter()
        logits = self._forward_guarded(first + chunks, lambda: self._run_segments(*segs))
        dt = time.perf_counter() - t0
        self.cost.observe(plan.work, dt)
        if logits is None:
            return dt
        first_logits, chunk_logits = logits
        if decode:
            self._sample(decode, first_logits[:, 0])
        else:
            self._prompt_done([(first[0], plan.first_chunk, first_logits[0])])
        self._prompt_done([(r, c, chunk_logits[b]) for b, (r, c) in enumerate(pairs)])
        return dt

    def _placed(self, plan: StepPlan, by_key: dict[int, Request]
                ) -> tuple[list[Request], list[tuple[Request, Chunk]], int, int, int]:
        """The plan's rows in their segments' order and where each run starts (`_runs`): (first segment's
        rows, (chunk row, its chunk) pairs, first's start, the chunk segment's start, cache slots to copy)."""
        first = [by_key[plan.first_chunk.key]] if plan.first_chunk else [by_key[k] for k in plan.decode]
        pairs = [(by_key[c.key], c) for c in plan.chunks]
        at, chunk_at, copied = self._runs(first, [r for r, _ in pairs])
        return _stay_put(first, at), _stay_put(pairs, chunk_at, row=lambda p: p[0]), at, chunk_at, copied

    def _segments(self, plan: StepPlan, first: list[Request], at: int, chunks: list[Request],
                  chunk_plan: list[Chunk], chunk_at: int) -> tuple[Segment, Segment | None]:
        """The plan's forward inputs: the first segment at rows [at, at + len(first)), the chunk segment
        at rows [chunk_at, chunk_at + len(chunks)) (chunks[b] feeds chunk_plan[b])."""
        if plan.first_chunk is None:                                      # decode rows, one token each
            ids = np.array([[r.last_token] for r in first], np.int64)                          # (B, 1)
            pos = np.array([r.filled for r in first], np.int64)                                # (B,)
            seg = Segment(at, at + len(first), ids, pos, np.zeros((len(first), 1), np.int64))
        else:
            seg = self._chunk_segment(at, first, [plan.first_chunk], plan.first_chunk.length)
        rest = self._chunk_segment(chunk_at, chunks, chunk_plan, plan.chunk_len) if chunks else None
        return seg, rest

    def _chunk_segment(self, start: int, rows: list[Request], chunks: list[Chunk], T: int) -> Segment:
        ids = np.full((len(rows), T), self.eos_id, np.int64)                                    # (Bc, T) right-padded
        for b, (r, c) in enumerate(zip(rows, chunks)):
            ids[b, :c.length] = r.row.prompt_ids[c.start:c.start + c.length]
        pos = np.array([c.start for c in chunks], np.int64)                                     # (Bc,)
        if any(r.prompt_logprobs is not None for r in rows):   # every position's logits (clamped to the row's)
            idx = np.minimum(np.arange(T)[None], np.array([c.length - 1 for c in chunks])[:, None])  # (Bc, T)
        else:
            idx = np.array([[c.length - 1] for c in chunks], np.int64)                          # (Bc, 1)
        return Segment(start, start + len(rows), ids, pos, idx)

    def _run_segments(self, first: Segment, chunk: Segment | None) -> tuple[np.ndarray, np.ndarray | None]:
        if chunk is None:
            view = self.backend.view(self._cache, first.start, first.stop)
            return self.backend.forward(view, first.input_ids, first.cache_positions, first.logits_indices), None
        if self.mixed_steps:
            return self.backend.forward_mixed(self._cache, first, chunk)
        # No chunk segment in this graph (an older export, TensorRT): the chunk rows get a forward of their own.
        a = self.backend.forward(self.backend.view(self._cache, first.start, first.stop), first.input_ids,
                                 first.cache_positions, first.logits_indices)
        self.forward_calls += 1
        b = self.backend.forward(self.backend.view(self._cache, chunk.start, chunk.stop), chunk.input_ids,
                                 chunk.cache_positions, chunk.logits_indices)
        return a, b

    def _prompt_done(self, items: list[tuple[Request, Chunk, np.ndarray]]) -> None:
        """Chunks ran: advance each prompt; a chunk that ends its prompt samples the first token (TTFT)."""
        finished = []
        for r, c, lg in items:                                   # lg: (K, V), K = 1 or every position
            if r.prompt_logprobs is not None:
                self._score_prompt(r, c, lg)
            r.prefilled = c.start + c.length
            if c.last:
                finished.append((r, lg[min(c.length - 1, len(lg) - 1)]))
        if finished:
            self._sample([r for r, _ in finished], np.stack([lg for _, lg in finished]))

    def _score_prompt(self, r: Request, c: Chunk, logits: np.ndarray) -> None:
        """Prompt logprobs: position p's logits score prompt token p + 1 (token 0 has no context)."""
        ids = r.row.prompt_ids
        n = min(c.length, len(ids) - 1 - c.start)                # positions whose next token is in the prompt
        if n > 0:
            k = r.row.params.prompt_logprobs
            lp, top_ids, top_lp = sequence_logprobs(logits[:n], np.asarray(ids[c.start + 1:c.start + 1 + n]), k)
            r.prompt_logprobs.extend(TokenLogprob(int(t), float(x), list(zip(ti.tolist(), tl.tolist())))
                                     for t, x, ti, tl in zip(ids[c.start + 1:c.start + 1 + n], lp, top_ids, top_lp))

    def _runs(self, first: list[Request], chunks: list[Request]) -> tuple[int, int, int]:
        """Where each segment's contiguous run of rows starts, and the cache slots that putting them there
        copies: where the rows already are when they form runs (a steady decode: none), else the two
        disjoint runs that cost the fewest cache slots copied: a plan row outside its run moves (its
        filled slots), a running row in the way swaps out and back (twice its filled slots), a held
        prefix row in the way is kept by a copy (its length)."""
        d, k = len(first), len(chunks)
        at, chunk_at = _run_start(first), _run_start(chunks) if chunks else 0
        if at is not None and chunk_at is not None:
            return at, chunk_at, 0
        plan = {r.id for r in first} | {r.id for r in chunks}

        def in_the_way(slot):
            other = self._slots[slot]
            if other is not None:
                return 0 if other.id in plan else 2 * other.filled
            held = self._prefix.held(slot)
            return held.length if held is not None else 0

        way = [in_the_way(j) for j in range(self.max_batch)]

        def costs(rows):                                  # per start of the rows' run
            n = len(rows)
            return [sum(r.filled for r in rows if not a <= r.slot < a + n) + sum(way[a:a + n])
                    for a in range(self.max_batch - n + 1)]
        if not k:
            c = costs(first)
            return c.index(min(c)), 0, min(c)
        cf, cc = costs(first), costs(chunks)
        a, c = min(((a, c) for a in range(len(cf)) for c in range(len(cc)) if a + d <= c or c + k <= a),
                   key=lambda ac: cf[ac[0]] + cc[ac[1]])
        return a, c, cf[a] + cc[c]

    def _arrange(self, placement: list[tuple[Request, int]]) -> None:
        """Put each request in its slot: it moves into a free slot with one row copy, or swaps with the
        slot's holder through the scratch row (three)."""
        scratch = self.max_batch
        self._prefix.written(i for _, i in placement)   # the forward writes every row of the plan
        if len(self._prefix):
            self._keep_held(placement)
        for r, i in placement:
            if r.slot == i:
                continue
            other = self._slots[i]
            if other is None:
                self._move(r, r.slot, i)
            else:
                self._move(other, i, scratch)
                src = r.slot
                self._move(r, src, i)
                self._move(other, scratch, src)

    def _keep_held(self, placement: list[tuple[Request, int]]) -> None:
        """The placement's slots are about to take the plan's rows: a held row in one moves to a free slot
        outside them (an empty one, or one whose content was used less recently), or, when none is free,
        to the slot that its replacement r leaves if that row was written before (through the scratch
        row unless it holds nothing yet); failing both it is dropped (prefix_cache: no fresh row is written
        to keep a row)."""
        taken, scratch = {i for _, i in placement}, self.max_batch
        for r, i in placement:
            row = self._prefix.held(i)
            if row is None:
                continue
            spare = self._prefix.spare([j for j in range(self.max_batch) if j not in taken and self._slots[j] is None], row)
            if spare is not None:
                self._copy(i, spare, row.length, row.draft_length)
                self._prefix.move(i, spare)
            elif r.slot is not None and r.slot not in taken and r.slot < scratch and self._prefix.is_written(r.slot):
                src = r.slot
                self._prefix.move(i, src)              # src is free once r has moved into i
                if r.filled or r.draft_filled:
                    self._copy(i, scratch, row.length, row.draft_length)
                    self._move(r, src, i)
                    self._copy(scratch, src, row.length, row.draft_length)
                else:
                    self._copy(i, src, row.length, row.draft_length)
                    self._move(r, src, i)
            else:
                self._prefix.forget(i)

    def _move(self, r: Request, src: int, dst: int) -> None:
        """Copy r's filled slots from row src to row dst (target and draft pools) and record it there."""
        self._copy_row(src, dst, r.filled)
        if self.draft is not None and r.draft_filled:
            self.draft.copy_row(self._draft_cache, src, dst, r.draft_filled)
        if src < self.max_batch and self._slots[src] is r:
            self._slots[src] = None
        if dst < self.max_batch:
            self._prefix.forget(dst)
            self._prefix.written((dst,))
            self._slots[dst] = r
        r.slot = dst

    def _copy_row(self, src: int, dst: int, n: int) -> None:
        """One row copy in the target pool, timed: the scheduler prices a plan's copies (CostModel.observe_copy)."""
        t0 = time.perf_counter()
        self.backend.copy_row(self._cache, src, dst, n)
        self.cost.observe_copy(n, time.perf_counter() - t0)

    def _decode_alone(self, r: Request) -> float:
        """The lone decoding request with a draft model: a speculative round when it pays, else a plain step."""
        row = r.row
        k_cap = min(self.draft_k, self.capacity - 1 - r.filled, row.params.max_new_tokens - len(row.generated) - 1)
        k, probe = self._policy.choose_k(r.drafts_accepted, r.draft_trials, r.plain_since_round, r.probes, k_cap)
        r.probes += probe
        t0 = time.perf_counter()
        if k >= 1:
            self._speculate(r, k)
            r.plain_since_round = 0
            return time.perf_counter() - t0
        r.plain_since_round += 1
        view = self.backend.view(self._cache, r.slot, r.slot + 1)
        logits = self._forward_guarded([r], lambda: decode_step(self.backend, view, np.array([r.last_token], np.int64),
                                                                 np.array([r.filled], np.int64)))
        dt = time.perf_counter() - t0
        self.cost.observe(Work(decode=1), dt)
        if logits is not None:
            self._sample([r], logits)
        return dt

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
                for r in done:
                    self._free(r)
        for r, d in deltas:
            _deliver(r, d)

    def _free(self, r: Request) -> None:
        """Give r's slot back. Rows are not compacted here: the next plan's `_arrange` moves only what
        its segments need. With prefix caching the row keeps what r fed (its prompt, as far as it got, and
        every generated token but the last) until the slot is needed."""
        slot = r.slot
        self._slots[slot] = None
        self._active.remove(r)
        r.slot = None
        if self.prefix_caching and r.error is None:
            row = _live_row(r)
            row.tokens, row.prefilling = row.tokens[:row.length], False
            self._prefix.hold(slot, row)

    def _finish_unadmitted(self, r: Request, reason: str) -> None:
        r.row.finish_reason = reason
        r.finished = time.perf_counter()
        _deliver(r, r._delta())

    def _fail(self, r: Request, err: BaseException) -> None:
        r.error = err
        r.finished = time.perf_counter()
        _deliver(r, Delta(error=err, request=r))


def _run_start(rows: list[Request]) -> int | None:
    """The first slot of rows that already form one contiguous run, else None."""
    slots = sorted(r.slot for r in rows)
    return slots[0] if slots[-1] - slots[0] == len(slots) - 1 else None


def _stay_put(items: list, start: int, row: Callable[[Any], Request] = lambda r: r) -> list:
    """items reordered for slots [start, start + len(items)): an item whose row already sits in that range
    keeps its slot, the others fill the remaining slots in their order. A segment is any contiguous run
    of rows, so when one row leaves, one row moves into its place (a cache copy of its filled slots:
    ~5 ms per 1000 gpt2 slots on 2 cores), not every row after it."""
    n = len(items)
    placed: list = [None] * n
    movers = []
    for it in items:
        slot = row(it).slot
        if slot is not None and start <= slot < start + n and placed[slot - start] is None:
            placed[slot - start] = it
        else:
            movers.append(it)
    holes = iter(i for i, it in enumerate(placed) if it is None)
    for it in movers:
        placed[next(holes)] = it
    return placed


def _contexts(row: RowState, drafts: list[int]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(prompt + generated + drafts, generated + drafts) when the penalties read them, else None."""
    gen = row.generated + drafts
    ctx = np.asarray(row.prompt_ids + gen, np.int64) if row.params.repetition_penalty != 1.0 else None
    out = np.asarray(gen, np.int64) if row.params.reads_outputs else None
    return ctx, out


def _prompt_array(r: Request) -> np.ndarray:
    if r._prompt_array is None:
        r._prompt_array = np.asarray(r.row.prompt_ids, np.int64)
    return r._prompt_array


def _live_row(r: Request) -> Row:
    """What r's row holds, as the prefix cache reads it: slots [0, filled) hold its prompt then the generated
    tokens fed so far; a prefilling row's whole prompt is given (the rest is on its way)."""
    prompt = _prompt_array(r)
    n = r.filled
    tokens = prompt
    if n > len(prompt):
        tokens = np.concatenate([prompt, np.asarray(r.row.generated[:n - len(prompt)], np.int64)])
    return Row(tokens, n, not r.decoding, r.prompt_logprobs, r.row.params.prompt_logprobs, min(r.draft_filled, n))


def _first_k(e: TokenLogprob, k: int) -> TokenLogprob:
    return e if len(e.top) <= k else TokenLogprob(e.token_id, e.logprob, e.top[:k])


def _expired(r: Request, now: float) -> bool:
    return r.deadline is not None and now >= r.deadline


def _deliver(r: Request, d: Delta) -> None:
    try:
        r.sink(d)
    except Exception:  # noqa: BLE001 -- a consumer gone (closed event loop, say) must not stop the engine
        pass
