"""bench-load's harness (benchmarks/engine_load.py) on the tiny model: it validates, then records ratios."""

import json

from benchmarks.engine_load import LoadPlan, run_load_bench
from tests.runtime_fixtures import load_generator, tiny_model  # noqa: F401  (fixture)


def test_load_bench_validates_then_records_every_ratio(tiny_model, tmp_path):  # noqa: F811
    lines = []
    with load_generator(tiny_model, max_batch=4, prefix_caching=False) as gen:
        rec = run_load_bench(gen, LoadPlan(batch=4, prompt_len=6, new_tokens=8, rounds=1, raw_repeats=3),
                             tmp_path / "load.json", echo=lines.append)
    assert lines[0] == "All results match. Starting benchmarks."
    assert set(rec["median_ratios"]) == {"together_vs_static_tokens_per_s", "together_last_ttft_vs_static_ttft",
                                         "static_decode_step_vs_raw_bB", "closed_vs_ceiling", "raw_bB_vs_b1",
                                         "host_b1_vs_raw_b1", "host_bB_vs_raw_bB"}
    assert all(v > 0 for v in rec["median_ratios"].values())
    assert len(rec["first_tokens_ms_last_round"]) == 4 and rec["mixed_steps"] is True
    assert json.loads((tmp_path / "load.json").read_text())["plan"]["batch"] == 4
