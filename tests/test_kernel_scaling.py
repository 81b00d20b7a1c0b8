"""The kernel-scaling probe (benchmarks/kernel_scaling.py) times what it says it times: the decoder's
linear layers in order, and GroupQueryAttention over position + 1 cached slots per row."""

import numpy as np
import pytest
from click.testing import CliRunner

from benchmarks.kernel_scaling import AttentionRunner, KernelScaling, LinearRunner, layer_weights, lm_head_weight, measure, report
from cli import bench as cli
from engine.config import GPT2Config
from engine.errors import InputError

TINY = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=64)


@pytest.mark.parametrize("batch, tokens", [(3, 1), (2, 4)], ids=["decode-step", "prefill"])
def test_linear_layers_compute_the_decoder_chain(tmp_path, batch, tokens):
    runner = LinearRunner(TINY, threads=1, seed=5, work_dir=tmp_path)
    feeds = runner.inputs(batch, tokens)
    rng = np.random.default_rng(5)  # the draw order linear_model uses
    h = feeds["x"]                                                                   # (B*T, C)
    for _ in range(TINY.n_layer):
        for name, W, b in layer_weights(TINY, rng):
            h = h @ W + b
            if name == "c_attn":
                h = h[:, :TINY.n_embd]
    last = h.reshape(batch, tokens, -1)[:, -1]                                       # (B, C): each prompt's last
    expected = last @ lm_head_weight(TINY, rng).T                                    # (B, V)
    np.testing.assert_allclose(runner.run(feeds), expected, rtol=1e-4, atol=1e-4)


def test_attention_reads_position_plus_one_slots_and_writes_in_place():
    B, pos, C, nh, hs = 2, 5, TINY.n_embd, TINY.n_head, TINY.head_dim
    runner = AttentionRunner(TINY, threads=1)
    binding, caches, qkv = runner.bind(B, pos)
    before = [c.copy() for c in caches]
    runner.run(binding)
    ys = runner.attention_outputs(binding)
    q, k, v = (qkv[:, 0, j * C:(j + 1) * C].reshape(B, nh, hs) for j in range(3))  # (B, nh, hs)
    for i, y in enumerate(ys):
        K, V = caches[2 * i], caches[2 * i + 1]                                     # (B, nh, pos + 1, hs)
        np.testing.assert_array_equal(K[:, :, pos], k)                               # the step's key, in place
        np.testing.assert_array_equal(V[:, :, pos], v)
        np.testing.assert_array_equal(K[:, :, :pos], before[2 * i][:, :, :pos])      # history untouched
        scores = np.einsum("bhd,bhsd->bhs", q, K) / np.sqrt(hs)                      # (B, nh, pos + 1)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        expected = np.einsum("bhs,bhsd->bhd", probs, V).reshape(B, 1, C)             # (B, 1, C)
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


def test_scalings_are_tokens_per_second_ratios():
    r = KernelScaling(batch=8, prompt_len=32, new_tokens=11, linear_s={1: 0.018, 8: 0.027},
                      attention_s={1: 0.001, 8: 0.004}, prefill_s={1: 0.03, 8: 0.25})
    assert r.position == 32 + 5
    assert r.part_ratio("linear") == pytest.approx(1.5)
    assert r.part_ratio("attention") == pytest.approx(4.0)
    assert r.step_scaling == pytest.approx(8 * 0.019 / 0.031)
    # the bench's end-to-end accounting: the prefill gives the first token, then 10 decode steps
    assert r.tokens_scaling == pytest.approx(8 * (0.03 + 10 * 0.019) / (0.25 + 10 * 0.031))


def test_measure_and_report_on_a_tiny_model():
    results = measure(TINY, (4,), prompt_len=5, new_tokens=6, threads=1, repeats=2, progress=lambda _: None)
    (r,) = results
    assert r.batch == 4 and r.position == 8
    assert set(r.linear_s) == set(r.attention_s) == set(r.prefill_s) == {1, 4}
    assert all(t > 0 for t in (*r.linear_s.values(), *r.attention_s.values(), *r.prefill_s.values()))
    table = report("tiny", results, threads=1)
    assert "| 4 |" in table and f"{r.step_scaling:.2f}x" in table and f"{r.tokens_scaling:.2f}x" in table


@pytest.mark.parametrize("kwargs, message", [(dict(prompt_len=60, new_tokens=5), "<= 64 .the context., got 60 . 5"),
                                             (dict(prompt_len=0), "must be >= 1"),
                                             (dict(repeats=0), "must be >= 1")])
def test_measure_rejects_bad_arguments(kwargs, message):
    with pytest.raises(InputError, match=message):
        measure(TINY, (4,), threads=1, **{"new_tokens": 4, **kwargs})


def test_cli_names_the_sizes_it_knows():
    res = CliRunner().invoke(cli.bench_kernels, ["--model", "gpt3"])
    assert res.exit_code == 1
    assert "'gpt3' is not a model name (distilgpt2, gpt2, gpt2-medium" in res.output


def test_forward_scaling_times_each_model_directory_in_its_own_process(tiny_model):
    """bench-kernels --forward: decode at batch 1 and B and a prefill per model, and the table's ratios."""
    from benchmarks.kernel_scaling import forward_report, forward_scaling
    r = forward_scaling({"a": tiny_model.art, "b": tiny_model.art}, (3,), prefill_len=16, threads=1,
                        repeats=2, steps=2, progress=lambda _: None)
    assert r.batches == (1, 3) and set(r.decode) == set(r.prefill) == {"a", "b"}
    assert all(t > 0 for d in r.decode.values() for t in d.values()) and all(t > 0 for t in r.prefill.values())
    table = forward_report(r, threads=1)
    assert f"| b | {r.decode['b'][1] * 1e3:.2f} | {r.decode['b'][3] * 1e3:.2f} ({r.decode['b'][3] / r.decode['b'][1]:.2f}x)" in table
    assert f"({r.prefill['b'] / r.prefill['a']:.2f}x a)" in table


def test_cli_forward_wants_name_equals_directory(tmp_path):
    res = CliRunner().invoke(cli.bench_kernels, ["--forward", str(tmp_path)])
    assert res.exit_code == 1 and "--forward takes NAME=DIR" in res.output
