"""Prefix caching through the server: OpenAI's usage.prompt_tokens_details.cached_tokens, vLLM's
prefix-cache counters, echo scoring (max_tokens 0) through the engine with a cold server's logprobs,
and `serve --no-prefix-caching`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

httpx = pytest.importorskip("httpx", reason="the [serve] extra (httpx) is not installed")
pytest.importorskip("fastapi", reason="the [serve] extra is not installed")

from click.testing import CliRunner  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from server import start_in_thread  # noqa: E402
from tests.runtime_fixtures import EOS, load_generator  # noqa: E402

MODEL = "tiny"
RNG = np.random.default_rng(11)
CONTEXT = RNG.integers(0, EOS, 400).tolist()
CONTINUATIONS = [RNG.integers(0, EOS, n).tolist() for n in (5, 4, 6, 5)]


@pytest.fixture(scope="module")
def servers(tiny_model):
    """Two servers on the same model: prefix caching on (the default) and off."""
    gens = [load_generator(tiny_model, max_batch=4, max_queue=16, prefix_caching=on) for on in (True, False)]
    with start_in_thread(gens[0], model_name=MODEL) as warm, start_in_thread(gens[1], model_name=MODEL) as cold:
        yield warm, cold, gens[0]
    for g in gens:
        g.close()


def post(url: str, body: dict) -> dict:
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def counter(url: str, name: str) -> float:
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in fam.samples:
            if s.name == name:
                return s.value
    raise AssertionError(f"{name} is not on /metrics")


def test_usage_and_metrics_report_cached_tokens(servers):
    warm, cold, gen = servers
    q0, h0 = counter(warm.url, "vllm:prefix_cache_queries_total"), counter(warm.url, "vllm:prefix_cache_hits_total")
    first = post(warm.url, {"prompt": CONTEXT, "max_tokens": 4, "temperature": 0})
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    turn = CONTEXT + gen.encode(first["choices"][0]["text"]) + CONTINUATIONS[0]
    second = post(warm.url, {"prompt": turn, "max_tokens": 6, "seed": 3})
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert len(CONTEXT) <= cached < len(turn)
    assert second["choices"][0]["text"] == post(cold.url, {"prompt": turn, "max_tokens": 6, "seed": 3})["choices"][0]["text"]
    assert counter(warm.url, "vllm:prefix_cache_queries_total") - q0 == len(CONTEXT) + len(turn)
    assert counter(warm.url, "vllm:prefix_cache_hits_total") - h0 == cached
    off = post(cold.url, {"prompt": turn, "max_tokens": 1})
    assert off["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert counter(cold.url, "vllm:prefix_cache_queries_total") == 0


def test_lm_eval_burst_scores_the_context_once_with_a_cold_servers_logprobs(servers):
    """One context, four continuations, each its own echo + logprobs + max_tokens 0 request, sent together:
    scored through the engine, the context prefilled once; every logprob equals the cold server's."""
    warm, cold, _ = servers
    bodies = [{"prompt": CONTEXT + c, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
              for c in CONTINUATIONS]
    results = []
    for url in (warm.url, cold.url):
        with ThreadPoolExecutor(4) as pool:
            results.append(list(pool.map(lambda b, url=url: post(url, b), bodies)))
    cached = [r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in results[0]]
    assert sum(c >= len(CONTEXT) - 1 for c in cached) >= 3, cached        # all but the first (or none) reused
    for a, b in zip(*results):
        la, lb = a["choices"][0]["logprobs"], b["choices"][0]["logprobs"]
        assert la["tokens"] == lb["tokens"] and la["token_logprobs"][0] is None
        assert la["token_logprobs"][1:] == pytest.approx(lb["token_logprobs"][1:], abs=1e-5)
        for x, y in zip(la["top_logprobs"][1:], lb["top_logprobs"][1:]):
            assert x.keys() == y.keys()
        assert a["choices"][0]["text"] == b["choices"][0]["text"] and a["usage"]["completion_tokens"] == 0


def test_serve_no_prefix_caching(monkeypatch):
    from cli.main import main
    seen = {}
    monkeypatch.setattr("server.run.serve", lambda model, **kw: seen.update(kw) or 0)
    runner = CliRunner()
    assert runner.invoke(main, ["serve", "some-model", "--no-prefix-caching"]).exit_code == 0
    assert seen["prefix_caching"] is False
    assert runner.invoke(main, ["serve", "some-model"]).exit_code == 0 and seen["prefix_caching"] is True
    r = runner.invoke(main, ["serve", "some-model", "--ray", "--no-prefix-caching"])
    assert r.exit_code == 2 and "--no-prefix-caching is not supported with --ray" in r.output
