"""One forward, two segments (OrtBackend.forward_mixed): decode rows through GroupQueryAttention and
prompt chunks at any positions through the chunk segment give the logits and cache of separate forwards."""

import numpy as np
import pytest

from engine.backends.base import Segment
from engine.errors import BackendUnavailable, InputError
from tests.runtime_fixtures import tiny_gen, tiny_model  # noqa: F401  (fixtures)

CAP = 96


def _alone(be, seq):
    """Every position's logits of one sequence run alone from position 0: (T, V)."""
    c = be.new_cache(1, CAP)
    return be.forward(c, np.asarray(seq)[None], np.array([0]), np.arange(len(seq))[None])[0]


def _tol(ref):
    return 1e-4 * max(1.0, float(np.abs(ref).max()))


def test_a_mixed_step_equals_each_row_alone(tiny_gen):  # noqa: F811
    be = tiny_gen.backend
    assert be.mixed_steps, "graph version 5 exports carry the chunk segment"
    rng = np.random.default_rng(0)
    V = tiny_gen.config.vocab_size
    seqs = [rng.integers(0, V, n) for n in (20, 33, 7, 12, 40)]
    refs = [_alone(be, s) for s in seqs]
    pool = be.new_cache(6, CAP)
    # Rows 0, 1 decode (their sequences but the last token in the cache); row 2 is fresh; rows 3 and 4
    # hold 5 and 10 prompt tokens already. Row 5 stays untouched.
    for r, (s, n) in enumerate([(seqs[0], 19), (seqs[1], 32), (seqs[3], 5), (seqs[4], 10)]):
        row = (0, 1, 3, 4)[r]
        be.forward(be.view(pool, row, row + 1), s[None, :n], np.array([0]), np.zeros((1, 1), np.int64))
    before = [a.copy() for a in pool.arrays]
    first = Segment(0, 2, np.array([[seqs[0][-1]], [seqs[1][-1]]]), np.array([19, 32]), np.zeros((2, 1), np.int64))
    ids = np.stack([seqs[2][:7], seqs[3][5:12], seqs[4][10:17]])                         # (3, 7): T shared
    chunk = Segment(2, 5, ids, np.array([0, 5, 10]), np.tile(np.arange(7), (3, 1)))
    la, lb = be.forward_mixed(pool, first, chunk)                                       # (2, 1, V), (3, 7, V)
    assert la.shape == (2, 1, V) and lb.shape == (3, 7, V)
    for got, ref in [(la[0, 0], refs[0][19]), (la[1, 0], refs[1][32]), (lb[0], refs[2][:7]),
                     (lb[1], refs[3][5:12]), (lb[2], refs[4][10:17])]:
        np.testing.assert_allclose(got, ref, rtol=0, atol=_tol(ref))
    # The cache was written in place, at each row's own positions only.
    for a, b in zip(pool.arrays, before):
        changed = np.flatnonzero((a != b).any(axis=(1, 2, 3)))                          # rows written
        assert set(changed.tolist()) == {0, 1, 2, 3, 4}
        assert (a[5] == 0).all()
        for row, (lo, hi) in {0: (19, 20), 1: (32, 33), 2: (0, 7), 3: (5, 12), 4: (10, 17)}.items():
            diff = np.flatnonzero((a[row] != b[row]).any(axis=(0, 2)))
            assert diff.min() >= lo and diff.max() < hi, (row, diff)
    # Decoding on after the mixed step: the chunk rows' caches are those of a prefill.
    for row, s, p in [(2, seqs[2], 7), (3, seqs[3], 12), (4, seqs[4], 17)]:
        if p < len(s):
            step = be.forward(be.view(pool, row, row + 1), s[None, p:p + 1], np.array([p]), np.zeros((1, 1), np.int64))
            np.testing.assert_allclose(step[0, 0], refs[(2, 3, 4)[row - 2]][p], rtol=0, atol=_tol(refs[0]))


def test_padded_chunk_rows_and_several_new_tokens_at_batch_above_one(tiny_gen):  # noqa: F811
    """Rows with fewer real tokens than the segment's T are right-padded: their real positions' logits
    are exact. A plain forward of several new tokens on filled rows (B > 1) goes through the chunk
    segment too (GroupQueryAttention refuses it)."""
    be = tiny_gen.backend
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, tiny_gen.config.vocab_size, n) for n in (30, 25)]
    refs = [_alone(be, s) for s in seqs]
    pool = be.new_cache(3, CAP)
    be.forward(be.view(pool, 0, 1), seqs[0][None, :10], np.array([0]), np.zeros((1, 1), np.int64))
    ids = np.stack([seqs[0][10:20], np.concatenate([seqs[1][:4], np.zeros(6, np.int64)])])   # row 2: 4 real + 6 pad
    la, lb = be.forward_mixed(pool, Segment(0, 1, seqs[0][None, 10:20], np.array([10]), np.array([[9]])),
                              Segment(1, 3, ids, np.array([20, 0]), np.array([[0], [3]])))
    np.testing.assert_allclose(la[0, 0], refs[0][19], rtol=0, atol=_tol(refs[0]))
    np.testing.assert_allclose(lb[1, 0], refs[1][3], rtol=0, atol=_tol(refs[1]))
    c = be.new_cache(2, CAP)
    be.forward(c, np.stack([seqs[0][:8], seqs[1][:8]]), np.zeros(2, np.int64), np.zeros((2, 1), np.int64))
    out = be.forward(c, np.stack([seqs[0][8:20], seqs[1][8:20]]), np.array([8, 8]), np.tile(np.arange(12), (2, 1)))
    for b in range(2):
        np.testing.assert_allclose(out[b], refs[b][8:20], rtol=0, atol=_tol(refs[b]))


def test_mixed_step_refuses_bad_segments(tiny_gen):  # noqa: F811
    be = tiny_gen.backend
    pool = be.new_cache(4, CAP)
    one = np.zeros((1, 1), np.int64)
    with pytest.raises(InputError, match="overlap"):
        be.forward_mixed(pool, Segment(0, 2, np.zeros((2, 1), np.int64), np.zeros(2, np.int64), np.zeros((2, 1), np.int64)),
                         Segment(1, 2, one, np.zeros(1, np.int64), one))
    with pytest.raises(InputError, match="needs 2 rows"):
        be.forward_mixed(pool, Segment(0, 1, one, np.zeros(1, np.int64), one),
                         Segment(1, 3, one, np.zeros(1, np.int64), one))
    with pytest.raises(InputError, match="capacity"):
        be.forward_mixed(pool, Segment(0, 1, one, np.zeros(1, np.int64), one),
                         Segment(1, 2, np.zeros((1, 8), np.int64), np.array([CAP - 4]), one))


def test_graphs_without_the_chunk_segment_say_to_re_export(tiny_gen, monkeypatch):  # noqa: F811
    be = tiny_gen.backend
    monkeypatch.setattr(be, "mixed_steps", False)
    one = np.zeros((1, 1), np.int64)
    with pytest.raises(BackendUnavailable, match="re-run `gpt2-engine export`"):
        be.forward_mixed(be.new_cache(2, CAP), Segment(0, 1, one, np.zeros(1, np.int64), one),
                         Segment(1, 2, one, np.zeros(1, np.int64), one))
