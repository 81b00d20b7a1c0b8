"""engine/scheduler.py alone: plans from rows and a cost model, no backend, no threads, no clock."""

import pytest

from engine.scheduler import ITL_STRETCH, MAX_IDLE_TOKENS, MIN_CHUNK, Chunk, CostModel, RowInfo, prompt_budget, schedule

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


def test_cost_model_recovers_a_linear_forward_cost():
    cm = CostModel()
    assert not cm.known and cm.fit() == (0.0, 0.0)
    for tokens in [1, 8, 1, 24, 3, 40, 1, 12] * 4:
        cm.observe(tokens, 0.016 + 0.0007 * tokens)
    fixed, per = cm.fit()
    assert fixed == pytest.approx(0.016, rel=1e-6) and per == pytest.approx(0.0007, rel=1e-6)
    assert cm.predict(100) == pytest.approx(0.086, rel=1e-6)
    assert cm.tokens_within(0.007) == 10


def test_cost_model_before_a_fit_splits_one_token_count_by_its_prior():
    cm = CostModel()
    for _ in range(5):
        cm.observe(1, 0.017)                       # only batch-1 decode steps seen
    fixed, per = cm.fit()
    assert fixed + per == pytest.approx(0.017) and per == pytest.approx(fixed / CostModel.PRIOR_TOKENS_PER_FIXED)


def test_prompt_budget_bounds_the_decoding_rows_step_time():
    cm = CostModel()
    assert prompt_budget(2, 8, cm) == MIN_CHUNK                 # nothing measured yet
    assert prompt_budget(0, 8, cm) == MAX_IDLE_TOKENS           # nobody waits on the step
    for tokens in (1, 8, 4, 16, 2, 30) * 3:
        cm.observe(tokens, 0.016 + 0.0005 * tokens)
    b = prompt_budget(2, 8, cm)
    # The step with the chunk costs at most ITL_STRETCH x a full batch's decode step.
    assert cm.predict(2 + b) <= ITL_STRETCH * cm.predict(8) + 1e-9 < cm.predict(2 + b + 2)   # floor of a float
    assert prompt_budget(8, 8, cm) >= MIN_CHUNK
