"""benchmarks/prefix_cache.py on the tiny model, one small round of each part: the comparisons run, are
validated (same tokens, logprobs) and land in the record and its table."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("httpx", reason="the [serve] extra (httpx) is not installed")
pytest.importorskip("fastapi", reason="the [serve] extra is not installed")

from benchmarks import prefix_cache as bench  # noqa: E402
from server import start_in_thread  # noqa: E402
from tests.runtime_fixtures import load_generator  # noqa: E402


def test_every_part_runs_validated_and_tabulates(tiny_model):
    rng = np.random.default_rng(0)
    gen = load_generator(tiny_model, max_batch=8, threads=1)
    gens = [load_generator(tiny_model, max_batch=8, threads=1, prefix_caching=on) for on in (True, False)]
    try:
        record = {"conditions": {"cpu": "test"}, "cpu_flags": bench.cpu_flags(), "threads": 1, "parts": {}}
        parts = record["parts"]
        parts["ttft"] = bench.part_ttft(gen, 1, rng, echo=lambda *_: None)
        parts["load"] = bench.part_load(gen, 1, rng, clients=2, per_client=1, new_tokens=4, echo=lambda *_: None)
        parts["fresh"] = bench.part_fresh(tiny_model.art, 1, 1, rng, gen.config.vocab_size, echo=lambda *_: None)
        with start_in_thread(gens[0]) as on, start_in_thread(gens[1]) as off:
            servers = {"on": on, "off": off}
            parts["lm_eval"] = bench.part_lm_eval(servers, 1, rng, gen.config.vocab_size, echo=lambda *_: None)
            parts["chat"] = bench.part_chat(servers, 1, rng, gen, turns=2, max_tokens=4, echo=lambda *_: None)
        for p in parts.values():
            p["load"] = [0.0, 0.0]
        assert parts["ttft"]["rounds"][0]["on"]["cached_tokens"] == 590
        assert parts["lm_eval"]["max_logprob_diff"] < bench.LOGPROB_TOL
        assert parts["chat"]["rounds"][0]["cached_tokens"][-1] > 0
        table = bench.table(record)
        assert table.count("\n| (") == 5
    finally:
        for g in [gen, *gens]:
            g.close()
