"""Benchmark arithmetic: percentiles, ratios, the floor's byte/FLOP counts, and that the probes run.

No test asserts a timing value: machines differ. The measurement probes only have to return positive
finite numbers (with tiny buffers, so this file runs in about a second).
"""

import math

import pytest

from benchmarks import floor, stats
from engine.config import SIZES, GPT2Config


def test_percentiles_linear_interpolation_on_1_to_100():
    p = stats.percentiles(range(1, 101))
    # Fractional rank h = (n - 1) * q over the sorted samples 1..100, then linear interpolation:
    # p50: h = 49.5 -> 50 + 0.5 * (51 - 50) = 50.5; p90: h = 89.1 -> 90.1; p99: h = 98.01 -> 99.01.
    assert p["p50"] == pytest.approx(50.5)
    assert p["p90"] == pytest.approx(90.1)
    assert p["p99"] == pytest.approx(99.01)
    assert (p["mean"], p["min"], p["max"], p["n"]) == (50.5, 1.0, 100.0, 100)


def test_percentiles_single_sample_is_every_percentile():
    p = stats.percentiles([0.25])
    assert p == {"p50": 0.25, "p90": 0.25, "p99": 0.25, "mean": 0.25, "min": 0.25, "max": 0.25, "n": 1}


def test_percentiles_order_does_not_matter_and_bad_input_is_rejected():
    assert stats.percentiles([3, 1, 2]) == stats.percentiles([1, 2, 3])
    with pytest.raises(ValueError, match="non-empty"):
        stats.percentiles([])
    with pytest.raises(ValueError, match="finite"):
        stats.percentiles([1.0, float("nan")])


def test_summarize_ms_scales_everything_but_n():
    p = stats.summarize_ms([0.010, 0.020, 0.030])
    assert p["p50"] == pytest.approx(20.0)
    assert p["min"] == pytest.approx(10.0) and p["max"] == pytest.approx(30.0)
    assert p["n"] == 3


def test_rates_and_ratios():
    # 32 tokens in 0.5 s and in 2 s.
    assert stats.rates(32, [0.5, 2.0]) == [64.0, 16.0]
    with pytest.raises(ValueError, match="> 0"):
        stats.rates(32, [0.0])
    assert stats.x_floor(0.035, 0.025) == pytest.approx(1.4)
    # A failed backend has no time: the ratio is absent, not an exception.
    assert stats.ratio(None, 0.025) is None and stats.ratio(1.0, None) is None
    assert stats.ratio(1.0, 0) is None


def test_gpt2_weight_bytes_by_hand():
    cfg = SIZES["gpt2"]  # 12 layers, 768 wide, vocab 50257, 1024 positions
    C, L, V = 768, 12, 50257
    # Per block: matmul weights c_attn 3C^2 + attn c_proj C^2 + c_fc 4C^2 + mlp c_proj 4C^2 = 12C^2
    #            = 12 * 589_824 = 7_077_888; biases 3C + C + 4C + C = 9C; ln_1 and ln_2 2C each = 4C;
    #            7_077_888 + 13 * 768 = 7_087_872.
    per_block = 12 * C * C + 13 * C
    assert per_block == 7_087_872
    # 12 blocks 85_054_464 + ln_f 2C = 1_536 + LM head (= wte, tied) V * C = 38_597_376;
    # wpe (1024 * 768) is only gathered one row per token, so it is not counted.
    params_read = L * per_block + 2 * C + V * C
    assert params_read == 123_653_376
    assert floor.gpt2_weight_bytes(cfg, 4) == 4 * 123_653_376 == 494_613_504  # ~495 MB in fp32
    assert floor.gpt2_weight_bytes(cfg, 2) == 247_306_752  # fp16
    assert floor.gpt2_weight_bytes(cfg, 4) == 4 * (cfg.n_params() - 1024 * 768)


def test_gpt2_flops_by_hand():
    cfg = SIZES["gpt2"]
    C, L, V = 768, 12, 50257
    matmul = 12 * L * C * C  # 84_934_656 block weights
    assert floor.gpt2_matmul_params(cfg) == matmul + V * C
    # One decode token after 100 cached: 2 FLOPs per block weight, LM head once, and attention over
    # S = 101 keys: 4 * L * C * S.
    assert floor.gpt2_flops(cfg, 1, 100) == 2 * matmul + 2 * V * C + 4 * L * C * 101
    # Prefill of 4 tokens: keys attended 1 + 2 + 3 + 4 = 10; logits for the last position only.
    assert floor.gpt2_flops(cfg, 4) == 4 * 2 * matmul + 2 * V * C + 4 * L * C * 10
    # Logits at every position (what HF computes) adds the LM head 3 more times.
    assert floor.gpt2_flops(cfg, 4, logits_positions=4) - floor.gpt2_flops(cfg, 4) == 3 * 2 * V * C
    # The often-quoted "~130 GFLOP for a 512-token prefill" counts logits everywhere.
    assert floor.gpt2_flops(cfg, 512, logits_positions=512) / 1e9 == pytest.approx(131.3, abs=0.1)


def test_kv_bytes_by_hand():
    cfg = SIZES["gpt2"]
    # K and V, 12 layers, 512 positions, 768 floats of 4 bytes: 2 * 12 * 512 * 768 * 4.
    assert floor.gpt2_kv_bytes(cfg, 512) == 37_748_736


def test_floor_arithmetic_on_made_up_rates():
    assert floor.decode_floor_s(500e6, 20e9) == pytest.approx(0.025)  # 500 MB at 20 GB/s: 25 ms
    assert floor.prefill_floor_s(130e9, 145e9) == pytest.approx(0.8966, abs=1e-4)
    with pytest.raises(ValueError, match="bandwidth_Bps must be > 0"):
        floor.decode_floor_s(1.0, 0)
    with pytest.raises(ValueError, match="flops_per_s must be > 0"):
        floor.prefill_floor_s(1.0, -1)


def test_floor_record_decode_is_bandwidth_bound_at_batch_1():
    cfg = SIZES["gpt2"]
    rec = floor.floor_record(cfg, batch=1, prompt_len=0, new_tokens=0, bytes_per_param=4,
                             bandwidth_GBps=20.0, gflops=100.0)
    # Empty context: just the weights, 494_613_504 B / 20e9 B/s = 24.73 ms.
    assert rec["decode_floor_s"] == pytest.approx(494_613_504 / 20e9)
    assert rec["prefill_floor_s"] == 0.0
    tiny = GPT2Config(n_layer=1, n_head=1, n_embd=4, vocab_size=10, n_positions=8)
    # A huge batch on a tiny model is compute-bound: the roofline takes the larger time.
    rec = floor.floor_record(tiny, batch=10**6, prompt_len=2, new_tokens=2, bytes_per_param=4,
                             bandwidth_GBps=1e6, gflops=1e-3)
    assert rec["decode_floor_s"] == pytest.approx(10**6 * floor.gpt2_flops(tiny, 1, 3) / 1e6)


def test_measurement_probes_return_positive_finite_numbers():
    for threads in (1, 2):
        bw = floor.measure_memory_bandwidth(threads, buffer_mb=1, repeats=2)
        gf = floor.measure_matmul_gflops(threads, m=32, k=32, n=32, repeats=2)
        assert math.isfinite(bw) and bw > 0
        assert math.isfinite(gf) and gf > 0
    with pytest.raises(ValueError, match="threads must be >= 1"):
        floor.measure_memory_bandwidth(0, buffer_mb=1)
