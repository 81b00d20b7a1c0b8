"""Third-party clients' exact request bodies against a live in-process server (tiny model): EleutherAI's
lm-evaluation-harness (`--model local-completions`: LocalCompletionsAPI._create_payload) and NVIDIA's aiperf
(the completions endpoint's format_payload with `--extra-inputs ignore_eos:true min_tokens:N`), and the
vLLM fields they rely on: ignore_eos, min_tokens, stop_token_ids, up to 16 stop sequences.

Logprobs are checked against Hugging Face transformers on the checkpoint the artifact was exported from.
The scoring request must cost one forward: the prompt's logprobs come from the prefill that also samples
the generated token.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

httpx = pytest.importorskip("httpx", reason="the [serve] extra (httpx) is not installed")
pytest.importorskip("fastapi", reason="the [serve] extra is not installed")

from engine import SamplingParams  # noqa: E402
from server import start_in_thread  # noqa: E402
from tests.conftest import hf_logits  # noqa: E402
from tests.runtime_fixtures import EOS, PROMPTS, load_generator  # noqa: E402

MODEL = "tiny"
LM_EVAL_SEED = 1234          # lm-eval's default seed in every payload
LOGPROB_TOL = 2e-4           # |engine - HF| log-softmax (ORT vs torch fp32 on the tiny init-0.3 model)
CODE_STOPS = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]   # lm-eval's humaneval `until` (+ eos: 6 stops)


@pytest.fixture(scope="module")
def gen(tiny_model):
    g = load_generator(tiny_model, max_batch=4, max_queue=16)
    yield g
    g.close()


@pytest.fixture(scope="module")
def http(gen):
    with start_in_thread(gen, model_name=MODEL) as s, httpx.Client(base_url=s.url, timeout=120) as c:
        yield c


def post(http, body: dict) -> dict:
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def hf_log_softmax(tiny_model, ids) -> np.ndarray:
    x = hf_logits(tiny_model.ckpt, ids).astype(np.float64)                    # (T, V)
    m = x.max(-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))


def lm_eval_score(choice: dict, ctxlen: int) -> tuple[float, bool]:
    """lm-eval's LocalCompletionsAPI.parse_logprobs: the continuation's summed logprob and whether it is greedy."""
    lps = choice["logprobs"]["token_logprobs"][ctxlen:-1]
    tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
    return sum(lps), all(lp == max(top.values()) for lp, top in zip(lps, tops))


# ---- lm-evaluation-harness -----------------------------------------------------------------------------------


def test_lm_eval_loglikelihood_requests_equal_hf(http, gen, tiny_model):
    """lm-eval's scoring body (echo, logprobs 1, max_tokens 1, temperature 0, seed), a batch of token-id
    prompts: every prompt token's logprob and top-1 equal HF's, and lm-eval's (sum, is_greedy) too."""
    ctx = gen.encode(PROMPTS[1])
    greedy_cont = gen.generate(ctx, SamplingParams.greedy(4, stop_at_eos=False)).token_ids
    other_cont = gen.encode(" the river")
    prompts = [ctx + greedy_cont, ctx + other_cont]
    body = {"model": MODEL, "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "seed": LM_EVAL_SEED, "echo": True}
    r = post(http, body)
    assert [c["index"] for c in r["choices"]] == [0, 1]
    for ids, choice in zip(prompts, r["choices"]):
        lp = choice["logprobs"]
        ref = hf_log_softmax(tiny_model, ids)                                  # (T, V)
        assert len(lp["tokens"]) == len(ids) + 1 and choice["finish_reason"] in ("length", "stop")
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        want = [float(ref[t - 1, ids[t]]) for t in range(1, len(ids))]
        assert lp["token_logprobs"][1:len(ids)] == pytest.approx(want, abs=LOGPROB_TOL)
        for t in range(1, len(ids)):
            top = lp["top_logprobs"][t]
            best = int(ref[t - 1].argmax())
            assert 1 <= len(top) <= 2 and max(top.values()) == pytest.approx(float(ref[t - 1, best]), abs=LOGPROB_TOL)
        # the generated token: greedy from the last position, its logprob HF's
        assert lp["token_logprobs"][-1] == pytest.approx(float(ref[-1].max()), abs=LOGPROB_TOL)
        assert choice["text"] == gen.decode(ids + [int(ref[-1].argmax())])
        total, greedy = lm_eval_score(choice, len(ctx))
        hf_total = sum(float(ref[t - 1, ids[t]]) for t in range(len(ctx), len(ids)))
        hf_greedy = all(ids[t] == int(ref[t - 1].argmax()) for t in range(len(ctx), len(ids)))
        assert total == pytest.approx(hf_total, abs=LOGPROB_TOL * len(ids)) and greedy == hf_greedy
    assert lm_eval_score(r["choices"][0], len(ctx))[1] and not lm_eval_score(r["choices"][1], len(ctx))[1]

    # max_tokens 0 (score only, nothing generated) gives the same prompt logprobs
    s = post(http, {**body, "max_tokens": 0})
    for a, b in zip(r["choices"], s["choices"]):
        assert b["logprobs"]["token_logprobs"][1:] == pytest.approx(a["logprobs"]["token_logprobs"][1:-1], abs=1e-5)
        for x, y in zip(b["logprobs"]["top_logprobs"][1:], a["logprobs"]["top_logprobs"][1:-1]):
            assert x.keys() == y.keys() and list(x.values()) == pytest.approx(list(y.values()), abs=1e-5)


def test_scoring_request_runs_the_prompt_once(http, gen, monkeypatch):
    """echo + logprobs + max_tokens 1: one engine forward gives the prompt's logprobs and the token (no
    separate scoring forward through Generator.logits, no second prefill). Waits on the engine core
    filling Request.prompt_logprobs from its prefill (SamplingParams.prompt_logprobs)."""
    scored = []
    original = gen.logits
    monkeypatch.setattr(gen, "logits", lambda ids: scored.append(len(ids)) or original(ids))
    ids = gen.encode(PROMPTS[1])
    before = gen.stats().forward_calls
    r = post(http, {"model": MODEL, "prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1,
                    "seed": LM_EVAL_SEED, "echo": True})
    assert gen.stats().forward_calls - before == 1 and scored == []
    assert len(r["choices"][0]["logprobs"]["token_logprobs"]) == len(ids) + 1


def test_lm_eval_generate_until_request_with_six_stops(http, gen):
    """lm-eval's generation body: temperature 0, `until` + eos as 6 stop sequences, a seed; each text is the
    greedy text cut at its earliest stop."""
    prompts = [PROMPTS[1], PROMPTS[2]]
    refs = [gen.generate(p, SamplingParams.greedy(24, top_k=0)).text for p in prompts]
    stops = CODE_STOPS[:4] + [refs[0][5:8], "<|endoftext|>"]                  # one that occurs
    assert refs[0][5:8].strip() and len(stops) == 6
    body = {"prompt": prompts, "model": MODEL, "max_tokens": 24, "temperature": 0, "stop": stops,
            "seed": LM_EVAL_SEED}
    r = post(http, body)
    for ref, choice in zip(refs, r["choices"]):
        cut = min([ref.find(s) for s in stops if s in ref], default=len(ref))
        assert choice["text"] == ref[:cut]
    assert r["choices"][0]["finish_reason"] == "stop"


# ---- aiperf -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_aiperf_fixed_length_requests(http, stream):
    """aiperf's completions body with `--extra-inputs ignore_eos:true min_tokens:N`: exactly max_tokens tokens."""
    body = {"prompt": [PROMPTS[0]], "model": MODEL, "stream": stream, "max_tokens": 12, "ignore_eos": True,
            "min_tokens": 12}
    if stream:   # aiperf asks for the server's token counts when streaming
        body["stream_options"] = {"include_usage": True}
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        usage = json.loads(events[-2])["usage"]
        finish = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-2]][-1]
    else:
        r = post(http, body)
        usage, finish = r["usage"], r["choices"][0]["finish_reason"]
    assert usage["completion_tokens"] == 12 and finish == "length"


def test_ignore_eos_and_min_tokens_are_honoured(http, gen):
    """With <|endoftext|> favoured (+100): it ends the text at once; ignore_eos goes on; min_tokens holds it
    off for that many tokens (it is masked, so none of them is an eos)."""
    base = {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "logit_bias": {str(EOS): 100}}
    plain = post(http, base)
    assert plain["usage"]["completion_tokens"] == 0 and plain["choices"][0]["finish_reason"] == "stop"
    ignoring = post(http, {**base, "ignore_eos": True})
    assert ignoring["usage"]["completion_tokens"] == 8 and ignoring["choices"][0]["finish_reason"] == "length"
    held = post(http, {**base, "min_tokens": 5, "logprobs": 0})
    c = held["choices"][0]
    assert held["usage"]["completion_tokens"] == 5 and c["finish_reason"] == "stop"
    assert "<|endoftext|>" not in c["logprobs"]["tokens"]
    ref = gen.generate(PROMPTS[0], SamplingParams.greedy(8, min_tokens=5, logit_bias={EOS: 100.0}))
    assert c["text"] == ref.text and len(ref.token_ids) == 5


def test_stop_token_ids(http, gen):
    ref = gen.generate(PROMPTS[1], SamplingParams.greedy(10, top_k=0, stop_at_eos=False))
    i = next(i for i, t in enumerate(ref.token_ids) if i >= 2 and t not in ref.token_ids[:i])
    body = {"prompt": PROMPTS[1], "max_tokens": 10, "temperature": 0, "stop_token_ids": [ref.token_ids[i]]}
    r = post(http, body)
    c = r["choices"][0]
    assert c["finish_reason"] == "stop" and c["text"] == gen.decode(ref.token_ids[:i])
    assert r["usage"]["completion_tokens"] == i


ERRORS = [
    ({"stop": [f"s{i}" for i in range(17)]}, "stop", "at most 16 stop sequences, got 17"),
    ({"stop": ["ok", "x" * 257]}, "stop", "at most 256 characters, stop[1] has 257"),
    ({"max_tokens": 4, "min_tokens": 5}, "min_tokens", "min_tokens must be in [0, max_tokens], got 5 (max_tokens is 4)"),
    ({"max_tokens": 0, "echo": True, "min_tokens": 1}, "min_tokens", "min_tokens must be in [0, max_tokens], got 1"),
    ({"min_tokens": -1}, "min_tokens", "min_tokens must be in [0, max_tokens], got -1"),
    ({"stop_token_ids": [5, 70000]}, "stop_token_ids", "token id 70000 is outside the vocabulary [0, 50257)"),
    ({"stop_token_ids": [-1]}, "stop_token_ids", "token id -1 is outside the vocabulary"),
    ({"stop_token_ids": 5}, "stop_token_ids", "valid array"),
    ({"ignore_eos": "true"}, "ignore_eos", "valid boolean"),
    ({"min_tokens": 2.5}, "min_tokens", "valid integer"),
]


@pytest.mark.parametrize("fields, param, words", ERRORS, ids=[f"{i}-{e[1]}" for i, e in enumerate(ERRORS)])
def test_field_errors(http, fields, param, words):
    r = http.post("/v1/completions", json={"prompt": "x", **fields})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert words in err["message"], err["message"]


def test_sixteen_stops_of_256_characters_are_accepted(http):
    stops = [f"{i:02d}" + "z" * 254 for i in range(16)]
    r = post(http, {"prompt": "x", "max_tokens": 2, "stop": stops})
    assert r["choices"][0]["finish_reason"] in ("length", "stop")
