"""A bounded load test on loopback: 32 concurrent clients x 4 streaming requests each, against an
in-process server (max_batch 8, max_queue 64: every request is admitted, most wait for a slot).

No errors, nothing lost or mixed up: each greedy stream equals that prompt generated alone by the
Generator (the prompts are all different, so a crossed stream would show), usage counts add up, and
the engine ends idle. Bounded: 128 requests of 8 tokens, a 180 s limit for the whole run.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

httpx = pytest.importorskip("httpx", reason="the [serve] extra (httpx) is not installed")
pytest.importorskip("fastapi", reason="the [serve] extra is not installed")

from engine import SamplingParams  # noqa: E402
from server import start_in_thread  # noqa: E402
from tests.runtime_fixtures import PROMPTS, load_generator  # noqa: E402

CLIENTS, PER_CLIENT, NEW_TOKENS, LIMIT_S = 32, 4, 8, 180


@pytest.fixture(scope="module")
def gen(tiny_model):
    g = load_generator(tiny_model, max_batch=8, max_queue=64)
    yield g
    g.close()


def prompt_of(c: int, i: int) -> str:
    return f"Client {c} request {i}: {PROMPTS[(c + i) % len(PROMPTS)]}"


async def stream_one(client: httpx.AsyncClient, prompt: str) -> dict:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    text, usage, finish, done, ids = "", None, None, False, set()
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        rid = r.headers["x-request-id"]
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                continue
            event = json.loads(data)
            assert "error" not in event, event
            ids.add(event["id"])
            if event["choices"]:
                (c,) = event["choices"]
                text += c["text"]
                finish = c["finish_reason"] or finish
            else:
                usage = event["usage"]
    return {"text": text, "usage": usage, "finish": finish, "done": done, "ids": ids, "rid": rid}


async def run_clients(url: str) -> dict:
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def one_client(c: int):
            return [(prompt_of(c, i), await stream_one(client, prompt_of(c, i))) for i in range(PER_CLIENT)]
        results = await asyncio.gather(*(one_client(c) for c in range(CLIENTS)))
    return dict(pair for per_client in results for pair in per_client)


def test_32_clients_x_4_streams_each_response_is_its_own(gen):
    prompts = [prompt_of(c, i) for c in range(CLIENTS) for i in range(PER_CLIENT)]
    assert len(set(prompts)) == len(prompts)
    expected = {p: gen.generate(p, SamplingParams.greedy(NEW_TOKENS)) for p in prompts}   # each prompt alone
    assert len({e.text for e in expected.values()}) > len(prompts) // 2    # responses tell prompts apart

    with start_in_thread(gen, model_name="tiny") as srv:
        t0 = time.perf_counter()
        got = asyncio.run(asyncio.wait_for(run_clients(srv.url), LIMIT_S))
        elapsed = time.perf_counter() - t0
        metrics = httpx.get(srv.url + "/metrics", timeout=30).text

    assert len(got) == len(prompts)
    rids, cmpl_ids = set(), set()
    for p in prompts:
        g, e = got[p], expected[p]
        assert g["done"] and g["text"] == e.text, (p, g["text"], e.text)
        assert g["finish"] == ("length" if e.finish_reason == "length" else "stop")
        assert g["usage"]["completion_tokens"] == len(e.token_ids)
        assert g["usage"]["prompt_tokens"] == len(e.prompt_token_ids)
        assert len(g["ids"]) == 1
        rids.add(g["rid"])
        cmpl_ids |= g["ids"]
    assert len(rids) == len(cmpl_ids) == len(prompts)          # one id per request, none shared
    assert gen.stats().running == 0 and gen.stats().waiting == 0
    assert 'vllm:request_success_total{finished_reason="abort"' not in metrics
    assert f'vllm:e2e_request_latency_seconds_count{{model_name="tiny"}} {float(len(prompts))}' in metrics
    print(f"{len(prompts)} streams from {CLIENTS} clients in {elapsed:.1f} s")
