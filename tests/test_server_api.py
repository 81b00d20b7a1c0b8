"""The HTTP server against a live in-process instance (server.run.start_in_thread on a free loopback port):
the official `openai` client for the API's behaviour, raw HTTP (httpx) for every error's status,
envelope and message, disconnects, draining, metrics and request ids.

The model is the 2-layer tiny random one (tests/runtime_fixtures.py); every request is a few tokens,
except the ones that must still be running when the test acts on them (1000 tokens, ~1.5 s, eos
suppressed with logit_bias so they cannot end early).
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai", reason="the [serve] extra (openai client) is not installed")
httpx = pytest.importorskip("httpx", reason="the [serve] extra (httpx) is not installed")
pytest.importorskip("fastapi", reason="the [serve] extra is not installed")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from engine import EngineError, SamplingParams  # noqa: E402
from server import ServerState, create_app, start_in_thread  # noqa: E402
from tests.runtime_fixtures import EOS, PROMPT_IDS, PROMPTS, load_generator  # noqa: E402

MODEL = "tiny"
NO_EOS = {str(EOS): -100}     # a long request that cannot end early


@pytest.fixture(scope="module")
def gen(tiny_model):
    g = load_generator(tiny_model, max_batch=4, max_queue=16)
    yield g
    g.close()


@pytest.fixture(scope="module")
def srv(gen):
    with start_in_thread(gen, model_name=MODEL) as s:
        yield s


@pytest.fixture
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def http(srv):
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        yield c


def greedy(gen, prompt, n: int):
    return gen.generate(prompt, SamplingParams.greedy(n))


def metric(http_or_text, name: str, **labels) -> float:
    """One sample's value from /metrics (0 when absent)."""
    text = http_or_text if isinstance(http_or_text, str) else http_or_text.get("/metrics").text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def wait_for(cond, timeout: float = 10.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what} not reached within {timeout} s")


def sse_data(lines) -> list[str]:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


# ---- the openai client ---------------------------------------------------------------------------------------


def test_greedy_completion_equals_generate_with_usage(client, gen):
    prompt = PROMPTS[0]
    ref = greedy(gen, prompt, 8)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == MODEL
    (c,) = r.choices
    assert c.index == 0 and c.text == ref.text and c.logprobs is None
    assert c.finish_reason == ("length" if ref.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == len(gen.encode(prompt))
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_defaults_are_openais(client, gen):
    """Only a prompt and a seed: 16 tokens, temperature 1, top_p 1, top_k 0 (disabled), no penalties."""
    r = client.completions.create(model=MODEL, prompt=PROMPTS[3], seed=5)
    ref = gen.generate(PROMPTS[3], SamplingParams(max_new_tokens=16, temperature=1.0, top_k=0, top_p=1.0, seed=5))
    assert r.choices[0].text == ref.text
    assert r.usage.completion_tokens == len(ref.token_ids)
    engine_default = gen.generate(PROMPTS[3], SamplingParams(max_new_tokens=16, seed=5))   # top_k 40
    assert engine_default.token_ids != ref.token_ids   # the top_k default matters (so the check above means it)


def test_streaming_matches_and_ends_with_usage_and_done(client, http, gen):
    prompt = PROMPTS[2]
    ref = greedy(gen, prompt, 10)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)
    assert chunks[-1].usage.prompt_tokens == len(gen.encode(prompt))
    text_chunks = chunks[:-1]
    assert all(ch.usage is None and len(ch.choices) == 1 and ch.object == "text_completion" for ch in text_chunks)
    assert "".join(ch.choices[0].text for ch in text_chunks) == ref.text
    assert [ch.choices[0].finish_reason for ch in text_chunks][-1] in ("length", "stop")
    assert all(ch.choices[0].finish_reason is None for ch in text_chunks[:-1])
    assert len({ch.id for ch in chunks}) == 1

    # The raw stream: `data: {json}` events, then `data: [DONE]`; no usage field without include_usage.
    with http.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 10,
                                                      "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = sse_data(r.iter_lines())
    assert data[-1] == "[DONE]"
    events = [json.loads(d) for d in data[:-1]]
    assert all("usage" not in e for e in events)
    assert "".join(e["choices"][0]["text"] for e in events) == ref.text


def test_streamed_text_never_splits_a_character(client, gen):
    """Byte-level BPE splits some characters over two tokens: every delta is still whole UTF-8 text
    (the openai client would otherwise see U+FFFD), and the deltas add up to the whole text."""
    prompt = "日本語のテキスト: こんにちは"
    ref = gen.generate(prompt, SamplingParams(max_new_tokens=24, temperature=1.0, top_k=0, seed=3))
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, seed=3, stream=True))
    texts = [ch.choices[0].text for ch in chunks]
    assert "".join(texts) == ref.text
    assert all("\ufffd" not in t for t in texts) or "\ufffd" in ref.text


def test_token_id_prompts(client, gen):
    r = client.completions.create(model=MODEL, prompt=PROMPT_IDS[0], max_tokens=6, temperature=0)
    assert r.choices[0].text == greedy(gen, PROMPT_IDS[0], 6).text
    assert r.usage.prompt_tokens == len(PROMPT_IDS[0])
    r = client.completions.create(model=MODEL, prompt=PROMPT_IDS, max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [greedy(gen, p, 6).text for p in PROMPT_IDS]
    assert r.usage.prompt_tokens == sum(len(p) for p in PROMPT_IDS)


def test_n_choices_with_a_seed_differ_and_reproduce(client, gen):
    kw = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=8, n=3, seed=7, temperature=1.0)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]          # reproducible
    assert len({c.text for c in a.choices}) > 1                                 # the choices differ
    refs = [gen.generate(PROMPTS[0], SamplingParams(max_new_tokens=8, temperature=1.0, top_k=0, seed=7 + j))
            for j in range(3)]
    assert [c.text for c in a.choices] == [ref.text for ref in refs]            # choice j = seed + j
    assert a.usage.completion_tokens == sum(len(ref.token_ids) for ref in refs)
    assert a.usage.prompt_tokens == len(gen.encode(PROMPTS[0]))                 # the prompt counts once


def test_n_choices_over_several_prompts_stream(client, gen):
    prompts = [PROMPTS[0], PROMPTS[3]]
    chunks = list(client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=5, temperature=0, stream=True))
    texts = {}
    for ch in chunks:
        (c,) = ch.choices
        texts[c.index] = texts.get(c.index, "") + c.text
    assert sorted(texts) == [0, 1, 2, 3]
    for i, p in enumerate(prompts):   # index = prompt_index * n + j
        ref = greedy(gen, p, 5).text
        assert texts[2 * i] == ref and texts[2 * i + 1] == ref


def test_logprobs_match_teacher_forced_logits(client, gen):
    prompt = PROMPTS[0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
    c = r.choices[0]
    lp = c.logprobs
    ids = gen.encode(prompt)
    out = greedy(gen, prompt, 6).token_ids
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(out)
    assert "".join(lp.tokens) == c.text
    assert lp.text_offset == [len(gen.decode(out[:i])) for i in range(len(out))]
    ls = log_softmax(gen.logits(ids + out))
    for i, tok in enumerate(out):
        assert lp.token_logprobs[i] == pytest.approx(float(ls[len(ids) - 1 + i, tok]), abs=2e-3)
        top = lp.top_logprobs[i]
        assert 3 <= len(top) <= 4 and max(top.values()) == pytest.approx(lp.token_logprobs[i])   # greedy: the best


def test_echo_and_prompt_scoring(client, gen):
    prompt = PROMPTS[3] + " world, this is"
    ids = gen.encode(prompt)
    ref = greedy(gen, prompt, 4)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=1)
    c = r.choices[0]
    assert c.text == prompt + ref.text
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) + len(ref.token_ids)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True,
                                            stream=True))
    assert chunks[0].choices[0].text == prompt                         # the prompt first, then the deltas
    assert "".join(ch.choices[0].text for ch in chunks) == prompt + ref.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[0] == 0 and lp.text_offset[len(ids)] == len(prompt)

    # max_tokens=0 with echo scores a text: prompt + completion scored teacher-forced agrees with the
    # logprobs the engine reported while generating it.
    full = ids + ref.token_ids
    s = client.completions.create(model=MODEL, prompt=full, max_tokens=0, echo=True, logprobs=0)
    sc = s.choices[0]
    assert sc.text == gen.decode(full) and sc.finish_reason == "length" and s.usage.completion_tokens == 0
    assert len(sc.logprobs.token_logprobs) == len(full)
    assert sc.logprobs.token_logprobs[len(ids):] == pytest.approx(lp.token_logprobs[len(ids):], abs=2e-3)
    ls = log_softmax(gen.logits(full))
    assert sc.logprobs.token_logprobs[1:] == pytest.approx([float(ls[t - 1, full[t]]) for t in range(1, len(full))],
                                                          abs=1e-5)


def test_stop_strings(client, gen):
    prompt = PROMPTS[1]
    text = greedy(gen, prompt, 12).text
    stop = text[6:9]
    assert stop.strip(), f"pick another slice of {text!r}"
    expected = text[:text.find(stop)]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=[stop, "@@never@@"])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_models_health_tokenize_detokenize(client, http, gen):
    (m,) = client.models.list().data
    assert m.id == MODEL and m.model_extra["max_model_len"] == gen.max_context
    assert http.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert http.get("/health").status_code == 200
    t = http.post("/tokenize", json={"prompt": PROMPTS[0], "return_token_strs": True}).json()
    assert t["tokens"] == gen.encode(PROMPTS[0]) and t["count"] == len(t["tokens"])
    assert t["max_model_len"] == gen.max_context and "".join(t["token_strs"]) == PROMPTS[0]
    assert http.post("/detokenize", json={"tokens": t["tokens"]}).json() == {"prompt": PROMPTS[0]}


def test_request_id_echoed_generated_and_logged(http, caplog):
    caplog.set_level(logging.INFO, logger="gpt2_engine.server")
    r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, headers={"X-Request-Id": "trace-42.a"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42.a"
    wait_for(lambda: "trace-42.a POST /v1/completions 200" in caplog.text, 5, "the access log line")
    generated = http.get("/health").headers["x-request-id"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    odd = http.get("/health", headers={"X-Request-Id": "has spaces;and=stuff"}).headers["x-request-id"]
    assert odd != "has spaces;and=stuff" and len(odd) == 32      # replaced, never echoed into the log as given
    assert http.post("/v1/completions", content=b"{").headers["x-request-id"]   # on errors too


def test_metrics_count_requests(http, gen):
    before = http.get("/metrics").text
    r = http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200
    after = http.get("/metrics").text
    for name in ("vllm:time_to_first_token_seconds_count", "vllm:e2e_request_latency_seconds_count",
                 "vllm:request_queue_time_seconds_count"):
        assert metric(after, name) == metric(before, name) + 1, name
    n = r.json()["usage"]["completion_tokens"]
    assert metric(after, "vllm:inter_token_latency_seconds_count") == metric(before, "vllm:inter_token_latency_seconds_count") + n - 1
    assert metric(after, "vllm:generation_tokens_total") == metric(before, "vllm:generation_tokens_total") + n
    assert metric(after, "vllm:prompt_tokens_total") == metric(before, "vllm:prompt_tokens_total") + len(gen.encode(PROMPTS[0]))
    assert metric(after, "vllm:num_requests_running", model_name=MODEL) == 0
    assert metric(after, "vllm:num_requests_waiting", model_name=MODEL) == 0


# ---- raw HTTP: every error's status, envelope and message --------------------------------------------------------

ERRORS = [
    # (body, status, param, code, words in the message)
    (b"{not json", 400, None, "invalid_json", "not valid JSON"),
    (b"", 400, None, "invalid_json", "empty"),
    (b"[1, 2]", 400, None, "invalid_json", "JSON object"),
    ({"prompt": "x", "max_tokens": "5"}, 400, "max_tokens", None, "valid integer"),
    ({"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens", None, "valid integer"),
    ({"prompt": "x", "n": True}, 400, "n", None, "valid integer"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature", None, "valid number"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream", None, "valid boolean"),
    ({"prompt": 5}, 400, "prompt", None, "must be a string"),
    ({"prompt": []}, 400, "prompt", None, "empty"),
    ({"prompt": [1, "a"]}, 400, "prompt", None, "token ids"),
    ({"prompt": ""}, 400, "prompt", None, "empty"),
    ({"prompt": [70000]}, 400, "prompt", None, "outside the vocabulary"),
    ({"prompt": "x", "max_new_tokens": 5}, 400, "max_new_tokens", None, "unrecognized request argument"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p", None, "top_p must be in (0, 1]"),
    ({"prompt": "x", "top_k": -1}, 400, "top_k", None, "top_k must be >= 0"),
    ({"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty", None, "repetition_penalty must be > 0"),
    ({"prompt": "x", "seed": -3}, 400, "seed", None, "seed must be >= 0"),
    ({"prompt": "x", "temperature": 2.5}, 400, "temperature", None, "temperature must be in [0, 2]"),
    ({"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty", None, "presence_penalty must be in [-2, 2]"),
    ({"prompt": "x", "logprobs": 6}, 400, "logprobs", None, "logprobs must be in [0, 5]"),
    ({"prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias", None, "token ids"),
    ({"prompt": "x", "logit_bias": {"5": 500}}, 400, "logit_bias", None, "[-100, 100]"),
    ({"prompt": "x", "stop": ["a"] * 17}, 400, "stop", None, "at most 16"),
    ({"prompt": "x", "stop": [""]}, 400, "stop", None, "non-empty"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", None, "only with echo"),
    ({"prompt": "x", "n": 0}, 400, "n", None, "n must be in [1, 128]"),
    ({"prompt": "x", "suffix": "end"}, 400, "suffix", None, "suffix is not supported"),
    ({"prompt": "x", "best_of": 3}, 400, "best_of", None, "best_of other than n"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", None, "stream=true"),
    ({"prompt": "x " * 1020, "max_tokens": 16}, 400, "prompt", "context_length_exceeded", "maximum context length is 1024"),
    ({"prompt": "x", "max_tokens": 5000}, 400, "prompt", "context_length_exceeded", "5001 were requested"),
    ({"prompt": "x", "n": 21}, 400, "n", None, "more than this server holds at once"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model", "model_not_found", "`gpt-4` does not exist"),
]


@pytest.mark.parametrize("body, status, param, code, words", ERRORS,
                         ids=[f"{i}-{e[1]}-{e[2] or e[3]}" for i, e in enumerate(ERRORS)])
def test_completion_errors(http, body, status, param, code, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["code"] == code
    assert words in err["message"], err["message"]


def test_other_route_errors(http):
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = http.get("/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = http.get("/v1/models/other")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = http.post("/tokenize", json={"text": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] in ("prompt", "text")
    r = http.post("/detokenize", json={"tokens": [1, -5]})
    assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"]


def test_unexpected_error_is_500_with_one_line_and_a_logged_traceback(http, gen, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="gpt2_engine.server")

    async def boom(*args, **kwargs):   # a bug in the engine path (scoring goes through it too now)
        raise RuntimeError("simulated bug")
        yield
    monkeypatch.setattr(gen, "astream_deltas", boom)
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2},
                  headers={"X-Request-Id": "rid-500"})
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["code"] == "internal_error" and "rid-500" in err["message"] and "simulated" not in err["message"]
    assert "\n" not in err["message"]
    wait_for(lambda: any(rec.exc_info and "simulated bug" in str(rec.exc_info[1]) for rec in caplog.records), 5,
             "the traceback in the log")


def test_error_after_the_stream_started_is_an_event_then_done(http, gen, monkeypatch):
    original = gen.astream_deltas

    async def failing(*args, **kwargs):
        n = 0
        async for d in original(*args, **kwargs):
            yield d
            n += 1
            if n == 2:
                raise EngineError("simulated engine failure mid-stream")
    monkeypatch.setattr(gen, "astream_deltas", failing)
    with http.stream("POST", "/v1/completions", json={"prompt": "Hello", "max_tokens": 20, "stream": True,
                                                      "temperature": 0}) as r:
        assert r.status_code == 200
        data = sse_data(r.iter_lines())
    assert data[-1] == "[DONE]"
    err = json.loads(data[-2])["error"]
    assert "simulated engine failure" in err["message"] and err["type"] == "server_error"
    assert all("choices" in json.loads(d) for d in data[:-2]) and len(data) >= 3


def test_api_key(gen):
    with start_in_thread(gen, model_name=MODEL, api_key="s3cret") as s, httpx.Client(base_url=s.url, timeout=30) as h:
        body = {"prompt": "Hi", "max_tokens": 1}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = h.post("/v1/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert "Bearer" in r.json()["error"]["message"]
        assert h.get("/v1/models").status_code == 401 and h.post("/tokenize", json={"prompt": "a"}).status_code == 401
        assert h.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert h.get("/health").status_code == 200 and h.get("/metrics").status_code == 200   # open for probes
        ok = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0, timeout=30)
        assert ok.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0).completions.create(model=MODEL, prompt="x")


def test_cors_origin(gen):
    with start_in_thread(gen, model_name=MODEL, cors_origins=("https://app.example",)) as s, \
            httpx.Client(base_url=s.url, timeout=30) as h:
        r = h.options("/v1/completions", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = h.get("/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers


# ---- queue full, disconnects, drain, loading -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_slot(tiny_model):
    """A server whose engine holds one request and queues none: the second concurrent request is refused."""
    g = load_generator(tiny_model, max_batch=1, max_queue=0)
    with start_in_thread(g, model_name=MODEL) as s, httpx.Client(base_url=s.url, timeout=30) as h:
        yield g, h
    g.close()


LONG = {"prompt": [464], "max_tokens": 1000, "temperature": 0, "logit_bias": NO_EOS}


def test_full_queue_is_503_with_retry_after(one_slot):
    g, h = one_slot
    with h.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as held:
        assert held.status_code == 200
        lines = held.iter_lines()        # kept: a dropped line iterator closes httpx's stream (a disconnect)
        next(lines)                      # admitted: it holds the only slot
        for stream in (False, True):
            r = h.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": stream})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            err = r.json()["error"]
            assert err["code"] == "engine_overloaded" and err["type"] == "server_error" and "retry" in err["message"]
    wait_for(lambda: g.stats().running == 0, 10, "the held slot to free")
    r = h.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "n": 2})
    assert r.status_code == 400 and "holds at once (1" in r.json()["error"]["message"]   # could never fit: not a 503


def test_disconnect_mid_stream_frees_the_slot(one_slot):
    g, h = one_slot
    aborted = metric(h, "vllm:request_success_total", finished_reason="abort")
    generated = metric(h, "vllm:generation_tokens_total")
    with h.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
        lines = r.iter_lines()
        assert sum(1 for _, line in zip(range(6), lines) if line.startswith("data: ")) >= 2
        assert metric(h, "vllm:num_requests_running") == 1
    # the connection is closed: the request is aborted long before its 1000 tokens (~1.5 s) are done
    wait_for(lambda: metric(h, "vllm:num_requests_running") == 0, 10, "running == 0 after the disconnect")
    wait_for(lambda: metric(h, "vllm:request_success_total", finished_reason="abort") == aborted + 1, 5, "the abort")
    assert g.stats().running == 0 and g.stats().free_slots == 1
    assert metric(h, "vllm:generation_tokens_total") - generated < 1000
    r = h.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})    # the slot serves the next request
    assert r.status_code == 200


def test_disconnect_without_streaming_cancels(one_slot):
    g, h = one_slot
    aborted = metric(h, "vllm:request_success_total", finished_reason="abort")
    with httpx.Client(base_url=str(h.base_url), timeout=0.3) as impatient, pytest.raises(httpx.ReadTimeout):
        impatient.post("/v1/completions", json=LONG)
    wait_for(lambda: metric(h, "vllm:request_success_total", finished_reason="abort") == aborted + 1, 10, "the abort")
    wait_for(lambda: g.stats().running == 0, 5, "the slot to free")


def test_drain_refuses_new_requests_and_stops_when_idle(tiny_model):
    g = load_generator(tiny_model, max_batch=2, max_queue=4)
    try:
        s = start_in_thread(g, model_name=MODEL)
        with httpx.Client(base_url=s.url, timeout=30) as h, h.stream("POST", "/v1/completions",
                                                                     json={**LONG, "max_tokens": 300, "stream": True}) as run:
            lines = run.iter_lines()
            next(lines)
            s.drain()
            assert h.get("/health").status_code == 503 and h.get("/health").json()["status"] == "draining"
            r = h.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down" and r.headers["retry-after"]
            data = sse_data(lines)                              # the running request completes in full
            assert data[-1] == "[DONE]" and json.loads(data[-2])["choices"][0]["finish_reason"] == "length"
        s.thread.join(15)
        assert not s.thread.is_alive()                          # stopped by itself once idle
    finally:
        s.stop()
        g.close()


def test_drain_past_its_bound_aborts_with_an_error_event(tiny_model):
    g = load_generator(tiny_model, max_batch=2, max_queue=4)
    s = start_in_thread(g, model_name=MODEL, drain_timeout_s=0.2)
    try:
        with httpx.Client(base_url=s.url, timeout=30) as h, h.stream("POST", "/v1/completions",
                                                                     json={**LONG, "stream": True}) as run:
            lines = run.iter_lines()
            next(lines)
            s.drain()
            data = sse_data(lines)                              # 1000 tokens take ~1.5 s: cut at ~0.2-0.3 s
        assert data[-1] == "[DONE]"
        err = json.loads(data[-2])["error"]
        assert err["code"] == "server_shutting_down" and "drain bound" in err["message"]
        assert all(json.loads(d)["choices"][0]["finish_reason"] is None for d in data[:-2])
        s.thread.join(15)
        assert not s.thread.is_alive()
    finally:
        s.stop()
        g.close()


def test_loading_is_503():
    from starlette.testclient import TestClient
    state = ServerState(model_name=MODEL)
    with TestClient(create_app(state)) as tc:
        r = tc.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = tc.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading" and r.headers["retry-after"]
        assert tc.get("/v1/models").status_code == 503
        assert tc.post("/v1/completions", content=b"{").status_code == 400     # malformed is still 400
