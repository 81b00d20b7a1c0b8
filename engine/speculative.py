"""Speculative decoding's accept/resample rule (Leviathan et al. 2023; Chen et al. 2023), pure.

A draft model proposes k tokens d_1..d_k, drawn from its processed distributions q_1..q_k; the target
scores all of them in one forward, giving p_1..p_{k+1} (the same processing: penalties, temperature,
top-k, top-p). Token i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection
the token is drawn from the residual norm(max(0, p_i - q_i)) and the round ends; if all k are accepted
a bonus token is drawn from p_{k+1}. Every emitted token is then distributed exactly as the target's
own sampling would draw it. Greedy parameters make every distribution one-hot, so the rule reduces to
"accept while the draft's argmax equals the target's, then take the target's argmax": the output is
the target's greedy output token for token, and no random number is consumed.
"""

from __future__ import annotations

import numpy as np

from engine.config import GPT2Config

# What a batch-1 decode step reads per matmul weight, in bytes, as measured rather than as stored:
# fp32 decodes at 1.04-1.12x its byte floor, int8 (1 byte + a scale per block) at 1.3-1.5x (ONNX
# Runtime 1.32, 2-core AVX-512 Xeon, docs/bench/README.md), so int8 counts as 1.4.
STEP_BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "int8": 1.4}


def accept_drafts(target_probs: np.ndarray, draft_probs: np.ndarray, drafts: list[int],
                  rng: np.random.Generator, greedy: bool) -> tuple[list[int], int]:
    """The tokens this round emits, and how many drafts were accepted.

    target_probs: float64 (k+1, V)  processed target distributions at the k+1 verified positions
    draft_probs:  float64 (k, V)    processed draft distributions the drafts were drawn from
    drafts:       k proposed token ids
    returns:      (accepted drafts + one token from the target, number accepted in 0..k)
    """
    k = len(drafts)
    assert target_probs.shape[0] == k + 1 and draft_probs.shape[0] == k, (target_probs.shape, draft_probs.shape)
    out: list[int] = []
    for i, d in enumerate(drafts):
        p, q = target_probs[i], draft_probs[i]
        if greedy:
            ok = int(np.argmax(p)) == d
        else:
            ok = rng.random() * q[d] < p[d]      # u < p/q without dividing (q[d] > 0: d was drawn from q)
        if ok:
            out.append(d)
            continue
        if greedy:
            out.append(int(np.argmax(p)))
        else:
            residual = np.maximum(p - q, 0.0)                                       # (V,)
            # Rounding can empty the residual only when p ~= q, where a rejection is all but impossible.
            out.append(draw(residual if residual.sum() > 0 else p, rng))
        return out, i
    last = target_probs[k]
    out.append(int(np.argmax(last)) if greedy else draw(last, rng))
    return out, k


def draw(weights: np.ndarray, rng: np.random.Generator) -> int:
    """One draw from unnormalized weights (V,) by inverse CDF: the single random call."""
    cdf = np.cumsum(weights)
    i = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return min(i, len(weights) - 1)


def draft_cost(target: GPT2Config, target_precision: str, draft: GPT2Config, draft_precision: str) -> float:
    """A draft decode step in target decode steps: the ratio of the matmul weight bytes each reads
    (memory-bound at batch 1; embeddings are gathered, not read whole). gpt2-large fp32 with its int8
    export: 0.35, measured 0.343."""
    def step_bytes(cfg: GPT2Config, precision: str) -> float:
        return (12 * cfg.n_layer * cfg.n_embd ** 2 + cfg.vocab_size * cfg.n_embd) * STEP_BYTES_PER_PARAM[precision]
    return step_bytes(draft, draft_precision) / step_bytes(target, target_precision)


class SpeculationPolicy:
    """When to speculate and how far (k): speculate only when it pays, decided the same way every run.

    A round of k drafts costs k draft steps plus one target forward of k+1 tokens and emits
    (1 - a^(k+1)) / (1 - a) tokens on average, a being the chance that the draft's next token is
    accepted (a draft is judged only while every one before it was). In units of a plain target step:
    T(k) = k * draft_cost + 1 + VERIFY_PER_DRAFT * k. Decoding at batch 1 is memory-bound, so
    draft_cost is the ratio of the weight bytes each model reads per step (draft_cost() above), and
    verifying k+1 tokens costs about one step. Measured on gpt2-large fp32 with its int8 export, batch 1,
    2 threads (AVX-512 Xeon): a draft step 0.343x a target step for a bytes ratio of 0.35, and 2 / 3 / 5
    tokens in one target forward 1.05x / 1.10x / 1.19x one token.

    Each round takes the k in 1..k_max with the best expected tokens per unit of time, if that beats a
    plain step by MARGIN; otherwise the request decodes plainly and probes with k = 1 after PROBE_EVERY
    tokens, then after twice as many each time (up to 8x), so text that becomes easy to draft gets
    speculation back. A probe costs more than its round: the draft first catches up on every token it
    has not seen in one forward, a prefill (compute-bound: measured, gpt2-large at init 0.1, probes every
    32 tokens left decode 1.14x slower than alone). a is the request's own acceptance so far under a
    Beta prior (PRIOR_ACCEPT over PRIOR_TRIALS pseudo-trials: weak, so a good draft reaches k_max within
    a few rounds; with 0.6 over 4, gpt2-large at init 0.02 decoded 0.70x alone, at k = 2-3 for most of
    64 tokens). The choice depends only on the request's own history and the two models, never on
    timings, so a seeded sampled request reproduces run after run. Why a
    policy at all: with k fixed at 4, gpt2-large at init 0.1 (acceptance 0.11) decoded 2.06x slower
    than alone; at init 0.02 (acceptance 1.0) 0.42x (docs/bench/README.md, "CPU speed II").

    always=True proposes k_max (or what fits) every round: the rule itself, for measuring acceptance
    and for tests of low-acceptance exactness.
    """

    PRIOR_ACCEPT, PRIOR_TRIALS = 0.75, 2.0
    PROBE_EVERY = 32        # plain tokens before the first probe; doubled after each (up to 2^MAX_BACKOFF x)
    MAX_BACKOFF = 3
    MARGIN = 1.05
    VERIFY_PER_DRAFT = 0.05

    def __init__(self, k_max: int, draft_cost: float, always: bool = False):
        if not draft_cost > 0:
            raise ValueError(f"draft_cost must be > 0, got {draft_cost!r}")
        self.k_max, self.draft_cost, self.always = k_max, float(draft_cost), always

    @classmethod
    def acceptance(cls, accepted: int, trials: int) -> float:
        return (accepted + cls.PRIOR_ACCEPT * cls.PRIOR_TRIALS) / (trials + cls.PRIOR_TRIALS)

    @staticmethod
    def expected_tokens(a: float, k: int) -> float:
        """Tokens a round of k drafts emits on average (the accepted drafts + the target's own)."""
        return k + 1.0 if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)

    def speedup(self, a: float, k: int) -> float:
        """Expected tokens per unit of time of a k-draft round over plain decoding."""
        return self.expected_tokens(a, k) / (k * self.draft_cost + 1.0 + self.VERIFY_PER_DRAFT * k)

    def choose_k(self, accepted: int, trials: int, plain_since: int, probes: int, k_cap: int) -> tuple[int, bool]:
        """(k for this round, 0: a plain step; whether it is a probe). accepted / trials: the request's
        drafts judged so far; plain_since: its plain steps since its last round; probes: its probe
        rounds so far; k_cap: the most drafts that fit (context, max_new_tokens)."""
        k_cap = min(k_cap, self.k_max)
        if k_cap < 1 or self.always:
            return max(k_cap, 0), False
        a = self.acceptance(accepted, trials)
        best_k, best = 0, self.MARGIN
        for k in range(1, k_cap + 1):
            if (gain := self.speedup(a, k)) > best:
                best_k, best = k, gain
        if best_k == 0 and plain_since >= self.PROBE_EVERY << min(probes, self.MAX_BACKOFF):
            return 1, True                                  # a cheap look at whether drafting pays now
        return best_k, False
