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
