"""One loaded Generator, many threads: every request gets the tokens it gets alone.

8 threads start together (a barrier) with different prompts, lengths and parameters (seeded sampling
and greedy, single prompts, a batch and a stream); the backend's `forward` is wrapped to count calls
and how many overlap. Every call goes through the one engine loop (engine/core.py), so forwards never
overlap, and the concurrent requests share them: far fewer calls than the same requests one by one.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from engine.sampling import SamplingParams
from tests.runtime_fixtures import PROMPTS

N_THREADS = 8

REQUESTS = [  # (kind, prompt(s), params)
    ("generate", PROMPTS[0], SamplingParams(max_new_tokens=40, seed=1)),
    ("generate", PROMPTS[1], SamplingParams.greedy(32, stop_at_eos=False)),
    ("generate", PROMPTS[2], SamplingParams(max_new_tokens=36, top_k=0, top_p=0.9, temperature=0.8, seed=2)),
    ("generate", PROMPTS[3], SamplingParams.greedy(28, repetition_penalty=1.3, stop_at_eos=False)),
    ("generate", PROMPTS[0], SamplingParams(max_new_tokens=40, seed=3)),     # same prompt, another seed
    ("batch", PROMPTS, [SamplingParams(max_new_tokens=n, seed=10 + n) for n in (30, 12, 24, 6)]),
    ("stream", PROMPTS[1], SamplingParams(max_new_tokens=32, top_k=5, seed=4)),
    ("generate", " the" * 300, SamplingParams(max_new_tokens=24, seed=5)),   # a long prefill among steps
]
assert len(REQUESTS) == N_THREADS


def _run(gen, kind, prompt, params):
    if kind == "stream":
        return "".join(gen.stream(prompt, params))
    out = gen.generate(prompt, params)
    outs = out if isinstance(out, list) else [out]
    return [(o.token_ids, o.text, o.finish_reason) for o in outs]


@pytest.fixture
def overlap(tiny_gen, monkeypatch):
    """Wrap the backend's forward to record the most calls in flight at once."""
    be = tiny_gen.backend
    forward = be.forward
    lock = threading.Lock()
    state = {"now": 0, "max": 0, "calls": 0}

    def counting(*args, **kwargs):
        with lock:
            state["now"] += 1
            state["calls"] += 1
            state["max"] = max(state["max"], state["now"])
        try:
            return forward(*args, **kwargs)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(be, "forward", counting)
    return state


def test_threads_get_the_same_tokens_as_sequential_runs(tiny_gen, overlap):
    expected = [_run(tiny_gen, *r) for r in REQUESTS]
    assert len({str(e) for e in expected}) == N_THREADS  # every request is distinguishable
    sequential_calls = overlap["calls"]
    assert overlap["max"] == 1

    barrier = threading.Barrier(N_THREADS)

    def worker(i: int):
        barrier.wait()
        return _run(tiny_gen, *REQUESTS[i])

    for round_ in range(3):
        before = overlap["calls"]
        with ThreadPoolExecutor(N_THREADS) as pool:
            got = list(pool.map(worker, range(N_THREADS)))
        for i, (g, e) in enumerate(zip(got, expected)):
            assert g == e, f"round {round_}, request {i} ({REQUESTS[i][0]}): concurrent result differs"
        # Batched: sequentially each request pays its own steps; together they share them.
        assert overlap["calls"] - before <= sequential_calls / 2, (overlap["calls"] - before, sequential_calls)
    assert overlap["max"] == 1, "forward calls overlapped: something bypassed the engine loop"
