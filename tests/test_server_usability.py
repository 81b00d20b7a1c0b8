"""What a new user and real clients met on the server (issue 24): random weights labelled on /v1/models and
on every /v1/ response (item 5), `serve` with a wrong MODEL failing before it listens (item 11), the
access log's 499 for a client that left mid-stream, as docs/serving.md says (item 12), and HEAD /metrics
(item 15: aiperf sends one first)."""

from __future__ import annotations

import logging
import shutil

import pytest

httpx = pytest.importorskip("httpx", reason="the [serve] extra (httpx) is not installed")
pytest.importorskip("fastapi", reason="the [serve] extra is not installed")

import engine.config  # noqa: E402
from engine import Generator, RandomWeightsWarning  # noqa: E402
from server import start_in_thread  # noqa: E402
from tests.runtime_fixtures import EOS, TINY, TINY_INIT, load_generator, run_cli  # noqa: E402

HEADER = "x-gpt2-engine-random-weights"


@pytest.fixture(scope="module")
def random_gen(tmp_path_factory):
    from export.exporter import export_model
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(engine.config.SIZES, "distilgpt2", TINY)
        art = export_model("distilgpt2", tmp_path_factory.mktemp("random") / "tiny-random", init="random",
                           init_range=TINY_INIT, show_progress=False)
    with pytest.warns(RandomWeightsWarning):
        g = Generator.from_pretrained(art)
    yield g
    g.close()


@pytest.fixture(scope="module")
def real_gen(tiny_model):
    g = load_generator(tiny_model)
    yield g
    g.close()


# ---- item 5 ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("random", [True, False])
def test_random_weights_are_labelled_on_the_api(random, random_gen, real_gen):
    gen = random_gen if random else real_gen
    with start_in_thread(gen, model_name="m") as s, httpx.Client(base_url=s.url, timeout=30) as h:
        models = h.get("/v1/models")
        assert models.json()["data"][0]["random_weights"] is random
        assert h.get("/v1/models/m").json()["random_weights"] is random
        body = {"model": "m", "prompt": "Hello", "max_tokens": 3}
        for r in (h.post("/v1/completions", json=body), h.post("/v1/completions", json={**body, "stream": True}),
                  h.post("/v1/completions", json={**body, "max_tokens": 0}), models):
            assert (r.headers.get(HEADER) == "true") is random, (r.status_code, dict(r.headers))
        assert HEADER not in h.get("/health").headers     # a probe's answer is about the server, not text


# ---- item 15 ---------------------------------------------------------------------------------------------

def test_head_metrics_and_health(real_gen):
    with start_in_thread(real_gen, model_name="m") as s, httpx.Client(base_url=s.url, timeout=30) as h:
        r = h.head("/metrics")
        assert r.status_code == 200 and r.content == b"" and r.headers["content-type"].startswith("text/plain")
        r = h.head("/health")
        assert r.status_code == 200 and r.content == b""
        assert h.get("/metrics").status_code == 200 and "vllm:" in h.get("/metrics").text


# ---- item 12 ---------------------------------------------------------------------------------------------

def test_a_client_that_leaves_mid_stream_is_logged_499(real_gen, caplog):
    caplog.set_level(logging.INFO, logger="gpt2_engine.server")
    body = {"prompt": "Hello", "max_tokens": 1000, "temperature": 0, "logit_bias": {str(EOS): -100}, "stream": True}
    with start_in_thread(real_gen, model_name="m") as s, httpx.Client(base_url=s.url, timeout=30) as h:
        with h.stream("POST", "/v1/completions", json=body, headers={"X-Request-Id": "leaver"}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert sum(1 for _, line in zip(range(4), lines) if line.startswith("data: ")) >= 2
        h.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers={"X-Request-Id": "stayer"})
        import time
        end = time.monotonic() + 10
        while time.monotonic() < end and not [m for m in caplog.messages if m.startswith("leaver POST")]:
            time.sleep(0.05)
    (leaver,) = [m for m in caplog.messages if m.startswith("leaver POST /v1/completions")]
    (stayer,) = [m for m in caplog.messages if m.startswith("stayer POST /v1/completions")]
    assert leaver.split()[3] == "499", leaver
    assert "disconnected" not in leaver and "200" not in leaver.split()[3:4]
    assert stayer.split()[3] == "200", stayer


# ---- item 11 ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("bad")
    incomplete = root / "incomplete"
    shutil.copytree(tiny_model.art, incomplete)
    (incomplete / "model.onnx").unlink()
    empty = root / "empty"
    empty.mkdir()
    return {"missing": (str(root / "nowhere"), "is neither a model directory"),
            "incomplete": (str(incomplete), "model.onnx is missing"),
            "not-a-model": (str(empty), "not a gpt2-engine model directory"),
            "unknown-name": ("gpt3", "nor a Hugging Face repo id"),
            "random-repo": ("someone/model --init random", "random weights need a size name"),
            "missing-draft": (f"{tiny_model.art} --draft {root / 'no-draft'}", "does not exist")}


@pytest.mark.parametrize("case", ["missing", "incomplete", "not-a-model", "unknown-name", "random-repo", "missing-draft"])
def test_serve_checks_the_model_before_it_listens(case, bad_models):
    model, must_say = bad_models[case]
    r = run_cli("serve", *model.split(), "--port", "0", timeout=60)
    assert r.returncode == 1, r.stderr
    assert "listening" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("Error: ") and must_say in line, line
