"""Sampling: parameter validation, the support of top-k / top-p, reproducibility, per-row parameters,
and parity with Hugging Face's logits processors (exact probabilities and sampled frequencies)."""

import dataclasses
import math

import numpy as np
import pytest

from engine.errors import InputError
from engine.sampling import SamplingParams, logits_to_probs, make_rng, sample_next, sequence_logprobs, top_logprobs

V = 50257  # GPT-2's vocabulary, so the full-width code paths are the ones exercised


def gpt2_like_logits(seed: int, scale: float = 3.0, width: int = V) -> np.ndarray:
    """float32 (width,): a spread like a real LM's, with a clear head and a long tail."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(width) * scale).astype(np.float32)


# --- validation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(top_k=-1), "top_k must be >= 0 (0 disables), got -1"),
    (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
    (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
    (dict(top_p=-0.1), "top_p must be in (0, 1], got -0.1"),
    (dict(temperature=-0.5), "temperature must be >= 0, got -0.5"),
    (dict(temperature=float("nan")), "temperature must be finite, got nan"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1, got 0"),
    (dict(max_new_tokens=-3), "max_new_tokens must be >= 1, got -3"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0, got 0.0"),
    (dict(repetition_penalty=-1.0), "repetition_penalty must be > 0, got -1.0"),
    (dict(stop=("ok", "")), "stop strings must be non-empty strings, got ''"),
    (dict(stop=[3]), "stop strings must be non-empty strings, got 3"),
    (dict(top_k=2.5), "top_k must be an int, got 2.5"),
    (dict(max_new_tokens=True), "max_new_tokens must be an int, got True"),
    (dict(seed=-1), "seed must be >= 0 or None, got -1"),
    (dict(max_new_tokens=4, min_tokens=5), "min_tokens must be in [0, max_new_tokens], got 5 (max_new_tokens is 4)"),
    (dict(min_tokens=-1), "min_tokens must be in [0, max_new_tokens], got -1 (max_new_tokens is 64)"),
    (dict(min_tokens=1.0), "min_tokens must be an int, got 1.0"),
    (dict(stop_token_ids=[5, -2]), "stop_token_ids must be token ids >= 0, got -2"),
    (dict(stop_token_ids=[True]), "stop_token_ids must be an int, got True"),
    (dict(stop_token_ids=7), "stop_token_ids must be a list of token ids, got 7"),
    (dict(prompt_logprobs=21), "prompt_logprobs must be in [0, 20] (top alternatives per token), got 21"),
    (dict(logprobs=-1), "logprobs must be in [0, 20] (top alternatives per token), got -1"),
])
def test_bad_parameters_name_the_range(kwargs, message):
    with pytest.raises(InputError) as e:
        SamplingParams(**kwargs)
    assert str(e.value) == message
    assert isinstance(e.value, ValueError)  # callers that only know ValueError still catch it


def test_defaults_and_conversions():
    p = SamplingParams()
    assert (p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.repetition_penalty) == (64, 1.0, 40, 1.0, 1.0)
    assert p.stop == () and p.stop_at_eos and p.seed is None and not p.is_greedy
    assert SamplingParams(stop=["\n\n", "END"]).stop == ("\n\n", "END")
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams(top_k=1).is_greedy and SamplingParams(temperature=0).is_greedy
    g = SamplingParams.greedy(max_new_tokens=5)
    assert g.is_greedy and g.max_new_tokens == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.top_k = 3  # frozen: a request's parameters cannot change under it
    assert (p.min_tokens, p.stop_token_ids, p.prompt_logprobs, p.eos_token_id) == (0, (), None, None)
    assert SamplingParams(stop_token_ids=[3, np.int64(9)]).stop_token_ids == (3, 9)


def test_for_model_sets_eos_and_checks_the_vocabulary():
    p = SamplingParams(stop_token_ids=[10])
    bound = p.for_model(50256, V)
    assert bound.eos_token_id == 50256 and bound.for_model(50256, V) is bound
    with pytest.raises(InputError, match=r"stop_token_ids: token id 10 is outside the vocabulary \[0, 10\)"):
        p.for_model(9, 10)
    with pytest.raises(InputError, match="eos_token_id is set from the model"):
        SamplingParams(eos_token_id=3).for_model(50256, V)


# --- support and determinism -----------------------------------------------------------------------

def draw(logits, params, n, seed=0, context=None):
    """n single-row draws from one RNG, as a generation loop would make them."""
    rng = make_rng(seed)
    ctx = np.array([], dtype=np.int64) if context is None else context
    return np.array([sample_next(logits[None], [params], [ctx], [rng])[0] for _ in range(n)])


def test_top_k_never_draws_outside_the_k_best():
    logits = gpt2_like_logits(1, scale=0.5)  # flat: many tokens beyond the k best stay likely
    params = SamplingParams(top_k=10, temperature=2.0)
    got = draw(logits, params, 3000)
    best = set(np.argsort(-logits)[:10].tolist())
    assert set(got.tolist()) <= best
    assert len(set(got.tolist())) == 10  # ... and uses all of them


def test_top_p_never_draws_outside_the_nucleus():
    # A flat tail under a head of 6 tokens, 0.25 0.2 0.15 0.1 0.1 0.08 of the mass (0.12 in the tail):
    # top_p = 0.6 needs exactly the first 3 (0.25 + 0.2 = 0.45 < 0.6 <= 0.6), and the 4th carries 10%,
    # so keeping one too many or one too few shows up within a few hundred draws.
    head = np.array([0.25, 0.2, 0.15, 0.1, 0.1, 0.08])
    # the tail is jittered as real logits are: exact ties over the vocabulary make np.argpartition
    # (introselect) ~20x slower, which would only slow this test down
    tail = np.random.default_rng(0).uniform(0.9, 1.1, V)
    probs = tail * 0.12 / tail.sum()
    head_ids = np.array([9, 50000, 77, 3, 40000, 12345])
    probs[head_ids] = head
    logits = np.log(probs).astype(np.float32)
    got = draw(logits, SamplingParams(top_k=0, top_p=0.6), 1000)
    assert set(got.tolist()) == set(head_ids[:3].tolist())
    # the nucleus is not a top-k in disguise: with top_k=5 as well, top-p still cuts at 3
    got = draw(logits, SamplingParams(top_k=5, top_p=0.6), 1000)
    assert set(got.tolist()) == set(head_ids[:3].tolist())


def test_fixed_seed_reproduces():
    logits = gpt2_like_logits(3)
    params = SamplingParams(top_k=40, top_p=0.95, temperature=0.9)
    a, b = draw(logits, params, 200, seed=1234), draw(logits, params, 200, seed=1234)
    c = draw(logits, params, 200, seed=4321)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_greedy_is_argmax_after_the_repetition_penalty():
    logits = gpt2_like_logits(4)
    top2 = np.argsort(-logits)[:2]
    assert logits[top2[0]] > 0
    rng = make_rng(0)
    state = rng.bit_generator.state
    got = sample_next(logits[None], [SamplingParams.greedy()], [np.array([], np.int64)], [rng])
    assert got[0] == top2[0]
    assert rng.bit_generator.state == state  # greedy consumed no randomness
    # A strong penalty on the best token hands the argmax to the runner-up (HF do_sample=False + penalty).
    penalty = float(logits[top2[0]] / logits[top2[1]]) * 1.01
    ctx = np.array([top2[0]], np.int64)
    got = sample_next(logits[None], [SamplingParams.greedy(repetition_penalty=penalty)], [ctx], [rng])
    assert got[0] == top2[1]
    one_hot = logits_to_probs(logits, SamplingParams.greedy(repetition_penalty=penalty), ctx)
    assert one_hot[top2[1]] == 1.0 and one_hot.sum() == 1.0


def test_per_row_parameters_in_one_batch():
    logits = np.stack([gpt2_like_logits(5), gpt2_like_logits(6), gpt2_like_logits(7)])  # (3, V)
    params = [SamplingParams.greedy(), SamplingParams(top_k=3, seed=1), SamplingParams(top_k=0, seed=2)]
    ctx = [np.array([], np.int64)] * 3
    rows = {0: set(), 1: set(), 2: set()}
    rngs = [make_rng(p.seed) for p in params]
    for _ in range(150):
        for b, t in enumerate(sample_next(logits, params, ctx, rngs)):
            rows[b].add(int(t))
    assert rows[0] == {int(np.argmax(logits[0]))}
    assert rows[1] <= set(np.argsort(-logits[1])[:3].tolist()) and len(rows[1]) == 3
    assert len(rows[2]) > 3  # no top-k: draws well outside any small head
    # A row's draws depend only on its own RNG and parameters, not on its neighbours.
    rng = make_rng(1)
    alone = [sample_next(logits[1:2], params[1:2], ctx[:1], [rng])[0] for _ in range(20)]
    rngs = [make_rng(p.seed) for p in params]
    batched = [sample_next(logits, params, ctx, rngs)[1] for _ in range(20)]
    assert batched == alone and len(set(alone)) > 1


# --- parity with Hugging Face's logits processors ---------------------------------------------------

HF_ORDER = ("penalty", "temperature", "top_k", "top_p")  # `generate`'s order


def hf_probs(logits: np.ndarray, params: SamplingParams, context: np.ndarray,
             order: tuple[str, ...] = HF_ORDER) -> np.ndarray:
    """The oracle: HF's processors, each only when enabled, then softmax. `order` exists so the
    tests can show that a wrong order would be caught."""
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    enabled = {
        "penalty": params.repetition_penalty != 1.0
        and lp.RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty)),
        "temperature": params.temperature != 1.0 and lp.TemperatureLogitsWarper(float(params.temperature)),
        "top_k": params.top_k != 0 and lp.TopKLogitsWarper(params.top_k),
        "top_p": params.top_p < 1.0 and lp.TopPLogitsWarper(float(params.top_p)),
    }
    ids = torch.from_numpy(context.astype(np.int64))[None]          # (1, L)
    scores = torch.from_numpy(logits.copy())[None]                   # (1, V)
    for name in order:
        if enabled[name]:
            scores = enabled[name](ids, scores)
    return torch.softmax(scores.double(), dim=-1)[0].numpy()        # (V,)


def penalty_context(logits: np.ndarray) -> np.ndarray:
    """Context ids that make the penalty matter: some of the best tokens, one negative logit, repeats."""
    order = np.argsort(-logits)
    return np.array([order[0], order[3], order[3], order[7], order[12], order[-1], 17, 17], np.int64)


PARITY_CASES = [
    SamplingParams(),                                                             # GPT-2 default: k=40
    SamplingParams(repetition_penalty=1.3, temperature=0.7, top_k=40, top_p=0.9),
    SamplingParams(repetition_penalty=0.8, temperature=1.5, top_k=0, top_p=0.8),  # full-vocab nucleus
    SamplingParams(temperature=1.2, top_k=0, top_p=1.0),                          # plain softmax
    SamplingParams(temperature=0.5, top_k=5),
    SamplingParams(repetition_penalty=2.0, top_k=100, top_p=0.6),
]


@pytest.mark.parametrize("params", PARITY_CASES, ids=lambda p: f"rp{p.repetition_penalty}-t{p.temperature}"
                         f"-k{p.top_k}-p{p.top_p}")
def test_probabilities_match_hf_processors(params):
    # GPT-2's real logits are mostly negative (around -100 for gpt2): the penalty must multiply those
    for seed, offset in ((10, 0.0), (11, -15.0)):
        logits = gpt2_like_logits(seed) + np.float32(offset)
        ctx = penalty_context(logits)
        want = hf_probs(logits, params, ctx)
        got = logits_to_probs(logits, params, ctx)
        assert np.array_equal(got > 0, want > 0), "different support"
        assert np.abs(got - want).max() < 1e-6
        assert abs(got.sum() - 1) < 1e-12


def chi2_quantile(df: int, z: float) -> float:
    """Upper quantile of chi-square(df) at standard-normal score z (Wilson-Hilferty; no scipy here)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_sampled_frequencies_match_hf_processors():
    """N draws through `sample_next` against HF's probabilities: total variation and chi-square.

    Noise at N = 20000: E|f_i - p_i| ~ sqrt(2 p_i (1 - p_i) / (pi N)), so E[TV] ~ 0.5 * sum_i of that,
    0.013 here (22 categories); TV's spread is a fraction of that. TV < 0.05 (asserted to be > 3 noise
    floors out) catches gross errors. The sensitive check is Pearson's X^2 = N sum (f - p)^2 / p,
    chi-square with K - 1 degrees of freedom when the sampler is right: it must stay under the quantile
    at z = 5.2 (a false alarm once in ~10^7 runs). A wrong processor order shifts X^2 by about
    N sum (q - p)^2 / p, or puts mass outside HF's support; either is asserted to be far past what
    the checks allow, so the test can fail.
    """
    N, tv_bound = 20_000, 0.05
    logits = gpt2_like_logits(20, scale=1.5, width=2048)  # narrow: 20000 draws in ~1 s
    ctx = penalty_context(logits)
    params = SamplingParams(repetition_penalty=1.3, temperature=0.8, top_k=40, top_p=0.7)
    want = hf_probs(logits, params, ctx)
    support = np.flatnonzero(want)
    p = want[support]
    expected_tv = 0.5 * np.sum(np.sqrt(2 * p * (1 - p) / (math.pi * N)))
    assert 3 * expected_tv < tv_bound, expected_tv
    x2_bound = chi2_quantile(len(support) - 1, 5.2)

    for wrong_order in [("penalty", "top_k", "top_p", "temperature"),   # temperature last
                        ("penalty", "temperature", "top_p", "top_k"),   # top-p before top-k
                        ("temperature", "top_k", "top_p", "penalty")]:  # penalty after the cut
        q = hf_probs(logits, params, ctx, order=wrong_order)
        shift = N * np.sum((q[support] - p) ** 2 / p)
        # ... or it moves enough mass off HF's support that dozens of draws would land outside it
        assert shift > 3 * x2_bound or N * q[want == 0].sum() > 50, wrong_order

    got = draw(logits, params, N, seed=7, context=ctx)
    assert set(np.unique(got).tolist()) <= set(support.tolist())
    freq = np.bincount(got, minlength=len(want))[support] / N
    tv = 0.5 * np.abs(freq - p).sum()
    x2 = N * np.sum((freq - p) ** 2 / p)
    assert tv < tv_bound, (tv, expected_tv)
    assert x2 < x2_bound, (x2, x2_bound)


# --- min_tokens: eos and the stop tokens masked until enough are generated (vLLM's MinTokensLogitsProcessor) --

EOS = 50256


@pytest.mark.parametrize("params", [SamplingParams.greedy(), SamplingParams(top_k=0, seed=0),
                                    SamplingParams(top_k=5, top_p=0.9, seed=0)], ids=["greedy", "full", "top-k-p"])
def test_min_tokens_masks_eos_and_stop_tokens_until_reached(params):
    logits = gpt2_like_logits(30)
    best = np.argsort(-logits)[:3]
    logits[EOS] = logits[best[0]] + 5.0                            # eos is the favourite ...
    stop = int(best[0])                                            # ... then a stop token
    p = dataclasses.replace(params, min_tokens=2, stop_token_ids=(stop,), max_new_tokens=8).for_model(EOS, V)
    assert p.reads_outputs                                        # the loop passes the generated ids
    for n_out, masked in [(0, True), (1, True), (2, False), (5, False)]:
        probs = logits_to_probs(logits, p, None, np.zeros(n_out, np.int64))
        assert (probs[EOS] == 0 and probs[stop] == 0) == masked, (n_out, probs[EOS], probs[stop])
        if masked:
            assert probs.sum() == pytest.approx(1.0)
    # Without eos known (no Generator), or with eos ignored, only the stop tokens are masked.
    for q in (dataclasses.replace(p, eos_token_id=None), dataclasses.replace(p, stop_at_eos=False)):
        probs = logits_to_probs(logits, q, None, np.zeros(1, np.int64))
        assert probs[EOS] > 0 and probs[stop] == 0
    # No bias brings a masked token back.
    biased = dataclasses.replace(p, logit_bias={EOS: 100.0})
    assert logits_to_probs(logits, biased, None, np.zeros(1, np.int64))[EOS] == 0


def test_sequence_logprobs_equals_top_logprobs_row_by_row():
    rng = np.random.default_rng(0)
    logits = np.stack([gpt2_like_logits(s) for s in range(70)])    # (70, V): two chunks of 64 rows
    logits[3, :5] = logits[3].max() + 1.0                          # a tie at the top
    nxt = rng.integers(0, V, 70)
    for k in (0, 1, 5):
        lp, ids, top = sequence_logprobs(logits, nxt, k)
        assert lp.dtype == np.float32 and ids.shape == top.shape == (70, k) and ids.dtype == np.int64
        for t in range(70):
            want, want_top = top_logprobs(logits[t], int(nxt[t]), k)
            assert lp[t] == pytest.approx(want, abs=1e-5)
            assert top[t].tolist() == pytest.approx([v for _, v in want_top], abs=1e-5)
            if t != 3:                                             # tied ids may come in either order
                assert ids[t].tolist() == [i for i, _ in want_top]
            assert np.all(np.diff(top[t]) <= 0)                    # most likely first
        assert set(ids[3].tolist()) <= set(range(5))
