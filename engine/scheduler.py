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
     nothing until its prompt is written). Aborted or expired requests are dropped by the loop first.
  2. Prompt tokens per iteration come from the cost model, `CostModel`: a forward costs
     fixed + per_token x tokens (the fixed part is the weight read, fitted online from every forward
     the loop times). While rows decode, a step carrying prompt tokens may cost at most ITL_STRETCH
     times a full batch's decode step (`max_batch` rows), which bounds the decoding rows' inter-token
     latency, and never fewer than MIN_CHUNK prompt tokens (progress for long prompts). With nothing
     decoding, nobody waits on the step: prompts go whole (up to MAX_IDLE_TOKENS per forward).
  3. Within the budget the earliest prompts go first, several together when their padded tokens
     fit (chunk rows share one length): requests that arrive together get their first tokens from
     the same forward. A prompt longer than the budget is chunked over several iterations.
Rows are never preempted: the pool holds every admitted request's cache to its end.
"""

from __future__ import annotations

from dataclasses import dataclass

ITL_STRETCH = 1.4       # a step with prompt tokens costs at most this x a full batch's decode step
MIN_CHUNK = 16          # prompt tokens per iteration at least, while rows decode
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


class CostModel:
    """A forward's time as fixed + per_token x tokens, fitted by exponentially weighted least squares
    over the forwards the loop observes (decode steps of various batch sizes, mixed steps). Until two
    different token counts are seen, per_token is PRIOR_TOKENS_PER_FIXED-th of the fixed part (gpt2 on
    2 cores: a 16-token chunk adds ~50% to a decode step)."""

    DECAY = 0.95                 # weight of the past per observation (~20 forwards of memory)
    PRIOR_TOKENS_PER_FIXED = 32  # before a fit: 32 tokens cost one fixed part

    def __init__(self):
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        d = self.DECAY
        self._w = d * self._w + 1.0
        self._x = d * self._x + tokens
        self._y = d * self._y + seconds
        self._xx = d * self._xx + tokens * tokens
        self._xy = d * self._xy + tokens * seconds

    @property
    def known(self) -> bool:
        return self._w > 0

    def fit(self) -> tuple[float, float]:
        """(fixed seconds, seconds per token); (0, 0) before any observation."""
        if not self._w:
            return 0.0, 0.0
        mx, my = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mx * mx
        if var > 1e-9 * max(mx * mx, 1.0):
            slope = (self._xy / self._w - mx * my) / var
            fixed = my - slope * mx
            # Noise can tilt a fit: keep both parts positive and the slope below a whole forward per token.
            if slope > 0 and fixed > 0:
                return fixed, slope
        # One token count seen (or a degenerate fit): the prior's split of the mean time.
        fixed = my / (1 + mx / self.PRIOR_TOKENS_PER_FIXED)
        return fixed, fixed / self.PRIOR_TOKENS_PER_FIXED

    def predict(self, tokens: int) -> float:
        fixed, per = self.fit()
        return fixed + per * tokens

    def tokens_within(self, seconds: float) -> int:
        """Tokens that `seconds` of forward time buys beyond the fixed part."""
        _, per = self.fit()
        return int(seconds / per) if per > 0 else 0


def prompt_budget(n_decoding: int, max_batch: int, cost: CostModel) -> int:
    """Prompt tokens this iteration may carry (padding included)."""
    if n_decoding == 0:
        return MAX_IDLE_TOKENS
    if not cost.known:
        return MIN_CHUNK
    allowed = ITL_STRETCH * cost.predict(max_batch) - cost.predict(n_decoding)
    return max(MIN_CHUNK, cost.tokens_within(allowed))


def schedule(rows: list[RowInfo], budget: int, capacity: int, max_prompt: int = 0,
             max_rows: int | None = None) -> StepPlan:
    """Plan one forward over the admitted requests (`rows`, in arrival order).

    budget:     prompt tokens this step may carry, padding included (prompt_budget)
    capacity:   cache slots per row: a padded chunk must not run past it
    max_prompt: the backend's longest prefill per forward (0: no limit)
    max_rows:   the backend's most rows per forward (None: no limit)
    """
    decode = tuple(r.key for r in rows if r.decoding)
    pending = [r for r in rows if not r.decoding and r.prefilled < r.prompt_len]
    limit = min(budget, max_prompt) if max_prompt else budget
    first = None
    if not decode and pending:
        r = pending.pop(0)
        n = min(r.prompt_len - r.prefilled, limit)
        first = Chunk(r.key, r.prefilled, n, r.prefilled + n == r.prompt_len)
        budget -= n
    room = None if max_rows is None else max_rows - len(decode)
    chunks, T = _pack(pending, max(budget, 0), capacity, max_prompt, room)
    return StepPlan(decode, first, chunks, T)


def _pack(pending: list[RowInfo], budget: int, capacity: int, max_prompt: int,
          room: int | None) -> tuple[tuple[Chunk, ...], int]:
    """The earliest prompts that fit `budget` padded tokens as one chunk segment: for each prefix of
    k rows, T = the longest remaining prompt capped at budget // k; keep the k with the best score,
    the real tokens fed plus COMPLETION_BONUS per prompt completed (a first token now rather than one
    step later), the earliest k on a tie."""
    best: tuple[int, int, int] = (0, 0, 0)   # (score, k, T)
    for k in range(1, len(pending) + 1):
        if room is not None and k > room:
            break
        rows = pending[:k]
        T = min(max(r.prompt_len - r.prefilled for r in rows), budget // k)
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
