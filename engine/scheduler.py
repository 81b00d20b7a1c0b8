"""What one engine iteration does, decided as data: a pure function of the requests and a cost model.

The loop (engine/core.py) asks `schedule()` for a StepPlan, arranges the slot pool to fit it, runs it
as one forward and samples; the plan is what tests read, with no backend, threads or clocks here.
vLLM v1's split (Scheduler -> SchedulerOutput -> model runner), at the size of one CPU process.

One forward per iteration. Every weight matmul reads its weights once per forward (at batch 8 on 2
cores a decode step costs ~1.3x a batch-1 step, a separate prefill forward costs a whole step more),
so a prompt never gets a forward of its own while rows decode: its tokens ride in the decode step's
forward, as the graph's chunk segment (export/graph.py). Two segments, ONNX Runtime's limits:
  - first segment (GroupQueryAttention): the decoding rows, one token each; when nothing decodes,
    one prompt chunk (any position) instead, so the segment is never empty (ORT crashes on that);
  - chunk segment (elementary-ops attention): prompt chunks of any rows at any positions, right-padded
    to one length T; it may be empty.

Admission policy (stated here, measured in docs/bench):
  1. Waiting requests take free slots in arrival order, all that fit, every iteration (a slot costs
     nothing until its prompt is written). Aborted or expired requests are dropped by the loop first;
     an idle loop lets a burst of arrivals finish arriving before it plans (engine/core.py).
  2. Prompt work per iteration is priced by the cost model, `CostModel`: a forward costs
     fixed + per_row x decoding rows + per_token x prompt tokens + per_slot x the cache slots the chunk
     segment's attention reads (its rows x the longest row's length L: it slices and scores [0, L) of
     every chunk row), fitted online from every forward the loop times. While rows decode, the prompt
     work of a step may add at most what makes it ITL_STRETCH times a full batch's decode step
     (`max_batch` rows), which bounds the decoding rows' inter-token latency; the earliest prompt
     still gets MIN_CHUNK tokens (progress for a long prompt deep into its cache). The row copies that
     arranging the pool for a plan needs (engine/core.py: each segment a contiguous run of rows) run in
     the same iteration, so they are paid from the same budget, at the copy rate the loop measures
     (`CostModel.observe_copy`): a step that moves a long row carries fewer prompt tokens. With nothing
     decoding, nobody waits on the step: prompts go whole (up to MAX_IDLE_TOKENS per forward).
  3. Within the budget the earliest prompts go first, several together when they fit (chunk rows
     share one padded length): requests that arrive together get their first tokens from the same
     forward. A prompt longer than the budget is chunked over several iterations.
Rows are never preempted: the pool holds every admitted request's cache to its end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ITL_STRETCH = 1.25      # a step with prompt tokens: at most this x a full batch's decode step (docs/bench: 1.3 read 1.5x)
MIN_CHUNK = 4           # prompt tokens per iteration at least for the earliest prompt, while rows decode
MAX_IDLE_TOKENS = 4096  # prompt tokens (padded) per forward when nothing decodes: bounds activations
COMPLETION_BONUS = 2    # packing: a prompt completed this step is worth this many more tokens fed


@dataclass(frozen=True)
class RowInfo:
    """What the scheduler reads of an admitted request."""

    key: int            # the request's id, in arrival order
    prompt_len: int     # prompt tokens
    prefilled: int      # prompt tokens in the cache
    decoding: bool      # its prompt is in and it has a token to feed


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens [start, start + length) of request `key`, fed at cache positions start..."""

    key: int
    start: int
    length: int
    last: bool          # the chunk ends the prompt: its logits give the first token


@dataclass(frozen=True)
class Work:
    """What a forward does, in the terms the cost model prices."""

    decode: int = 0     # rows feeding one token each
    prompt: int = 0     # prompt tokens through the matmuls, padding included
    slots: int = 0      # cache slots the chunk segment's attention reads: its rows x L


@dataclass(frozen=True)
class Budget:
    """The prompt work one iteration may carry: padded tokens, and predicted seconds (with a cost model)."""

    tokens: int
    seconds: float = math.inf


@dataclass(frozen=True)
class StepPlan:
    decode: tuple[int, ...]          # requests feeding one token each: the first segment's rows
    first_chunk: Chunk | None        # nothing decodes: a prompt chunk takes the first segment
    chunks: tuple[Chunk, ...]        # the chunk segment's rows, padded to chunk_len
    chunk_len: int                   # T of the chunk segment (0: empty)

    @property
    def tokens(self) -> int:
        """Tokens through the matmuls (padding included): what the cost model prices."""
        return len(self.decode) + (self.first_chunk.length if self.first_chunk else 0) + len(self.chunks) * self.chunk_len

    @property
    def empty(self) -> bool:
        return not self.decode and self.first_chunk is None

    @property
    def work(self) -> Work:
        L = max((c.start for c in self.chunks), default=0) + self.chunk_len   # the graph's attended length
        return Work(len(self.decode), self.tokens - len(self.decode), len(self.chunks) * L if self.chunks else 0)


class CostModel:
    """A forward's time as a linear function of its Work: fixed + per_row x decode + per_token x prompt
    + per_slot x slots, fitted by exponentially weighted least squares over the forwards the loop
    observes, pulled towards a prior (ridge) where the observations say little: a term that no forward
    has exercised yet keeps its prior share of the first forward's time. One observation far above its
    prediction (a page fault storm, another process) counts as OUTLIER x the prediction.

    Measured on gpt2 fp32, 2 cores (docs/bench, issue 21): fixed ~12 ms, ~1.3 ms a decoding row (its LM
    head row), ~1 ms a prompt token, ~15 ms per 1000 chunk slots (a chunk row at L = 500 costs ~8 ms:
    the attention's slices of the cache); a fit over fixed + tokens alone missed such steps by up to 18 ms."""

    DECAY = 0.97                            # weight of the past per observation (~30 forwards of memory)
    PRIOR = (1.0, 1 / 12, 1 / 16, 1.0)     # coefficients in units of the fixed part (slots per 1000)
    SCALE = (1.0, 4.0, 16.0, 1.0)          # a feature's typical size: the ridge weighs coefficients by it
    RIDGE = 0.5                             # the prior's weight, in observations
    OUTLIER = 2.0
    WARM = 8                                # observations before outliers are capped

    COPY_MIN_SLOTS = 32                     # shorter row copies time their call overhead, not the slots

    def __init__(self):
        self._A = np.zeros((4, 4))
        self._b = np.zeros(4)
        self._n = 0
        self._prior: np.ndarray | None = None
        self._coef: np.ndarray | None = None
        self._copy_s_per_slot = 0.0             # a row copy's seconds per cache slot (0: none timed yet)

    def observe_copy(self, slots: int, seconds: float) -> None:
        """A row copy of `slots` cache slots took `seconds` (host time between forwards)."""
        if slots >= self.COPY_MIN_SLOTS:
            rate = seconds / slots
            old = self._copy_s_per_slot
            self._copy_s_per_slot = rate if old == 0.0 else self.DECAY * old + (1 - self.DECAY) * min(rate, self.OUTLIER * old)

    def predict_copy(self, slots: int) -> float:
        """Seconds to copy `slots` cache slots between rows (0 before any copy was timed)."""
        return self._copy_s_per_slot * slots

    @staticmethod
    def _features(w: Work) -> np.ndarray:
        return np.array([1.0, w.decode, w.prompt, w.slots / 1000.0])

    def observe(self, work: Work, seconds: float) -> None:
        x = self._features(work)
        if self._prior is None:      # the prior's fixed part: what makes it predict this first forward
            self._prior = np.array(self.PRIOR) * seconds / float(np.array(self.PRIOR) @ x)
        if self._n >= self.WARM:
            seconds = min(seconds, self.OUTLIER * self.predict(work))
        self._A = self.DECAY * self._A + np.outer(x, x)
        self._b = self.DECAY * self._b + x * seconds
        self._n += 1
        self._coef = None

    @property
    def known(self) -> bool:
        return self._prior is not None

    def coefficients(self) -> tuple[float, float, float, float]:
        """(fixed s, s per decoding row, s per prompt token, s per 1000 chunk slots); zeros before any
        observation. Each is kept >= 0."""
        if self._prior is None:
            return 0.0, 0.0, 0.0, 0.0
        if self._coef is None:
            D = self.RIDGE * np.diag(np.square(self.SCALE))
            coef = np.linalg.solve(self._A + D, self._b + D @ self._prior)
            self._coef = np.maximum(coef, 0.0)
        return tuple(float(c) for c in self._coef)

    def fit(self) -> tuple[float, float]:
        """(fixed seconds, seconds per prompt token); (0, 0) before any observation."""
        c = self.coefficients()
        return c[0], c[2]

    def predict(self, work: Work) -> float:
        return float(np.dot(self.coefficients(), self._features(work)))

    def chunk_len_within(self, seconds: float, rows: int, max_start: int) -> int:
        """The longest T such that `rows` chunk rows of T tokens (the furthest starting at max_start)
        add at most `seconds` to a forward: rows x (per_token x T + per_slot x (max_start + T))."""
        _, _, per_token, per_slot = self.coefficients()
        per_slot /= 1000.0
        per_T = rows * (per_token + per_slot)
        left = seconds - rows * per_slot * max_start
        if per_T <= 0:
            return MAX_IDLE_TOKENS if left >= 0 else 0
        return max(int(left / per_T), 0)


def step_budget(n_decoding: int, max_batch: int, cost: CostModel) -> Budget:
    """The prompt work this iteration may carry (policy 2)."""
    if n_decoding == 0:
        return Budget(MAX_IDLE_TOKENS)
    if not cost.known:
        return Budget(MIN_CHUNK)
    allowed = ITL_STRETCH * cost.predict(Work(decode=max_batch)) - cost.predict(Work(decode=n_decoding))
    return Budget(MAX_IDLE_TOKENS, max(allowed, 0.0))


def schedule(rows: list[RowInfo], budget: Budget | int, capacity: int, max_prompt: int = 0,
             max_rows: int | None = None, cost: CostModel | None = None) -> StepPlan:
    """Plan one forward over the admitted requests (`rows`, in arrival order).

    budget:     the prompt work this step may carry (step_budget; an int: padded tokens only);
                its seconds are priced by `cost`
    capacity:   cache slots per row: a padded chunk must not run past it
    max_prompt: the backend's longest prefill per forward (0: no limit)
    max_rows:   the backend's most rows per forward (None: no limit)
    """
    if isinstance(budget, int):
        budget = Budget(budget)
    if math.isfinite(budget.seconds) and cost is None:
        raise ValueError("a budget in seconds needs the cost model that prices it")
    decode = tuple(r.key for r in rows if r.decoding)
    pending = [r for r in rows if not r.decoding and r.prefilled < r.prompt_len]
    tokens = budget.tokens
    limit = min(tokens, max_prompt) if max_prompt else tokens
    first = None
    if not decode and pending:   # nothing decodes: the budget has no seconds (step_budget)
        r = pending.pop(0)
        n = min(r.prompt_len - r.prefilled, limit)
        first = Chunk(r.key, r.prefilled, n, r.prefilled + n == r.prompt_len)
        tokens -= n
    room = None if max_rows is None else max_rows - len(decode)
    priced = (lambda k, max_start: cost.chunk_len_within(budget.seconds, k, max_start)) \
        if math.isfinite(budget.seconds) else None
    chunks, T = _pack(pending, max(tokens, 0), capacity, max_prompt, room, priced, bool(decode))
    return StepPlan(decode, first, chunks, T)


def _pack(pending: list[RowInfo], budget: int, capacity: int, max_prompt: int, room: int | None,
          priced=None, progress: bool = False) -> tuple[tuple[Chunk, ...], int]:
    """The earliest prompts that fit `budget` padded tokens (and `priced(k, max_start)`, the longest T
    that k rows may take within the budget's seconds) as one chunk segment: for each prefix of k rows,
    T = the longest remaining prompt capped by both; keep the k with the best score, the real tokens
    fed plus COMPLETION_BONUS per prompt completed (a first token now rather than one step later), the
    earliest k on a tie. `progress`: the earliest prompt gets MIN_CHUNK tokens whatever the price."""
    best: tuple[int, int, int] = (0, 0, 0)   # (score, k, T)
    for k in range(1, len(pending) + 1):
        if room is not None and k > room:
            break
        rows = pending[:k]
        T = min(max(r.prompt_len - r.prefilled for r in rows), budget // k)
        if priced is not None:
            floor = min(MIN_CHUNK, rows[0].prompt_len - rows[0].prefilled) if k == 1 and progress else 0
            T = min(T, max(priced(k, max(r.prefilled for r in rows)), floor))
        T = min([T] + [capacity - r.prefilled for r in rows])    # a padded tail stays in the row
        if max_prompt:
            T = min(T, max_prompt)
        if T < 1:
            break
        real = sum(min(r.prompt_len - r.prefilled, T) for r in rows)
        score = real + COMPLETION_BONUS * sum(r.prompt_len - r.prefilled <= T for r in rows)
        if score > best[0]:
            best = (score, k, T)
    _, k, T = best
    chunks = tuple(Chunk(r.key, r.prefilled, min(r.prompt_len - r.prefilled, T),
                         r.prefilled + min(r.prompt_len - r.prefilled, T) == r.prompt_len) for r in pending[:k])
    return chunks, T if chunks else 0
