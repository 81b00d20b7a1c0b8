"""The bench's speculative runner (backend ort-spec: fp32 target, its int8 export drafting): same greedy
tokens as the engine's own loop, acceptance recorded, and the speed-up over the target alone computed."""

from __future__ import annotations

import numpy as np

from benchmarks.records import BenchRecord
from benchmarks.runners import EngineRunner, SpeculativeRunner
from benchmarks.tables import add_ratios
from engine.generator import Generator
from tests.runtime_fixtures import PROMPT_IDS


def test_speculative_runner_matches_the_engine_loop_and_records_acceptance(tiny_model, tiny_gen):
    # A model drafting for itself never pays (same cost), so "always" makes it speculate.
    spec = SpeculativeRunner(Generator.from_pretrained(tiny_model.art, threads=1, draft=tiny_model.art, speculate="always"))
    plain = EngineRunner(tiny_gen.backend, tiny_gen.config, tiny_gen.tokenizer)
    try:
        assert spec.greedy(PROMPT_IDS[0], 20) == plain.greedy(PROMPT_IDS[0], 20)
        timing = spec.run(np.array([PROMPT_IDS[0]]), 12)
        assert len(timing.step_s) == 11 and timing.ttft_s > 0 and timing.e2e_s >= timing.ttft_s
        assert spec.acceptance() == 1.0            # a model drafting for itself accepts everything
        assert spec.acceptance() is None           # reset after each read
        np.testing.assert_allclose(spec.logits(PROMPT_IDS[2]), plain.logits(PROMPT_IDS[2]), atol=1e-5)
    finally:
        spec.close()


def test_speedup_over_the_target_alone_is_a_ratio_of_the_same_configuration():
    def rec(backend, ms):
        r = BenchRecord(backend=backend, model="gpt2-large", precision="fp32", batch=1, prompt_len=32,
                        new_tokens=64)
        r.decode_per_token = {"p50": ms / 1e3, "p90": ms / 1e3, "p99": ms / 1e3, "n": 3}
        return r

    spec, alone, other = rec("engine-ort-spec", 60.0), rec("engine-ort", 100.0), rec("engine-ort", 10.0)
    other.prompt_len = 512                         # another configuration: not the one to compare with
    add_ratios([spec, alone, other])
    assert spec.ratios["decode_vs_target_alone"] == 0.6
    assert "decode_vs_target_alone" not in alone.ratios
