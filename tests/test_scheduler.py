"""engine/scheduler.py alone: plans from rows and a cost model, no backend, no threads, no clock."""

import pytest

from engine.scheduler import ITL_STRETCH, MAX_IDLE_TOKENS, MIN_CHUNK, Budget, Chunk, CostModel, RowInfo, Work, schedule, step_budget

CAP = 1024


def fresh(key, n):
    return RowInfo(key, prompt_len=n, prefilled=0, decoding=False)


def decoding(key, n=10):
    return RowInfo(key, prompt_len=n, prefilled=n, decoding=True)


def test_decode_only_step_feeds_every_decoding_row_and_no_chunk():
    plan = schedule([decoding(1), decoding(2), decoding(3)], budget=64, capacity=CAP)
    assert plan.decode == (1, 2, 3) and plan.first_chunk is None and plan.chunks == () and plan.chunk_len == 0
    assert plan.tokens == 3 and not plan.empty


def test_requests_that_arrive_together_share_one_forward():
    """Eight 12-token prompts and a budget of 96 padded tokens: all in one step (one into the first
    segment, since nothing decodes, seven into the chunk segment)."""
    plan = schedule([fresh(k, 12) for k in range(8)], budget=96, capacity=CAP)
    assert plan.decode == () and plan.first_chunk == Chunk(0, 0, 12, True)
    assert [c.key for c in plan.chunks] == list(range(1, 8)) and plan.chunk_len == 12
    assert all(c.last and c.length == 12 for c in plan.chunks)
    assert plan.tokens == 96


def test_prompts_ride_in_the_decode_step_within_the_budget():
    rows = [decoding(0), decoding(1)] + [fresh(k, 12) for k in range(2, 8)]
    plan = schedule(rows, budget=40, capacity=CAP)
    assert plan.decode == (0, 1) and plan.first_chunk is None
    # 3 rows x 12 = 36 padded tokens fit 40 and give 3 first tokens now; 4 rows x 10 would feed 40 tokens
    # but complete none. The earliest go first.
    assert [c.key for c in plan.chunks] == [2, 3, 4] and plan.chunk_len == 12
    assert plan.tokens == 2 + 36


def test_a_long_prompt_is_chunked_and_continues_where_it_stopped():
    plan = schedule([decoding(0), fresh(1, 500)], budget=64, capacity=CAP)
    assert plan.chunks == (Chunk(1, 0, 64, False),)
    plan = schedule([decoding(0), RowInfo(1, 500, 448, False)], budget=64, capacity=CAP)
    assert plan.chunks == (Chunk(1, 448, 52, True),) and plan.chunk_len == 52


def test_packing_keeps_the_prefix_that_feeds_the_most_real_tokens():
    """A long prompt first and short ones after: padding every row to the budget's share would waste
    most of it, so the plan takes the long prompt's chunk alone when that feeds more real tokens."""
    plan = schedule([decoding(0), fresh(1, 300), fresh(2, 4), fresh(3, 4)], budget=64, capacity=CAP)
    assert [c.key for c in plan.chunks] == [1] and plan.chunk_len == 64
    plan = schedule([decoding(0), fresh(1, 20), fresh(2, 18), fresh(3, 16)], budget=64, capacity=CAP)
    assert [c.key for c in plan.chunks] == [1, 2, 3] and plan.chunk_len == 20   # 54 real of 60 padded


def test_padding_stays_inside_each_row_and_backend_limits_hold():
    # Row 2 is 15 slots from the end of the cache: the segment's T (shared by its rows) cannot exceed that.
    rows = [decoding(0), RowInfo(2, CAP - 5, CAP - 15, False), RowInfo(1, 100, 0, False)]
    plan = schedule(rows, budget=64, capacity=CAP)
    assert [c.key for c in plan.chunks] == [2, 1] and plan.chunk_len == 15 and all(c.start + plan.chunk_len <= CAP for c in plan.chunks)
    plan = schedule([fresh(k, 40) for k in range(4)], budget=MAX_IDLE_TOKENS, capacity=CAP, max_prompt=16)
    assert plan.first_chunk.length == 16 and plan.chunk_len == 16
    plan = schedule([decoding(0), decoding(1)] + [fresh(k, 8) for k in range(2, 6)], budget=64, capacity=CAP,
                    max_rows=3)
    assert len(plan.decode) + len(plan.chunks) == 3


def test_finished_and_fully_prefilled_rows_are_not_planned():
    done_prompt = RowInfo(5, 10, 10, False)     # prompt in, first token not sampled yet (no token to feed)
    plan = schedule([done_prompt], budget=64, capacity=CAP)
    assert plan.empty and plan.tokens == 0


def test_plan_work_counts_what_the_cost_model_prices():
    plan = schedule([decoding(0), decoding(1), RowInfo(2, 300, 200, False), fresh(3, 40)], budget=80, capacity=CAP)
    assert plan.chunk_len == 40 and [c.key for c in plan.chunks] == [2, 3]
    # The chunk segment's attention reads [0, L) of each of its rows, L = the furthest row's start + T.
    assert plan.work == Work(decode=2, prompt=80, slots=2 * (200 + 40))
    idle = schedule([fresh(0, 30)], budget=MAX_IDLE_TOKENS, capacity=CAP)
    assert idle.work == Work(decode=0, prompt=30, slots=0)     # the first segment's attention reads in place


def truth(w: Work) -> float:
    """A forward's seconds: gpt2 on 2 cores, roughly (docs/bench, issue 21)."""
    return 0.012 + 0.0013 * w.decode + 0.001 * w.prompt + 0.000015 * w.slots


def mixed_history():
    for i in range(60):
        d = 1 + i % 8
        yield Work(decode=d)
        if i % 3 == 0:
            rows, T, start = 1 + i % 4, 4 + i % 29, (i * 37) % 400
            yield Work(decode=d, prompt=rows * T, slots=rows * (start + T))


def test_cost_model_recovers_each_part_of_a_forward():
    cm = CostModel()
    assert not cm.known and cm.coefficients() == (0.0, 0.0, 0.0, 0.0) and cm.fit() == (0.0, 0.0)
    for w in mixed_history():
        cm.observe(w, truth(w))
    fixed, per_row, per_token, per_1000_slots = cm.coefficients()
    assert fixed == pytest.approx(0.012, rel=0.02) and per_row == pytest.approx(0.0013, rel=0.05)
    assert per_token == pytest.approx(0.001, rel=0.05) and per_1000_slots == pytest.approx(0.015, rel=0.05)
    w = Work(decode=3, prompt=50, slots=2 * 450)
    assert cm.predict(w) == pytest.approx(truth(w), rel=0.02)
    assert cm.fit() == (fixed, per_token)


def test_cost_model_keeps_its_prior_for_parts_it_has_not_seen():
    """Only batch-1 decode steps seen: the fixed part and the prior's shares predict them exactly, and a
    prompt token is priced at the prior's share, not at zero (which would admit any chunk)."""
    cm = CostModel()
    for _ in range(5):
        cm.observe(Work(decode=1), 0.017)
    assert cm.predict(Work(decode=1)) == pytest.approx(0.017, rel=0.01)
    fixed, _, per_token, per_slot = cm.coefficients()
    assert per_token == pytest.approx(fixed * CostModel.PRIOR[2], rel=0.05) and per_slot > 0


def test_one_outlier_does_not_move_the_prices():
    """A forward 30x its prediction (fresh memory faulted in, another process) counts as OUTLIER x it."""
    cm, ref = CostModel(), CostModel()
    for w in mixed_history():
        cm.observe(w, truth(w))
        ref.observe(w, truth(w))
    cm.observe(Work(decode=2, prompt=40, slots=5 * 130), 0.7)
    w = Work(decode=7, prompt=16, slots=500)
    assert cm.predict(w) < 1.1 * ref.predict(w)


def test_step_budget_bounds_the_decoding_rows_step_time():
    cm = CostModel()
    assert step_budget(2, 8, cm) == Budget(MIN_CHUNK)             # nothing measured yet
    assert step_budget(0, 8, cm) == Budget(MAX_IDLE_TOKENS)       # nobody waits on the step
    for w in mixed_history():
        cm.observe(w, truth(w))
    limit = ITL_STRETCH * cm.predict(Work(decode=8))
    for n_dec in (1, 4, 7):
        budget = step_budget(n_dec, 8, cm)
        for start in (0, 200, 480):
            plan = schedule([decoding(k) for k in range(n_dec)] + [RowInfo(99, 600, start, False)], budget,
                            capacity=CAP, cost=cm)
            T = plan.chunk_len
            assert T >= MIN_CHUNK
            # The step costs at most ITL_STRETCH x a full batch's decode step, unless only MIN_CHUNK fits;
            # one token more would not fit.
            assert T == MIN_CHUNK or cm.predict(plan.work) <= limit + 1e-9
            more = Work(n_dec, T + 1, start + T + 1)
            assert cm.predict(more) > limit


def test_the_price_of_a_deep_chunk_row_keeps_the_plan_to_fewer_rows():
    """Two prompts deep into long contexts: both rows would read ~900 slots each for a few tokens; the
    priced plan takes the first one alone with a longer chunk."""
    cm = CostModel()
    for w in mixed_history():
        cm.observe(w, truth(w))
    rows = [decoding(k) for k in range(4)] + [RowInfo(10, 990, 900, False), RowInfo(11, 990, 900, False)]
    plan = schedule(rows, step_budget(4, 8, cm), capacity=CAP, cost=cm)
    assert [c.key for c in plan.chunks] == [10]
    with pytest.raises(ValueError, match="cost model"):
        schedule(rows, step_budget(4, 8, cm), capacity=CAP)


def test_copy_rate_is_learned_from_long_copies_and_resists_one_outlier():
    cm = CostModel()
    assert cm.predict_copy(1000) == 0.0                        # nothing timed: copies are not priced yet
    cm.observe_copy(4, 0.001)                                  # a short copy times its call overhead: ignored
    assert cm.predict_copy(1000) == 0.0
    for _ in range(20):
        cm.observe_copy(500, 0.0025)                           # 5 ms per 1000 slots
    assert cm.predict_copy(1000) == pytest.approx(0.005)
    cm.observe_copy(500, 0.5)                                  # a page fault storm: capped at OUTLIER x the rate
    assert cm.predict_copy(1000) < 0.0052
