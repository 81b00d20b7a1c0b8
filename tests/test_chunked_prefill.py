"""Chunked prefill (backends with a prompt limit, e.g. a TensorRT profile) equals one-shot prefill."""

import numpy as np
import pytest

from engine.config import GPT2Config
from engine.generator import Generator
from engine.sampling import SamplingParams
from export.checkpoint import random_weights, save_checkpoint
from export.exporter import export_model


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=50257, n_positions=1024)
    d = tmp_path_factory.mktemp("chunked")
    save_checkpoint(d / "ckpt", cfg, random_weights(cfg, seed=3, init_range=0.1))
    export_model(str(d / "ckpt"), d / "art", show_progress=False)
    return Generator.from_pretrained(d / "art", threads=1)


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_prefill_matches_one_shot(generator, chunk):
    prompts = ["word " * 40, "hello there " * 9, "x"]
    params = SamplingParams(max_new_tokens=12, temperature=0.8, top_k=20, seed=7)
    whole = generator.generate(prompts, params)
    generator.backend.max_prompt = chunk
    try:
        chunked = generator.generate(prompts, params)
    finally:
        del generator.backend.max_prompt
    for a, b in zip(whole, chunked):
        assert a.token_ids == b.token_ids
        assert len(set(a.token_ids)) > 3  # diverse output: the comparison can fail


def test_chunked_prefill_logits_match(generator):
    from engine.loop import new_row, prefill
    rows = [new_row(generator.encode(p), SamplingParams.greedy(1), generator.tokenizer) for p in ["a b c d e f g", "z"]]
    be = generator.backend
    ref = prefill(be, be.new_cache(2, 32), rows, pad_id=50256)
    be.max_prompt = 3
    try:
        got = prefill(be, be.new_cache(2, 32), rows, pad_id=50256)
    finally:
        del be.max_prompt
    np.testing.assert_allclose(got, ref, atol=1e-4)


@pytest.mark.parametrize("chunk", [4, 7])
def test_sequence_logits_are_chunked_by_the_prompt_limit(generator, chunk):
    """Generator.logits (teacher-forced, every position) on a backend with a prompt limit: one forward
    per chunk, continuing in the same cache, equals the one-shot forward."""
    ids = generator.encode("the cat sat on the mat and then it sat on the hat " * 2)
    whole = generator.logits(ids)
    calls = []
    be = generator.backend
    forward = be.forward
    be.max_prompt = chunk
    be.forward = lambda cache, x, *a: calls.append(x.shape[1]) or forward(cache, x, *a)
    try:
        chunked = generator.logits(ids)
    finally:
        del be.max_prompt, be.forward
    assert max(calls) <= chunk and sum(calls) == len(ids) == whole.shape[0]
    np.testing.assert_allclose(chunked, whole, atol=1e-4)
