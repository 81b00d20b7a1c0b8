"""Prefix caching (engine/prefix_cache.py decides, engine/core.py copies): a prompt that starts like a
sequence whose keys and values a row of the pool holds skips that prefix, and gets exactly the tokens a
cold engine (prefix_caching=False, same model) gives: greedy and seeded, logprobs within float rounding.

First the pure decisions (no backend), then the engine on the tiny model: reuse from finished,
running and prefilling rows, a prompt equal to a cached sequence, a prefix ending inside a multi-byte
character, eviction order, aborts and deadlines around a reused row, prompt logprobs, batch invariance.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from engine import SamplingParams
from engine.core import TokenLogprob
from engine.prefix_cache import KEEP_TAIL, PrefixCache, Row, common_prefix, lookup, reusable, worth_waiting
from tests.runtime_fixtures import EOS, PROMPTS, load_generator


def ids(*xs) -> np.ndarray:
    return np.asarray(xs, np.int64)


def scores(n: int, k: int = 1) -> list:
    """n + 1 prompt logprob entries (the first None), each with k alternatives."""
    return [None] + [TokenLogprob(j, -1.0, [(j, -1.0)] * k) for j in range(n)]


# ---- the pure decisions -------------------------------------------------------------------------------------

def test_common_prefix():
    assert common_prefix(ids(1, 2, 3), ids(1, 2, 4)) == 2
    assert common_prefix(ids(1, 2, 3), ids(1, 2, 3, 4)) == 3
    assert common_prefix(ids(5), ids(1, 2)) == 0
    assert common_prefix(ids(), ids(1)) == 0


def test_reuse_keeps_one_prompt_token_and_trusts_only_filled_slots():
    prompt = ids(1, 2, 3, 4)
    assert reusable(prompt, Row(ids(1, 2, 3, 4, 9), 5)) == (3, 3)          # the same prompt: all but the last
    assert reusable(prompt, Row(ids(1, 2, 3, 4), 2, prefilling=True)) == (2, 3)   # 2 of 4 in: 3 once it is
    assert reusable(prompt, Row(ids(1, 2, 3, 4), 2)) == (2, 2)             # an aborted prefill: no more to come
    assert reusable(prompt, Row(ids(1, 7), 2)) == (1, 1)
    assert reusable(ids(1), Row(ids(1, 2), 2)) == (0, 0)                   # a one-token prompt computes it


def test_prompt_logprobs_reuse_only_scored_positions():
    prompt = ids(1, 2, 3, 4, 5)
    held = ids(1, 2, 3, 9)
    assert reusable(prompt, Row(held, 4), prompt_logprobs=1) == (0, 0)                    # the source did not score
    assert reusable(prompt, Row(held, 4, False, scores(3, 1), 1), prompt_logprobs=2) == (0, 0)  # fewer alternatives
    # common 3: token 3 (a 9 there) is scored by the logits at position 2, which must be recomputed.
    assert reusable(prompt, Row(held, 4, False, scores(3, 2), 2), prompt_logprobs=1) == (2, 2)
    # a source prefilled 2 of its prompt has scored tokens 1..2 (entries 0..2): 2 now, 4 when it is in
    assert reusable(prompt, Row(ids(1, 2, 3, 4, 5, 6), 2, True, scores(2, 1), 1), prompt_logprobs=1) == (2, 4)
    # a finished row scored only its prompt (3 tokens), not what it generated: never more than 2
    assert reusable(prompt, Row(ids(1, 2, 3, 4, 5), 5, False, scores(2, 1), 1), prompt_logprobs=1) == (2, 2)


def test_lookup_longest_then_held_on_a_tie_and_the_gain_of_waiting():
    prompt = ids(1, 2, 3, 4, 5, 6)
    held = {3: Row(ids(1, 2, 3), 3), 5: Row(ids(1, 2, 3, 4), 4)}
    live = {0: Row(ids(1, 2, 3, 4, 0), 5)}
    match, gain = lookup(prompt, held, live)
    assert (match.slot, match.length, match.held, gain) == (5, 4, True, 0)   # a tie with row 0: no copy
    live[1] = Row(ids(1, 2, 3, 4, 5, 6, 7), 2, prefilling=True)              # 5 once its prompt is in
    match, gain = lookup(prompt, held, live)
    assert (match.slot, match.length, gain) == (5, 4, 1)
    assert lookup(ids(9, 9), held, live) == (None, 0)
    assert lookup(prompt, {}, {1: Row(ids(1, 2, 3, 4, 5), 0, prefilling=True)}) == (None, 5)


def test_waiting_pays_when_the_shared_tokens_cost_more_than_a_forward():
    assert worth_waiting(400, 0.016, 0.001) and not worth_waiting(10, 0.016, 0.001)
    assert worth_waiting(32, 0.0, 0.0) and not worth_waiting(31, 0.0, 0.0)   # no fit yet: the prior


def test_eviction_order_empty_rows_then_least_recently_used_then_fresh_rows():
    cache = PrefixCache()
    cache.hold(2, Row(ids(1, 2), 2))
    cache.hold(0, Row(ids(3, 4), 2))
    cache.hold(1, Row(ids(5, 6), 2))
    cache.written([3])
    assert cache.victim([0, 1, 2, 3, 4]) == 3              # a written row holding nothing before any held row
    assert cache.victim([0, 1, 2, 4]) == 2                 # then the least recently held
    assert cache.victim([4, 5]) == 4                       # a row never written only when nothing else is free
    cache.move(2, 3)                                       # moving is no use: still the oldest
    assert cache.victim([0, 1, 3]) == 3
    assert cache.spare([1], than=cache.held(0)) is None    # row 1 is more recent than row 0: row 0 goes
    assert cache.spare([0], than=cache.held(1)) == 0
    assert cache.spare([2, 5], than=cache.held(1)) == 2    # row 2 was written (it held row 3's content)
    assert cache.spare([5], than=cache.held(1)) is None    # a fresh row is not written to keep a row
    cache.hold(6, Row(ids(), 0))                           # nothing fed: nothing held
    assert 6 not in cache and len(cache) == 3
    cache.clear()
    assert len(cache) == 0 and cache.victim([0, 1, 5]) == 0   # the written rows stay known


def test_a_new_request_takes_a_held_row_unless_it_would_lose_a_long_tail():
    cache = PrefixCache()
    cache.hold(0, Row(np.arange(100), 100))
    cache.hold(1, Row(np.arange(50) + 1000, 50))
    cache.written([2])
    short_tail = lookup(np.arange(100 - KEEP_TAIL + 2), cache.rows(), {})[0]
    assert cache.slot_for([0, 1, 2], short_tail) == 0                        # take it: no copy
    long_tail = lookup(np.arange(40), cache.rows(), {})[0]
    assert cache.slot_for([0, 1, 2], long_tail) == 2                         # copy into the empty row
    assert cache.slot_for([0, 1], long_tail) == 0                            # row 1 is more recent: lose the tail
    assert cache.slot_for([0, 1, 3], long_tail) == 0                         # row 3 was never written
    assert cache.slot_for([0, 1, 2], None) == 2


# ---- the engine -------------------------------------------------------------------------------------------

RNG = np.random.default_rng(7)
CONTEXT = RNG.integers(0, EOS, 300).tolist()                     # a shared context, prefilled once
SUFFIXES = [RNG.integers(0, EOS, n).tolist() for n in (5, 3, 7, 4)]


@pytest.fixture(scope="module")
def warm(tiny_model):
    g = load_generator(tiny_model, max_batch=4, threads=1)
    yield g
    g.close()


@pytest.fixture(scope="module")
def cold(tiny_model):
    g = load_generator(tiny_model, max_batch=4, threads=1, prefix_caching=False)
    yield g
    g.close()


def same(a, b, logprobs: bool = False) -> None:
    """Token and text equality; logprobs (generated and prompt) within float rounding."""
    assert a.token_ids == b.token_ids and a.text == b.text and a.finish_reason == b.finish_reason
    if logprobs:
        for x, y in zip(a.logprobs or [], b.logprobs or []):
            assert x.token_id == y.token_id and x.logprob == pytest.approx(y.logprob, abs=1e-4)
        assert (a.prompt_logprobs is None) == (b.prompt_logprobs is None)
        for x, y in zip((a.prompt_logprobs or [])[1:], (b.prompt_logprobs or [])[1:]):
            assert x.token_id == y.token_id and x.logprob == pytest.approx(y.logprob, abs=1e-4)
            assert [t for t, _ in x.top] == [t for t, _ in y.top]


def fresh(g) -> None:
    """Forget what the pool holds (a test's reuse comes from its own requests only)."""
    g.core._prefix.clear()


PARAMS = [SamplingParams.greedy(8, stop_at_eos=False), SamplingParams(max_new_tokens=8, seed=3, top_k=0),
          SamplingParams(max_new_tokens=6, seed=1, repetition_penalty=1.3, logprobs=2)]


@pytest.mark.parametrize("params", PARAMS, ids=["greedy", "seeded", "penalty-logprobs"])
def test_reuse_from_a_finished_row(warm, cold, params):
    fresh(warm)
    first = warm.generate(CONTEXT, params)
    assert first.timings.cached_tokens == 0
    follow = CONTEXT + first.token_ids + SUFFIXES[0]              # a chat turn: the history, then more
    out = warm.generate(follow, params)
    # the held row: the prompt and every generated token but the last (sampled, never fed)
    assert out.timings.cached_tokens == len(CONTEXT) + len(first.token_ids) - 1
    same(out, cold.generate(follow, params), logprobs=True)


def test_a_prompt_equal_to_a_cached_sequence_still_computes_one_token(warm, cold):
    fresh(warm)
    params = SamplingParams(max_new_tokens=6, seed=5)
    a = warm.generate(CONTEXT, params)
    before = warm.stats()
    b = warm.generate(CONTEXT, params)
    after = warm.stats()
    assert b.timings.cached_tokens == len(CONTEXT) - 1
    assert after.forward_calls - before.forward_calls == 6             # one token, then 5 decode steps
    assert after.prefix_cache_queries - before.prefix_cache_queries == len(CONTEXT)
    assert after.prefix_cache_hits - before.prefix_cache_hits == len(CONTEXT) - 1
    same(a, b)
    same(b, cold.generate(CONTEXT, params))


def test_reuse_from_a_running_row(warm, cold):
    """A request copies the prefix from a row that is decoding; the running request is unaffected."""
    fresh(warm)
    long = SamplingParams.greedy(120, stop_at_eos=False)
    it = warm.stream(CONTEXT, long)
    next(it)                                                         # its prompt is in; it decodes
    params = SamplingParams(max_new_tokens=8, seed=2)
    out = warm.generate(CONTEXT + SUFFIXES[1], params)
    rest = list(it)
    assert out.timings.cached_tokens == len(CONTEXT)
    same(out, cold.generate(CONTEXT + SUFFIXES[1], params))
    assert rest and warm.stats().running == 0


def test_requests_sharing_a_context_prefill_it_once(warm, cold):
    """lm-eval's burst: a context with several continuations, admitted together. The first prefills the
    context, the others wait for it and copy it (the context's tokens run through the model once)."""
    fresh(warm)
    prompts = [CONTEXT + s for s in SUFFIXES]
    params = SamplingParams(max_new_tokens=1, prompt_logprobs=1, temperature=0)
    fed = []
    forward_mixed, forward = warm.backend.forward_mixed, warm.backend.forward
    try:
        warm.backend.forward_mixed = lambda c, a, b: fed.append(a.input_ids.size + b.input_ids.size) or forward_mixed(c, a, b)
        warm.backend.forward = lambda c, x, *a: fed.append(x.size) or forward(c, x, *a)
        outs = warm.generate(prompts, params)
    finally:
        del warm.backend.forward_mixed, warm.backend.forward
    # prompt logprobs: token 300 differs between them, so position 299 is scored afresh by each
    assert [o.timings.cached_tokens for o in outs] == [0] + [len(CONTEXT) - 1] * 3
    assert sum(fed) < len(CONTEXT) + 4 * max(len(s) for s in SUFFIXES) + 4      # padded, but the context once
    for o, ref in zip(outs, cold.generate(prompts, params)):
        same(o, ref, logprobs=True)


def test_prompt_logprobs_are_kept_from_the_source_and_truncated(warm, cold):
    fresh(warm)
    a = warm.generate(CONTEXT + SUFFIXES[0], SamplingParams(max_new_tokens=2, prompt_logprobs=3, seed=0))
    p = SamplingParams(max_new_tokens=2, prompt_logprobs=1, seed=0)
    b = warm.generate(CONTEXT + SUFFIXES[2], p)
    assert b.timings.cached_tokens == len(CONTEXT) - 1             # token 300 differs: scored afresh
    assert all(len(e.top) == 1 for e in b.prompt_logprobs[1:])
    same(b, cold.generate(CONTEXT + SUFFIXES[2], p), logprobs=True)
    c = warm.generate(CONTEXT + SUFFIXES[3], SamplingParams(max_new_tokens=2, prompt_logprobs=5, seed=0))
    assert c.timings.cached_tokens == 0                            # nobody scored 5 alternatives
    assert a.prompt_logprobs[1].top[:1] == b.prompt_logprobs[1].top
    # A finished row scored its prompt, not what it generated: a prompt running past its prompt reuses the
    # scored part and does not wait for more (a deadline would end a request that waited forever).
    long = warm.generate(CONTEXT, SamplingParams(max_new_tokens=60, prompt_logprobs=1, seed=0, stop_at_eos=False))
    follow = CONTEXT + long.token_ids + SUFFIXES[1]
    d = warm.generate(follow, p, deadline_s=20)
    assert d.finish_reason == "length" and d.timings.cached_tokens == len(CONTEXT) - 1
    same(d, cold.generate(follow, p), logprobs=True)


def test_a_prefix_ending_inside_a_multibyte_character(warm, cold):
    """Reuse is by tokens: a shared prefix that ends between the bytes of one character is as good as any
    (the prompt is never decoded again; the detokenizer sees generated tokens only)."""
    fresh(warm)
    text = "Le café est très bon 日本語のテキスト 😀 and more"
    full = warm.encode(text)
    cut = next(k for k in range(1, len(full)) if "\ufffd" in warm.decode(full[:k])[-1:])
    assert "\ufffd" not in warm.decode(full)                              # whole characters, split by the cut
    params = SamplingParams(max_new_tokens=12, seed=4)
    warm.generate(full, params)
    other = full[:cut] + warm.encode(" something else")                   # diverges mid-character
    out = warm.generate(other, params)
    assert out.timings.cached_tokens == cut
    same(out, cold.generate(other, params))


def test_least_recently_used_rows_go_first(tiny_model, cold):
    g = load_generator(tiny_model, max_batch=2, threads=1)
    try:
        params = SamplingParams(max_new_tokens=4, seed=0)
        g.generate([RNG.integers(0, EOS, 8).tolist() for _ in range(2)], params)   # both rows written
        a, b, c = (RNG.integers(0, EOS, 40).tolist() for _ in range(3))
        for p in (a, b, c):
            assert g.generate(p, params).timings.cached_tokens == 0
        assert g.generate(a, params).timings.cached_tokens == 0          # two slots: a (the oldest) went
        assert g.generate(c, params).timings.cached_tokens == len(c) - 1
        out = g.generate(b, params)                                      # b went when a came back
        assert out.timings.cached_tokens == 0
        same(out, cold.generate(b, params))
    finally:
        g.close()


def test_aborts_and_deadlines_around_a_reused_row(warm, cold):
    fresh(warm)
    params = SamplingParams(max_new_tokens=10, seed=9)
    # The source decodes; a request copies from it; the source is aborted: the copy is its own.
    source = warm.stream(CONTEXT, SamplingParams.greedy(500, stop_at_eos=False))
    next(source)
    done = threading.Event()
    result = {}

    def run():
        result["out"] = warm.generate(CONTEXT + SUFFIXES[0], params)
        done.set()

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.05)
    source.close()                                                   # aborts it
    t.join(30)
    assert result["out"].timings.cached_tokens == len(CONTEXT)
    same(result["out"], cold.generate(CONTEXT + SUFFIXES[0], params))
    # A request that reused a prefix ends at its deadline: its row is held with what it fed, and a later
    # request reusing that row gets a cold engine's tokens.
    slow = warm.generate(CONTEXT + SUFFIXES[1], SamplingParams.greedy(700, stop_at_eos=False), deadline_s=0.15)
    assert slow.finish_reason == "deadline" and slow.timings.cached_tokens > 0 and len(slow.token_ids) > 4
    after = CONTEXT + SUFFIXES[1] + slow.token_ids[:3] + SUFFIXES[2]
    out = warm.generate(after, params)
    assert out.timings.cached_tokens == len(CONTEXT) + len(SUFFIXES[1]) + 3
    same(out, cold.generate(after, params))
    assert warm.stats().running == warm.stats().waiting == 0


def test_batch_invariance_with_shared_prefixes(warm, cold):
    """Requests in flight together, sharing prefixes with each other and with finished rows, with
    greedy, seeded and penalised sampling: each gets exactly what it gets alone on a cold engine."""
    fresh(warm)
    work = [
        (CONTEXT + SUFFIXES[0], SamplingParams.greedy(20, stop_at_eos=False)),
        (CONTEXT[:150] + SUFFIXES[1], SamplingParams(max_new_tokens=16, seed=1, top_p=0.9)),
        (PROMPTS[1], SamplingParams(max_new_tokens=12, seed=2, presence_penalty=0.5)),
        (CONTEXT + SUFFIXES[2], SamplingParams(max_new_tokens=14, seed=3, logprobs=1, prompt_logprobs=1)),
        (CONTEXT + SUFFIXES[0] + SUFFIXES[3], SamplingParams.greedy(18, repetition_penalty=1.2)),
        (PROMPTS[1] + " and", SamplingParams(max_new_tokens=10, seed=4)),
    ]
    alone = [cold.generate(p, sp) for p, sp in work]
    warm.generate(CONTEXT[:200], SamplingParams.greedy(2))          # a finished row to reuse too
    outs: list = [None] * len(work)

    def run(i):
        outs[i] = warm.generate(*work[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(work))]
    for t in threads:
        t.start()
        time.sleep(0.01)
    for t in threads:
        t.join(60)
    assert sum(o.timings.cached_tokens for o in outs) > 2 * len(CONTEXT)
    for o, ref in zip(outs, alone):
        same(o, ref, logprobs=True)


def test_switching_prefix_caching_off_forgets_the_pool(warm, cold):
    warm.generate(CONTEXT, SamplingParams.greedy(3))
    assert len(warm.core._prefix) > 0
    try:
        warm.core.set_prefix_caching(False)
        out = warm.generate(CONTEXT, SamplingParams.greedy(3))
        assert out.timings.cached_tokens == 0 and len(warm.core._prefix) == 0
    finally:
        warm.core.set_prefix_caching(True)
    warm.generate(CONTEXT, SamplingParams.greedy(3))
    assert warm.generate(CONTEXT, SamplingParams.greedy(3)).timings.cached_tokens == len(CONTEXT) - 1


def test_prefix_caching_off_reuses_nothing(cold):
    out = cold.generate(CONTEXT, SamplingParams.greedy(3))
    again = cold.generate(CONTEXT, SamplingParams.greedy(3))
    assert out.timings.cached_tokens == again.timings.cached_tokens == 0
    assert cold.stats().prefix_cache_queries == cold.stats().prefix_cache_hits == 0
    assert len(cold.core._prefix) == 0


def test_speculative_decoding_reuses_the_draft_rows_too(tmp_path_factory, tiny_model, cold):
    """With a draft model the draft pool's row is reused (taken or copied) with the target's: greedy
    output is the target's own, and the draft proposes and has accepted exactly what a cold pair's does
    (a stale draft row would change its proposals)."""
    from tests.runtime_fixtures import TINY_INIT, make_model
    draft = make_model(tmp_path_factory, "tiny", seed=1, init=TINY_INIT).art
    spec = [load_generator(tiny_model, max_batch=2, threads=1, draft=draft, speculate="always", prefix_caching=on)
            for on in (True, False)]
    try:
        params = SamplingParams.greedy(24, stop_at_eos=False)
        first = [g.generate(CONTEXT, params) for g in spec]
        follow = CONTEXT + first[0].token_ids + SUFFIXES[0]
        outs = [g.generate(follow, params) for g in spec]
        assert outs[0].timings.cached_tokens == len(CONTEXT) + 23 and outs[1].timings.cached_tokens == 0
        assert spec[0].core._slots == [None, None] and spec[0].core._prefix.held(0).draft_length > len(CONTEXT)
        for o in outs:
            same(o, cold.generate(follow, params))
        assert outs[0].timings.drafts_proposed == outs[1].timings.drafts_proposed
        assert outs[0].timings.drafts_accepted == outs[1].timings.drafts_accepted
    finally:
        for g in spec:
            g.close()


def test_a_request_that_shares_nothing_writes_no_fresh_row(tiny_model):
    """The pool commits memory where it is first written (and a first write faults pages in): keeping a
    finished row must not write a row that requests never used. Sequential unrelated requests on a
    fresh engine run in row 0, as with caching off; the held row there gives way."""
    g = load_generator(tiny_model, max_batch=4, threads=1)
    try:
        for n in (120, 30, 60):
            out = g.generate(RNG.integers(0, EOS, n).tolist(), SamplingParams.greedy(4))
            assert out.timings.cached_tokens == 0
        arrays = g.core._cache.arrays
        assert all(not np.any(a[1:]) for a in arrays), "a row other than 0 was written"
        assert len(g.core._prefix) == 1 and g.core._prefix.held(0) is not None
    finally:
        g.close()
