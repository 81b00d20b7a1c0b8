"""Next-token selection on the host: sampling parameters, logits -> probabilities, and the draw.

The pipeline follows Hugging Face `generate` so that its logits processors are the test oracle:
repetition penalty -> temperature -> top-k -> top-p -> softmax. OpenAI's additive adjustments (presence
and frequency penalties over the generated tokens, as vLLM applies them; logit_bias) come right after
the repetition penalty, before the temperature. `logits_to_probs` is pure; the only
randomness is the uniform draw in `sample_next`, from an RNG the caller passes in (one per row, so a
seeded request reproduces no matter what else shares its batch).

Cost: the vocabulary is 50257 wide, but after top-k only a few dozen candidates survive, so the work
over the full vocabulary is a penalty on the context ids, one `argpartition` and one comparison;
sorting and softmax run on the survivors only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np

from engine.errors import InputError

MAX_LOGPROBS = 20   # top alternatives per token at most (logprobs, prompt_logprobs), as vLLM's default limit


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. Validated on construction; every field states its range."""

    max_new_tokens: int = 64         # >= 1; tokens generated at most (stops may end earlier)
    temperature: float = 1.0         # >= 0; 0 means greedy (argmax); < 1 sharpens, > 1 flattens
    top_k: int = 40                  # >= 0; 0 disables; 40 is the GPT-2 paper's compromise
    top_p: float = 1.0               # in (0, 1]; 1 disables; keep the smallest set with mass >= top_p
    repetition_penalty: float = 1.0  # > 0; 1 disables; > 1 discourages tokens already in the context
    seed: int | None = None          # >= 0, or None for a fresh nondeterministic seed
    stop: tuple[str, ...] = ()       # non-empty strings; generation ends before the first match
    stop_at_eos: bool = True         # end the row at <|endoftext|> (vLLM's ignore_eos=True is stop_at_eos=False)
    presence_penalty: float = 0.0    # in [-2, 2]; subtracted once from each token already generated (OpenAI)
    frequency_penalty: float = 0.0   # in [-2, 2]; subtracted per occurrence of a generated token (OpenAI)
    logit_bias: dict[int, float] | None = None  # token id -> bias in [-100, 100], added to its logit (OpenAI)
    logprobs: int | None = None      # None, or 0..20: report each token's logprob and this many top alternatives
    # in [0, max_new_tokens]: tokens generated before <|endoftext|>, a stop token or a stop string may end the
    # row; below it those tokens are masked out of sampling (vLLM's min_tokens)
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()  # token ids >= 0 (< the vocabulary: checked by the Generator); the row
                                          # ends when one is sampled, which is then in neither text nor token_ids
    prompt_logprobs: int | None = None    # None, or 0..20: each prompt token's logprob and this many top
                                          # alternatives, from the prefill forward (vLLM's prompt_logprobs)
    # The model's <|endoftext|> id, which min_tokens masks while stop_at_eos: None until the Generator sets
    # its model's at submission (as vLLM takes it from the model's generation config); not a caller's setting.
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        # A bare string is one stop string (vLLM accepts str | list[str]), not a tuple of characters.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)

        _check_int("max_new_tokens", self.max_new_tokens)
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _check_real("temperature", self.temperature)
        if not self.temperature >= 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        _check_int("top_k", self.top_k)
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (0 disables), got {self.top_k}")
        _check_real("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_real("repetition_penalty", self.repetition_penalty)
        if not self.repetition_penalty > 0:
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None:
            _check_int("seed", self.seed)
            if self.seed < 0:
                raise InputError(f"seed must be >= 0 or None, got {self.seed}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise InputError(f"stop strings must be non-empty strings, got {s!r}")
        if not isinstance(self.stop_at_eos, bool):
            raise InputError(f"stop_at_eos must be a bool, got {self.stop_at_eos!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_real(name, value)
            if not -2 <= value <= 2:
                raise InputError(f"{name} must be in [-2, 2], got {value}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise InputError(f"logit_bias must be a dict of token id -> bias, got {type(self.logit_bias).__name__}")
            bias = {}
            for k, v in self.logit_bias.items():
                try:
                    tid = int(k)  # JSON object keys are strings: "50256" is token 50256
                except (TypeError, ValueError):
                    raise InputError(f"logit_bias keys must be token ids, got {k!r}") from None
                if tid < 0:
                    raise InputError(f"logit_bias keys must be token ids >= 0, got {tid}")
                _check_real(f"logit_bias[{tid}]", v)
                if not -100 <= v <= 100:
                    raise InputError(f"logit_bias values must be in [-100, 100], got {v} for token {tid}")
                bias[tid] = float(v)
            object.__setattr__(self, "logit_bias", bias or None)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value)
                if not 0 <= value <= MAX_LOGPROBS:
                    raise InputError(f"{name} must be in [0, {MAX_LOGPROBS}] (top alternatives per token), got {value}")
        _check_int("min_tokens", self.min_tokens)
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise InputError(f"min_tokens must be in [0, max_new_tokens], got {self.min_tokens} "
                             f"(max_new_tokens is {self.max_new_tokens})")
        ids = self.stop_token_ids
        if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple)):
            raise InputError(f"stop_token_ids must be a list of token ids, got {ids!r}")
        for t in ids:
            _check_int("stop_token_ids", t)
            if t < 0:
                raise InputError(f"stop_token_ids must be token ids >= 0, got {t}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in ids))
        if self.eos_token_id is not None:
            _check_int("eos_token_id", self.eos_token_id)

    def __hash__(self) -> int:  # logit_bias is a dict: hash its items (equal parameters, equal hashes)
        bias = tuple(sorted(self.logit_bias.items())) if self.logit_bias else None
        return hash(tuple(bias if f.name == "logit_bias" else getattr(self, f.name) for f in fields(self)))

    @property
    def reads_outputs(self) -> bool:
        """Whether sampling needs the row's generated ids (presence/frequency penalties; min_tokens counts them)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.min_tokens > 0

    @property
    def min_tokens_masked(self) -> tuple[int, ...]:
        """The ids sampling masks while fewer than min_tokens are generated: stop tokens, and eos unless ignored."""
        eos = (self.eos_token_id,) if self.stop_at_eos and self.eos_token_id is not None else ()
        return self.stop_token_ids + eos

    def for_model(self, eos_token_id: int, vocab_size: int) -> SamplingParams:
        """These parameters checked against a model's vocabulary, with its <|endoftext|> id set (the Generator
        calls this for every request)."""
        for t in self.stop_token_ids:
            if t >= vocab_size:
                raise InputError(f"stop_token_ids: token id {t} is outside the vocabulary [0, {vocab_size})")
        if self.eos_token_id == eos_token_id:
            return self
        if self.eos_token_id is not None:
            raise InputError(f"eos_token_id is set from the model ({eos_token_id}): leave it None, got "
                             f"{self.eos_token_id}")
        return replace(self, eos_token_id=eos_token_id)

    @property
    def is_greedy(self) -> bool:
        """Deterministic argmax: temperature 0, or top-k 1 (a single candidate)."""
        return self.temperature == 0 or self.top_k == 1

    @classmethod
    def greedy(cls, max_new_tokens: int = 64, **kwargs) -> SamplingParams:
        """Greedy decoding, the setting that matches HF `generate(do_sample=False)`."""
        return cls(max_new_tokens=max_new_tokens, temperature=0.0, **kwargs)


def _check_int(name: str, value) -> None:
    # bool is an int subclass; `top_k=True` is a bug at the call site, not a 1.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be an int, got {value!r}")


def _check_real(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InputError(f"{name} must be finite, got {value}")


def make_rng(seed: int | None) -> np.random.Generator:
    """The per-request RNG; a seed makes the request's samples reproducible."""
    return np.random.default_rng(seed)


def _penalize(logits: np.ndarray, penalty: float, context_ids: np.ndarray | None) -> np.ndarray:
    """CTRL/HF repetition penalty on the context's tokens: positive logits shrink, negative grow."""
    if penalty == 1.0 or context_ids is None or len(context_ids) == 0:
        return logits
    out = logits.copy()                                            # (V,)
    seen = np.asarray(context_ids, dtype=np.int64)                 # (L,) repeats are harmless
    x = out[seen]
    out[seen] = np.where(x < 0, x * penalty, x / penalty)
    return out


def _nucleus_size(sorted_probs: np.ndarray, top_p: float) -> int:
    """Length of the shortest head of `sorted_probs` (descending) whose mass is >= top_p.

    The same set HF's TopPLogitsWarper keeps: it drops a token when the mass of the token and of all
    tokens ranked below it is <= 1 - top_p, i.e. when the tokens ranked above it already reach top_p.
    """
    cum = np.cumsum(sorted_probs)
    return min(int(np.searchsorted(cum, top_p, side="left")) + 1, len(sorted_probs))


def _adjust(logits: np.ndarray, params: SamplingParams, output_ids: np.ndarray | None) -> np.ndarray:
    """OpenAI's additive adjustments: presence/frequency penalties on the generated ids, then logit_bias;
    then min_tokens: eos and the stop tokens at -inf while fewer than min_tokens are generated (vLLM's
    MinTokensLogitsProcessor), after the bias so that no bias can bring them back. output_ids None: none yet."""
    n_out = 0 if output_ids is None else len(output_ids)
    penalties = params.presence_penalty != 0 or params.frequency_penalty != 0
    masked = params.min_tokens_masked if n_out < params.min_tokens else ()
    if not penalties and not params.logit_bias and not masked:
        return logits
    out = logits.copy()                                            # (V,)
    if penalties and n_out:
        ids, counts = np.unique(np.asarray(output_ids, np.int64), return_counts=True)
        out[ids] -= np.float32(params.presence_penalty) + np.float32(params.frequency_penalty) * counts
    if params.logit_bias:
        ids = np.fromiter(params.logit_bias, np.int64)
        keep = ids < out.shape[0]                                  # ids past the vocabulary select nothing
        out[ids[keep]] += np.fromiter(params.logit_bias.values(), np.float32)[keep]
    if masked:
        ids = np.asarray(masked, np.int64)
        out[ids[ids < out.shape[0]]] = -np.inf
    return out


def _candidates(logits: np.ndarray, params: SamplingParams, context_ids: np.ndarray | None,
                output_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The tokens that may be drawn and their probabilities: (ids int64 (C,), probs float64 (C,)).

    Sparse so that the draw touches C candidates, not the whole vocabulary.
    """
    assert logits.ndim == 1, logits.shape
    x = _penalize(np.asarray(logits, dtype=np.float32), params.repetition_penalty, context_ids)  # (V,)
    x = _adjust(x, params, output_ids)                                                          # (V,)
    V = x.shape[0]

    if params.is_greedy:
        return np.array([int(np.argmax(x))], dtype=np.int64), np.ones(1)

    # Top-k before temperature selects the same tokens (dividing by T > 0 keeps the order) and lets
    # the temperature touch only the survivors. Ties with the k-th logit stay, as in HF.
    ids = None                                                     # None: every token is a candidate
    if 0 < params.top_k < V:
        part = np.argpartition(x, V - params.top_k)[V - params.top_k:]  # (k,) unordered
        kth = x[part].min()
        ids = part if np.count_nonzero(x >= kth) == params.top_k else np.flatnonzero(x >= kth)
    z = x if ids is None else x[ids]                               # (C,) float32

    # exp in float32 (HF's dtype, and half the cost over a full vocabulary); sums in float64.
    e = np.exp((z - z.max()) / np.float32(params.temperature))    # (C,) unnormalized

    if params.top_p < 1.0:
        total = e.sum(dtype=np.float64)
        # The nucleus is usually a small head: sort the m most likely candidates and widen m until
        # their mass reaches top_p, rather than sorting a whole vocabulary (top_k = 0) every step.
        m = 256
        while True:
            if m >= len(e):
                order = np.argsort(-e, kind="stable")
                n = _nucleus_size(e[order] / total, params.top_p)
                break
            head = np.argpartition(e, len(e) - m)[len(e) - m:]   # (m,) unordered
            order = head[np.argsort(-e[head], kind="stable")]
            n = _nucleus_size(e[order] / total, params.top_p)
            if n < m:
                break
            m *= 4
        keep = order[:n]                                           # (n,) positions in z
        ids = keep if ids is None else ids[keep]
        e = e[keep]

    p = e / e.sum(dtype=np.float64)                                # (C,) float64
    if ids is None:
        ids = np.arange(V)
    return ids.astype(np.int64, copy=False), p


def logits_to_probs(logits: np.ndarray, params: SamplingParams,
                    context_ids: np.ndarray | None = None, output_ids: np.ndarray | None = None) -> np.ndarray:
    """Pure: one row's logits (V,) -> the distribution of its next token, float64 (V,).

    context_ids: the row's prompt and generated tokens so far (for the repetition penalty).
    Greedy parameters give a one-hot distribution at the (penalized) argmax.
    """
    ids, p = _candidates(logits, params, context_ids, output_ids)
    probs = np.zeros(logits.shape[-1], dtype=np.float64)           # (V,)
    probs[ids] = p
    return probs


def sample_next(logits: np.ndarray, params: list[SamplingParams], contexts: list[np.ndarray | None],
                rngs: list[np.random.Generator], outputs: list[np.ndarray | None] | None = None) -> np.ndarray:
    """Pick each row's next token, with that row's parameters, context and RNG.

    logits:   float32 (B, V), the last position of each row
    params:   B SamplingParams; rows of one batch may differ
    contexts: B int arrays, each row's prompt + generated ids (for the repetition penalty; None: no penalty)
    rngs:     B generators; a row left with one candidate (greedy, say) does not consume its RNG
    outputs:  B int arrays of each row's generated ids (presence/frequency penalties, min_tokens), or None
    returns:  int64 (B,)
    """
    B = logits.shape[0]
    assert len(params) == len(contexts) == len(rngs) == B, (B, len(params), len(contexts), len(rngs))
    out = np.empty(B, dtype=np.int64)                              # (B,)
    for b in range(B):
        ids, p = _candidates(logits[b], params[b], contexts[b], None if outputs is None else outputs[b])
        if len(ids) == 1:
            out[b] = ids[0]
            continue
        # Inverse CDF: the single random call. `u * total` guards against the sum drifting off 1.
        cdf = np.cumsum(p)
        i = int(np.searchsorted(cdf, rngs[b].random() * cdf[-1], side="right"))
        out[b] = ids[min(i, len(ids) - 1)]
    return out


def top_logprobs(logits: np.ndarray, token: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-softmax of one row's raw logits (V,) at `token`, and its n most likely (id, logprob) pairs.

    Raw: before penalties, temperature and truncation, as OpenAI and vLLM (by default) report them.
    """
    x = np.asarray(logits, np.float64)                             # (V,)
    m = x.max()
    lse = m + np.log(np.exp(x - m).sum())
    top = []
    if n > 0:
        part = np.argpartition(-x, n - 1)[:n]                      # (n,) unordered
        top = [(int(i), float(x[i] - lse)) for i in part[np.argsort(-x[part], kind="stable")]]
    return float(x[token] - lse), top


def sequence_logprobs(logits: np.ndarray, next_ids: np.ndarray, k: int,
                      rows: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised `top_logprobs` over a whole sequence: row t's log-softmax (raw logits) at next_ids[t], and
    its k most likely ids with their logprobs, most likely first.

    logits:   float32 (T, V), e.g. a prefill forward's logits at every prompt position
    next_ids: int64 (T,), the token each row is scored on (for prompt logprobs: the prompt shifted by one)
    returns:  (logprob float32 (T,), top ids int64 (T, k), top logprobs float32 (T, k))

    The top k of the logits are the top k of the log-softmax (one shift per row), so the full (T, V)
    log-softmax is never formed: one exp pass for each row's log-sum-exp (summed in float64, as
    `top_logprobs` does) and one argpartition per row; `rows` rows at a time bound the temporaries
    (64 x 50257 float32: 13 MB).
    """
    x = np.asarray(logits, np.float32)                             # (T, V)
    nxt = np.asarray(next_ids, np.int64)                           # (T,)
    T, V = x.shape
    assert nxt.shape == (T,), (nxt.shape, T)
    assert 0 <= k <= V, (k, V)
    lp = np.empty(T, np.float32)                                   # (T,)
    top_ids = np.empty((T, k), np.int64)                           # (T, k)
    top_lp = np.empty((T, k), np.float32)                          # (T, k)
    for s in range(0, T, rows):
        c = x[s:s + rows]                                          # (R, V)
        m = c.max(axis=-1, keepdims=True)                          # (R, 1)
        lse = m[:, 0] + np.log(np.exp(c - m).sum(axis=-1, dtype=np.float64))     # (R,) float64
        r = np.arange(len(c))
        lp[s:s + rows] = c[r, nxt[s:s + rows]] - lse
        if k == 0:
            continue
        if k == 1:
            part = c.argmax(axis=-1)[:, None]                      # (R, 1)
        else:
            part = np.argpartition(c, V - k, axis=-1)[:, V - k:]   # (R, k) unordered
            vals = np.take_along_axis(c, part, axis=-1)            # (R, k)
            part = np.take_along_axis(part, np.argsort(-vals, axis=-1, kind="stable"), axis=-1)
        top_ids[s:s + rows] = part
        top_lp[s:s + rows] = np.take_along_axis(c, part, axis=-1) - lse[:, None]
    return lp, top_ids, top_lp
