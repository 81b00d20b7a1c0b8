"""The KV cache is allocated once per Generator (the engine's slot pool) and written in place, at the
right slots.

(a) one `new_cache` per Generator, however many generate/stream calls (max_batch rows of the context's
    capacity); ORT writes into the very numpy buffers that were bound (present output == past input ==
    the numpy array, for the pool and for its row views), exactly at the slots the tokens occupy;
(b) with the standard-ops cache write (TensorScatter, attention "fused"), ORT never logs "copying
    past_cache to present_cache" during generation, while a plain `session.run` with numpy feeds (no
    aliasing) does, in the same test: the check can fail. (The default "gqa" graph has no such message:
    (a)'s pointer and slot checks are its proof);
(c) prefill + N single-token decode steps == one full forward over the same tokens (the test that
    catches cache-position bugs), for one row and for a right-padded batch.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.backends.ort import OrtBackend
from engine.loop import decode_step, new_row, prefill
from engine.sampling import SamplingParams
from tests.runtime_fixtures import EOS, PROMPTS, TINY_INIT, load_generator, make_model

COPY_WARNING = "copying past_cache to present_cache"


@pytest.fixture
def caches(monkeypatch):
    """Every cache `OrtBackend.new_cache` makes during the test, in order."""
    made = []
    original = OrtBackend.new_cache

    def counting(self, batch, capacity, commit=False):
        cache = original(self, batch, capacity, commit)
        made.append(cache)
        return cache

    monkeypatch.setattr(OrtBackend, "new_cache", counting)
    return made


def filled_slots(cache) -> np.ndarray:
    """(B, S) bool: slot s of row b holds data in every layer's key and value buffer."""
    per_buffer = [np.any(a != 0, axis=(1, 3)) for a in cache.arrays]                # each (B, S)
    assert all((p == per_buffer[0]).all() for p in per_buffer), "layers disagree on which slots are written"
    return per_buffer[0]


@pytest.fixture
def fresh_gen(tiny_model):
    """A Generator of its own: its slot pool is allocated during the test (the `caches` fixture sees it)."""
    gen = load_generator(tiny_model, max_batch=4)
    yield gen
    gen.close()


def test_one_allocation_per_generator_written_in_place(fresh_gen, caches):
    tiny_gen = fresh_gen
    cfg = tiny_gen.config
    params = SamplingParams(max_new_tokens=20, seed=0, stop_at_eos=False)
    out = tiny_gen.generate(PROMPTS[1], params)
    assert len(caches) == 1, f"generate allocated {len(caches)} caches"
    cache = caches[0]
    L, n = len(out.prompt_token_ids), len(out.token_ids)
    assert n == 20 and cache.batch == 4 + 1 and cache.capacity == tiny_gen.max_context   # + the scratch row (swaps)

    # The numpy arrays are the buffers ORT used: past input, present output and array share memory, in the
    # pool's binding and in the one-row view the request ran on (rows [0, 1): the same addresses).
    assert len(cache.arrays) == len(cache.buffers) == 2 * cfg.n_layer
    row = cache.views[(0, 1)]
    for c in (cache, row):
        outputs = c.binding.get_outputs()                                           # logits, then presents
        for arr, ov, present, pool in zip(c.arrays, c.buffers, outputs[1:], cache.arrays):
            assert arr.shape == (c.batch, cfg.n_head, cache.capacity, cfg.head_dim)  # (B, nh, S, hs)
            assert ov.data_ptr() == arr.ctypes.data == pool.ctypes.data
            assert present.data_ptr() == arr.ctypes.data, "present was not written into the past buffer"

    # Every token fed to the model sits at its slot: the prompt and all generated tokens but the last
    # (which is sampled, never fed). Beyond that, and in the other rows, the buffer is untouched.
    filled = filled_slots(cache)                                                    # (B, S)
    assert filled[0, :L + n - 1].all(), f"unwritten slots: {np.flatnonzero(~filled[0, :L + n - 1])}"
    assert not filled[0, L + n - 1:].any(), f"written beyond the last fed token: {np.flatnonzero(filled[0])}"
    assert not filled[1:].any()

    # Stream and batch requests reuse the pool.
    list(tiny_gen.stream(PROMPTS[0], params))
    tiny_gen.generate(PROMPTS, params)
    assert len(caches) == 1


def test_batch_rows_written_at_their_own_slots(fresh_gen, caches):
    # Rows that finish together are freed last-slot first, so no row moves (compaction copies none) and
    # each row's slots are exactly its own tokens.
    params = SamplingParams.greedy(12, stop_at_eos=False)
    outs = fresh_gen.generate(PROMPTS, params)
    (cache,) = caches
    lengths = [len(o.prompt_token_ids) for o in outs]
    T = max(lengths)
    filled = filled_slots(cache)                                                    # (B, S)
    for b, (o, L) in enumerate(zip(outs, lengths)):
        fed = L + len(o.token_ids) - 1
        assert filled[b, :fed].all(), f"row {b}: unwritten slots {np.flatnonzero(~filled[b, :fed])}"
        # Past the fed tokens a row may hold only its right padding (< T): nothing at or beyond
        # max(T, fed) (a finished row is never re-fed).
        assert not filled[b, max(T, fed):].any(), f"row {b} written at {np.flatnonzero(filled[b])}"


@pytest.fixture(scope="module")
def tiny_fused_gen(tmp_path_factory):
    gen = load_generator(make_model(tmp_path_factory, "tiny", init=TINY_INIT, attention="fused"))
    yield gen
    gen.close()


def test_no_cache_copy_warning_and_the_control_shows_it(tiny_fused_gen, capfd):
    tiny_gen = tiny_fused_gen
    assert tiny_gen.backend.attention == "fused"
    import onnxruntime as ort
    ort.set_default_logger_severity(2)  # WARNING, ORT's default: the level the copy message is logged at
    capfd.readouterr()

    tiny_gen.generate(PROMPTS[:2], SamplingParams(max_new_tokens=8, seed=0))
    list(tiny_gen.stream(PROMPTS[2], SamplingParams.greedy(8)))
    err = capfd.readouterr().err
    assert COPY_WARNING not in err, f"ORT copied the KV cache during generation:\n{err[:2000]}"

    # Negative control on the same session: numpy feeds, ORT allocates `present` itself and must copy.
    cfg = tiny_gen.config
    feeds = {"input_ids": np.array([[464, 3616, 286]], np.int64), "cache_positions": np.zeros(1, np.int64),
             "logits_indices": np.array([[2]], np.int64)}
    for past, _ in _pairs(cfg.n_layer):
        feeds[past] = np.zeros((1, cfg.n_head, 8, cfg.head_dim), np.float32)      # (B, nh, S, hs)
    tiny_gen.backend.session.run(None, feeds)
    err = capfd.readouterr().err
    assert COPY_WARNING in err, f"the control did not produce ORT's copy warning; stderr was:\n{err[:2000]}"


def _pairs(n_layer: int):
    from engine.artifact import cache_io_pairs
    return cache_io_pairs(n_layer)


# ---- (c) prefill + N decode steps == full forward ------------------------------------------------------

def _tol(full: np.ndarray) -> float:
    # fp32 summation-order noise scales with the logits (measured 2e-6 on tiny, 3e-5 on gpt2 at init 0.1,
    # max |logit| ~4 and ~16); a wrong slot or mask moves logits by O(1).
    return 1e-5 * max(1.0, float(np.abs(full).max())) * 10


def test_prefill_then_decode_steps_equal_full_forward(tiny_gen):
    be = tiny_gen.backend
    ids = np.random.default_rng(0).integers(0, EOS, 48)                            # (T,)
    full = tiny_gen.logits(ids)                                                     # (T, V)
    P = 17
    cache = be.new_cache(1, len(ids))
    pre = be.forward(cache, ids[None, :P], np.zeros(1, np.int64), np.arange(P)[None])[0]  # (P, V)
    np.testing.assert_allclose(pre, full[:P], rtol=0, atol=_tol(full))
    for t in range(P, len(ids)):
        step = decode_step(be, cache, ids[t:t + 1], np.array([t], np.int64))[0]    # (V,)
        np.testing.assert_allclose(step, full[t], rtol=0, atol=_tol(full), err_msg=f"decode step at position {t}")


def test_batched_prefill_and_decode_equal_each_rows_full_forward(tiny_gen):
    """Rows of 30, 9 and 1 prompt tokens, right-padded in one prefill, then 12 decode steps together."""
    be = tiny_gen.backend
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, EOS, n + 12) for n in (30, 9, 1)]
    rows = [new_row(list(s[:-12]), SamplingParams.greedy(12), tiny_gen.tokenizer) for s in seqs]
    fulls = [tiny_gen.logits(s) for s in seqs]                                      # each (T_b, V)
    cache = be.new_cache(3, max(len(s) for s in seqs))
    last = prefill(be, cache, rows, pad_id=EOS)                                     # (B, V)
    positions = np.array([len(r.prompt_ids) for r in rows], np.int64)               # (B,)
    for b in range(3):
        np.testing.assert_allclose(last[b], fulls[b][positions[b] - 1], rtol=0, atol=_tol(fulls[b]),
                                   err_msg=f"prefill row {b}")
    for step in range(12):
        tokens = np.array([s[p] for s, p in zip(seqs, positions)], np.int64)       # (B,)
        logits = decode_step(be, cache, tokens, positions)                          # (B, V)
        for b in range(3):
            np.testing.assert_allclose(logits[b], fulls[b][positions[b]], rtol=0, atol=_tol(fulls[b]),
                                       err_msg=f"decode step {step}, row {b}, position {positions[b]}")
        positions += 1


def test_chunked_prefill_equals_one_shot_prefill(tiny_model, caches):
    """Backends with a prefill limit (`max_prompt`, e.g. a TensorRT profile) get prompts in chunks; on
    ORT, forced to chunks of 7, the tokens and every cache slot each request wrote equal a one-shot
    prefill (two fresh Generators; the loop may place a request in other rows in the two runs, and a
    later row may move into a finished one's slot, so each request's slots are copied when it ends)."""
    prompts = [PROMPTS[1], PROMPTS[3], PROMPTS[2], " the" * 30]  # last tokens in chunks 2, 0, 1 and 4
    params = [SamplingParams(max_new_tokens=n, seed=n) for n in (10, 4, 7, 12)]
    ended = []                                          # per run: prompt -> its filled slots, per buffer

    def recording(gen):
        free, rows = gen.core._free, {}
        ended.append(rows)

        def record(r):
            rows[tuple(r.row.prompt_ids)] = [a[r.slot, :, :r.filled].copy() for a in gen.core._cache.arrays]
            free(r)
        gen.core._free = record
        return gen
    with recording(load_generator(tiny_model, max_batch=4)) as gen:
        one_shot = gen.generate(prompts, params)
    with recording(load_generator(tiny_model, max_batch=4)) as gen:
        gen.backend.max_prompt = 7
        chunked = gen.generate(prompts, params)
    assert [o.token_ids for o in chunked] == [o.token_ids for o in one_shot]
    assert [o.text for o in chunked] == [o.text for o in one_shot]
    assert len(caches) == 2 and len(ended[0]) == len(ended[1]) == 4
    for key, slots_a in ended[0].items():
        slots_b = ended[1][key]
        assert slots_a[0].shape == slots_b[0].shape and slots_a[0].shape[1] >= len(key)
        for x, y in zip(slots_a, slots_b):
            np.testing.assert_allclose(y, x, rtol=0, atol=1e-5)
