"""bench-serve (benchmarks/serve_bench.py, serve_report.py): the summary arithmetic and ratios, the
closed/open loops' request counts and time limits, the validation gate on a broken mode, the records ->
table round trip, the HTTP mode's stream parsing, and the CLI's one-line errors. No timing asserted."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner

from benchmarks import serve_bench, serve_report
from benchmarks.serve_bench import (
    PointRun,
    RequestResult,
    ServePlan,
    StaticMode,
    ThreadPerRequestMode,
    closed_loop,
    make_workload,
    open_loop,
    poisson_arrivals,
    static_batches,
    summarize,
    validate_mode,
    validation_cases,
)
from benchmarks.serve_report import ServeRecord, add_ratios, markdown_table, read_jsonl, write_outputs
from benchmarks.stats import percentiles
from cli import bench as cli

EOS = 50256


class ShiftedBackend:
    """A real backend whose logits are rolled by one along the vocabulary: every argmax is off by one."""

    name = "shifted"

    def __init__(self, inner):
        self.inner = inner
        self.max_prompt, self.fixed_capacity, self.max_batch = inner.max_prompt, inner.fixed_capacity, inner.max_batch

    def new_cache(self, batch, capacity, commit=False):
        return self.inner.new_cache(batch, capacity)

    def view(self, cache, start, stop):
        return self.inner.view(cache, start, stop)

    def copy_row(self, cache, src, dst, length):
        self.inner.copy_row(cache, src, dst, length)

    def forward(self, cache, input_ids, cache_positions, logits_indices):
        return np.roll(self.inner.forward(cache, input_ids, cache_positions, logits_indices), 1, axis=-1)

    def close(self):
        pass


def _result(ttft, itl, total, out=None, queue=0.0, prompt=10, error=None):
    return RequestResult(prompt, len(itl) + 1 if out is None else out, queue, ttft, tuple(itl), total, error=error)


# ---- the arithmetic ------------------------------------------------------------------------------

def test_summary_rates_and_percentiles():
    rs = [_result(0.1, [0.01, 0.03], 0.2, queue=0.0), _result(0.3, [0.02], 0.4, queue=0.1),
          _result(0.2, [0.04, 0.05, 0.06], 0.5, queue=0.2), _result(0, [], 0, error="boom")]
    s = summarize(PointRun(rs, wall_s=2.0, stopped_by="count"))
    assert s["requests"] == 3 and s["failed"] == 1 and s["errors"] == ["boom"]
    assert s["total_output_tokens"] == 3 + 2 + 4 and s["total_prompt_tokens"] == 30
    assert s["request_throughput"] == pytest.approx(1.5) and s["output_throughput"] == pytest.approx(4.5)
    assert s["ttft"]["p50"] == pytest.approx(0.2) and s["ttft"]["n"] == 3
    # ITL pools every gap of every request: 6 gaps, p50 between the 3rd and 4th (0.03, 0.04).
    assert s["itl"]["n"] == 6 and s["itl"]["p50"] == pytest.approx(0.035)
    assert s["itl"]["p99"] == pytest.approx(np.percentile([0.01, 0.03, 0.02, 0.04, 0.05, 0.06], 99))
    assert s["tpot"]["p50"] == pytest.approx(0.02) and s["tpot"]["n"] == 3   # per-request means 0.02, 0.02, 0.05
    assert s["queue"]["max"] == pytest.approx(0.2) and s["e2e"]["p50"] == pytest.approx(0.4)
    assert s["decode_step"] is None


def _rec(mode, c, tok_s, itl_p99=0.02, ttft=0.1, tpot=0.01, step=None, model="m", rnd=0):
    def p(v):
        return percentiles([v])
    d = dict(model=model, mode=mode, load="closed", concurrency=c, round=rnd, output_throughput=tok_s, request_throughput=1.0,
             requests=4, failed=0, ttft=p(ttft), tpot=p(tpot), itl={**p(itl_p99 / 2), "p99": itl_p99},
             e2e=p(1.0), queue=p(0.0))
    if step is not None:
        d["decode_step"] = p(step)
    return ServeRecord(**d)


def test_ratios_between_modes_of_one_run():
    recs = [_rec("inflight", 1, 40.0, ttft=0.11, tpot=0.021), _rec("thread-per-request", 1, 40.0, ttft=0.1, tpot=0.02),
            _rec("static", 1, 50.0, step=0.02),
            _rec("inflight", 8, 200.0, itl_p99=0.05), _rec("thread-per-request", 8, 50.0), _rec("static", 8, 250.0, step=0.04),
            _rec("inflight", 8, 99.0, model="other"),
            ServeRecord(model="m", mode="http", load="closed", concurrency=8, output_throughput=180.0,
                        itl={**percentiles([0.05]), "p99": 0.1}, ttft=percentiles([0.2]))]
    add_ratios(recs)
    one, eight, other, http = recs[0], recs[3], recs[6], recs[7]
    assert eight.ratios == pytest.approx({"tokens_vs_static": 0.8, "tokens_vs_thread_per_request": 4.0,
                                          "itl_p99_vs_static_step": 1.25})
    assert one.ratios["ttft_vs_thread_per_request"] == pytest.approx(1.1)
    assert one.ratios["tpot_vs_thread_per_request"] == pytest.approx(1.05)
    assert other.ratios == {}                              # no other mode of its model was measured
    assert http.ratios == pytest.approx({"tokens_vs_inflight": 0.9, "itl_p99_vs_inflight": 2.0, "ttft_vs_inflight": 2.0})
    goals = serve_report.goals_table(recs)
    assert "| m | 8 clients: output tokens/s >= 0.85x the static batch of 8 | 0.80x | missed |" in goals
    assert "| m | 8 clients: output tokens/s >= 3x thread-per-request | 4.00x | met |" in goals
    assert "| other | 1 client: TTFT p50 within 10% of thread-per-request (<= 1.10x) | - | not measured |" in goals
    assert "| m | 8 | 200 | 0.80x | 4.00x | 50.0 | 40.0 | 1.25x |" in serve_report.ratios_table(recs)


def test_rounds_pair_modes_within_a_round_and_goals_read_their_median(tmp_path):
    # Three rounds; the machine ran slower in round 2 (both modes): within-round ratios see through it.
    recs = []
    for rnd, (tok, itl, step) in enumerate([(200.0, 0.045, 0.03), (150.0, 0.06, 0.04), (210.0, 0.048, 0.03)]):
        recs += [_rec("inflight", 8, tok, itl_p99=itl, rnd=rnd), _rec("static", 8, tok * 1.25, step=step, rnd=rnd)]
    add_ratios(recs)
    assert [r.ratios["itl_p99_vs_static_step"] for r in recs[::2]] == pytest.approx([1.5, 1.5, 1.6])
    assert [r.ratios["tokens_vs_static"] for r in recs[::2]] == pytest.approx([0.8] * 3)
    table = serve_report.ratios_table(recs)
    assert "| m | 8 #2 | 150 | 0.80x | - | 60.0 | 40.0 | 1.50x |" in table
    assert "| m | 8 median of 3 | 200 | 0.80x | - | 48.0 | 30.0 | 1.50x |" in table
    goals = serve_report.goals_table(recs)
    assert "| m | 8 clients: ITL p99 <= 2x the static batch-8 decode step (p50) | 1.50x | met |" in goals
    assert "| static | C=8 #3 |" in markdown_table(recs)
    write_outputs(recs, tmp_path, "H")
    assert [r.round for r in read_jsonl(tmp_path / "results.jsonl")] == [0, 0, 1, 1, 2, 2]
    one = [_rec("inflight", 8, 200.0), _rec("static", 8, 250.0, step=0.04)]
    add_ratios(one)
    assert "#1" not in markdown_table(one) and "median" not in serve_report.ratios_table(one)


def test_a_failed_record_carries_no_timings_and_points_are_consistent():
    with pytest.raises(ValueError, match="no timings"):
        ServeRecord(model="m", mode="static", load="closed", concurrency=2, status="failed validation: x",
                    ttft=percentiles([1.0]))
    with pytest.raises(ValueError, match="concurrency"):
        ServeRecord(model="m", mode="static", load="open", concurrency=2)
    assert ServeRecord(model="m", mode="inflight", load="open", rate=2.5).point == "R=2.5/s"


# ---- the workload and the loads ------------------------------------------------------------------

def test_the_workload_is_fixed_and_mixed():
    a = make_workload(64, 50257, EOS, seed=3)
    assert a.prompts == make_workload(64, 50257, EOS, seed=3).prompts and a.prompts != make_workload(64, 50257, EOS).prompts
    lens = [len(p) for p in a.prompts]
    assert min(lens) >= 16 and max(lens) <= 512 and min(lens) < 40 and max(lens) > 300   # both ends present
    assert all(32 <= n <= 128 for n in a.new_tokens) and len(set(a.new_tokens)) > 10
    assert max(max(p) for p in a.prompts) < EOS
    cases = validation_cases(a, 4, 32)
    assert [len(p) for p, _ in cases][0] == min(lens) and [len(p) for p, _ in cases][-1] == max(lens)
    assert all(n <= 32 for _, n in cases)


class FakeSend:
    """A client call that sleeps and remembers which prompts it was sent (thread-safe)."""

    def __init__(self, sleep_s):
        self.sleep_s, self.seen, self.lock = sleep_s, [], threading.Lock()

    def __call__(self, prompt, n):
        with self.lock:
            self.seen.append(tuple(prompt))
        time.sleep(self.sleep_s)
        return RequestResult(len(prompt), n, 0.0, self.sleep_s / 2, (self.sleep_s / 2,), self.sleep_s)


def test_closed_loop_sends_each_request_once_in_order():
    w = make_workload(30, 1000, 999, prompt_lens=(1, 4), new_tokens=(1, 3))
    send = FakeSend(0.002)
    run = closed_loop(send, w, concurrency=3, n_requests=20, time_limit_s=60)
    assert run.stopped_by == "count" and len(run.results) == 20
    assert sorted(send.seen) == sorted(tuple(p) for p in w.prompts[:20])
    assert [r.output_tokens for r in run.results] == w.new_tokens[:20]         # request order kept
    with pytest.raises(ValueError, match="workload holds"):
        closed_loop(send, w, 2, 31, 1.0)


def test_closed_loop_stops_on_its_time_limit():
    w = make_workload(5000, 1000, 999, prompt_lens=(1, 2), new_tokens=(1, 2))
    t0 = time.perf_counter()
    run = closed_loop(FakeSend(0.02), w, concurrency=2, n_requests=5000, time_limit_s=0.2)
    assert run.stopped_by == "time" and 2 <= len(run.results) < 5000
    assert time.perf_counter() - t0 < 5                                          # stopped by itself


def test_open_loop_counts_and_time_limit():
    w = make_workload(200, 1000, 999, prompt_lens=(1, 2), new_tokens=(1, 2))
    a = poisson_arrivals(50.0, 200, seed=1)
    assert a[0] == 0 and np.all(np.diff(a) > 0) and np.array_equal(a, poisson_arrivals(50.0, 200, seed=1))
    assert np.mean(np.diff(a)) == pytest.approx(1 / 50, rel=0.3)
    run = open_loop(FakeSend(0.001), w, rate=1000.0, n_requests=10, time_limit_s=30)
    assert run.stopped_by == "count" and len(run.results) == 10
    run = open_loop(FakeSend(0.001), w, rate=20.0, n_requests=200, time_limit_s=0.3)
    assert run.stopped_by == "time" and 1 <= len(run.results) < 200


def test_static_batches_group_by_concurrency():
    w = make_workload(10, 1000, 999, prompt_lens=(1, 2), new_tokens=(1, 2))
    sizes = []

    class Fake:
        static = True

        def batch(self, prompts, ns):
            sizes.append(len(prompts))
            return [RequestResult(len(p), n, 0, 0.1, (0.1,), 0.2) for p, n in zip(prompts, ns)], [0.1] * 3
    run = static_batches(Fake(), w, concurrency=4, n_requests=10, time_limit_s=60)
    assert sizes == [4, 4, 2] and len(run.results) == 10
    assert len(run.decode_steps) == 6                                # full batches' steps only


# ---- the gate and the modes on a real (tiny) model -----------------------------------------------

TINY_NEW = (3, 6)


def test_modes_match_the_generator_alone_and_a_broken_mode_fails(tiny_gen):
    w = make_workload(8, tiny_gen.config.vocab_size, EOS, prompt_lens=(16, 300), new_tokens=TINY_NEW)
    cases = validation_cases(w, 3, 6)
    ref = serve_bench.reference_outputs(tiny_gen, cases)
    eos = tiny_gen.config.eos_token_id
    good = [serve_bench.InflightMode(tiny_gen), ThreadPerRequestMode(tiny_gen.backend, eos, tiny_gen.tokenizer),
            StaticMode(tiny_gen.backend, eos, tiny_gen.tokenizer)]
    for m in good:
        assert validate_mode(m, cases, ref) is None, m.name
    shifted = ShiftedBackend(tiny_gen.backend)
    for m in (ThreadPerRequestMode(shifted, eos, tiny_gen.tokenizer), StaticMode(shifted, eos, tiny_gen.tokenizer)):
        why = validate_mode(m, cases, ref)
        assert why is not None and "greedy token 0" in why and "request 0" in why, (m.name, why)


def test_a_mode_failing_validation_is_reported_not_timed(tiny_model, tiny_gen):
    from engine.generator import Generator
    broken = Generator(tiny_gen.artifact, ShiftedBackend(tiny_gen.backend), tiny_gen.tokenizer, max_batch=2)
    try:
        plan = ServePlan(concurrency=(1, 2), rates=(200.0,), requests=3, threads=1, max_batch=2,
                         prompt_lens=(16, 64), new_tokens=TINY_NEW, validate_requests=2, validate_new_tokens=4)
        eos = tiny_gen.config.eos_token_id
        modes = [serve_bench.InflightMode(broken), ThreadPerRequestMode(tiny_gen.backend, eos, tiny_gen.tokenizer),
                 StaticMode(tiny_gen.backend, eos, tiny_gen.tokenizer)]
        # The reference is the healthy Generator; the inflight mode runs the shifted one.
        said = []
        recs = serve_bench.measure_model("tiny", tiny_gen, modes, plan, log=said.append)
    finally:
        broken.close()                                          # its loop; ShiftedBackend.close is a no-op
    assert [(r.mode, r.point) for r in recs] == [
        ("inflight", "C=1"), ("thread-per-request", "C=1"), ("static", "C=1"),
        ("inflight", "C=2"), ("thread-per-request", "C=2"), ("static", "C=2"),
        ("inflight", "R=200/s"), ("thread-per-request", "R=200/s")]
    for r in recs:
        if r.mode == "inflight":
            assert r.status.startswith("failed validation: ") and r.ttft is None and r.output_throughput is None
        else:
            assert r.ok and r.requests == 3 and r.ttft["n"] == 3 and r.total_output_tokens >= 3 * TINY_NEW[0]
    assert recs[2].decode_step is not None                      # static times its batch steps
    assert any("inflight: FAILED validation" in s for s in said)


def test_rounds_alternate_the_modes_of_each_point(tiny_gen):
    plan = ServePlan(concurrency=(2,), requests=2, threads=1, prompt_lens=(16, 32), new_tokens=TINY_NEW,
                     validate_requests=1, validate_new_tokens=3, rounds=2)
    eos = tiny_gen.config.eos_token_id
    said = []
    recs = serve_bench.measure_model("tiny", tiny_gen, [serve_bench.InflightMode(tiny_gen),
                                                        StaticMode(tiny_gen.backend, eos, tiny_gen.tokenizer)],
                                     plan, log=said.append)
    assert [(r.mode, r.round) for r in recs] == [("inflight", 0), ("static", 0), ("inflight", 1), ("static", 1)]
    assert all(r.ok for r in recs) and any("round 2/2" in s for s in said)
    assert "rounds" in plan.settings() and "rounds" not in ServePlan().settings()


def test_inflight_records_count_forward_calls(tiny_gen):
    plan = ServePlan(concurrency=(2,), requests=4, threads=1, prompt_lens=(16, 32), new_tokens=TINY_NEW,
                     validate_requests=1, validate_new_tokens=3)
    (r,) = serve_bench.measure_model("tiny", tiny_gen, [serve_bench.InflightMode(tiny_gen)], plan)
    assert r.ok and 0 < r.extra["forward_calls"] <= r.total_output_tokens + r.requests
    assert 0 <= r.extra["prefix_cache_hits"] < r.total_prompt_tokens


# ---- records -> table ----------------------------------------------------------------------------

def test_records_round_trip_to_table_and_plots(tmp_path):
    recs = [_rec("inflight", 1, 40.0), _rec("thread-per-request", 1, 38.0), _rec("static", 1, 41.0, step=0.02),
            _rec("inflight", 8, 200.0), _rec("static", 8, 220.0, step=0.03),
            ServeRecord(model="m", mode="thread-per-request", load="closed", concurrency=8,
                        status="failed validation: greedy token 0 is 1 | 2"),
            ServeRecord(model="m", mode="inflight", load="open", rate=2.0, output_throughput=30.0,
                        itl=percentiles([0.01]), ttft=percentiles([0.1]))]
    res = write_outputs(recs, tmp_path, "HEADER LINE")
    back = read_jsonl(tmp_path / "results.jsonl")
    assert [b.to_json() for b in back] == [r.to_json() for r in recs]          # ratios included
    assert back[3].ratios["tokens_vs_static"] == pytest.approx(200 / 220)
    md = (tmp_path / "table.md").read_text()
    assert "HEADER LINE" in md and markdown_table(back) in md and res.table == markdown_table(back)
    assert "failed validation: greedy token 0 is 1 \\| 2" in md                 # a pipe cannot break the row
    row = next(line for line in md.splitlines() if "| thread-per-request | C=8 |" in line)
    assert row.count("| - ") == 8                                              # no numbers for a failed mode
    assert {p.name for p in res.plots} == {"serve_vs_concurrency.png", "serve_vs_rate.png"}
    assert all((tmp_path / p.name).stat().st_size > 0 for p in res.plots)
    line = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])
    line["new_field"] = 1
    (tmp_path / "more.jsonl").write_text(json.dumps(line) + "\n\n")
    assert read_jsonl(tmp_path / "more.jsonl")[0].extra["new_field"] == 1
    (tmp_path / "bad.jsonl").write_text('{"model": "m"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_jsonl(tmp_path / "bad.jsonl")


# ---- the HTTP mode -------------------------------------------------------------------------------

def _sse(*chunks):
    lines = [f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]
    return "".join(lines).encode()


def test_http_mode_parses_the_stream():
    httpx = pytest.importorskip("httpx")
    seen = {}

    def handler(request):
        seen["url"], seen["body"] = str(request.url), json.loads(request.content)
        if seen["body"]["max_tokens"] == 99:
            return httpx.Response(503, text="overloaded")
        return httpx.Response(200, content=_sse(
            {"choices": [{"index": 0, "text": "Hel"}]}, {"choices": [{"index": 0, "text": ""}]},
            {"choices": [{"index": 0, "text": "lo"}]}, {"choices": [{"index": 0, "text": "!"}]},
            {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}),
            headers={"content-type": "text/event-stream"})
    mode = serve_bench.HttpMode("http://x:8000/v1", model="gpt2", transport=httpx.MockTransport(handler))
    r = mode.request([1, 2, 3], 4)
    assert seen["url"] == "http://x:8000/v1/completions"
    assert seen["body"] == {"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0.0, "stream": True,
                            "stream_options": {"include_usage": True}, "model": "gpt2"}
    assert r.text == "Hello!" and r.output_tokens == 4 and r.prompt_tokens == 3
    assert len(r.itl_s) == 2 and r.ttft_s > 0 and r.total_s >= r.ttft_s + sum(r.itl_s)
    with pytest.raises(RuntimeError, match="HTTP 503: overloaded"):
        mode.request([1], 99)
    assert serve_bench.completions_url("http://h:1/") == "http://h:1/v1/completions"
    assert serve_bench.completions_url("http://h:1/v1/completions") == "http://h:1/v1/completions"


# ---- the CLI -------------------------------------------------------------------------------------

def _capture(monkeypatch):
    seen = {}

    def fake(specs, plan, out, *, work_root, log):
        seen.update(specs=specs, plan=plan, out=out)
        return serve_report.ServeResult([], out, "HEADER", "TABLE", None, None, [])
    monkeypatch.setattr(cli, "run_serve_bench", fake)
    return seen


def test_cli_quick_defaults_and_explicit_options(monkeypatch, tmp_path):
    seen = _capture(monkeypatch)
    res = CliRunner().invoke(cli.bench_serve, ["--quick", "--out", str(tmp_path), "--threads", "1"])
    assert "HEADER" in res.output and "TABLE" in res.output
    plan = seen["plan"]
    assert [s.name for s in seen["specs"]] == ["gpt2"] and seen["specs"][0].init == "random"
    assert plan.concurrency == (1, 8) and plan.quick and plan.time_limit_s == 60 and plan.modes == cli.SERVE_LOCAL_MODES
    assert plan.n_requests(1) == 8 and plan.n_requests(8) == 16
    CliRunner().invoke(cli.bench_serve, ["--quick", "--concurrency", "2", "--requests", "5", "--rate", "1.5",
                                         "--model", "gpt2-medium", "--out", str(tmp_path), "--mode", "static"])
    plan = seen["plan"]
    assert plan.concurrency == (2,) and plan.n_requests(2) == 5 and plan.rates == (1.5,) and plan.modes == ("static",)
    assert [s.name for s in seen["specs"]] == ["gpt2-medium"]
    CliRunner().invoke(cli.bench_serve, ["--out", str(tmp_path)])
    assert seen["plan"].concurrency == (1, 2, 4, 8, 16) and seen["plan"].n_requests(16) == 64
    assert seen["plan"].rounds == 1
    CliRunner().invoke(cli.bench_serve, ["--rounds", "3", "--out", str(tmp_path)])
    assert seen["plan"].rounds == 3


@pytest.mark.parametrize("args, code, message", [
    (["--model", "gpt3"], 1, "neither a checkpoint directory nor a model name"),
    (["--prompt-lens", "64", "16"], 2, "1 <= MIN <= MAX"),
    (["--prompt-lens", "900", "1000"], 1, "exceeds gpt2's context (1024 tokens)"),
    (["--concurrency", "0"], 2, "--concurrency"),
    (["--rate", "0"], 2, "--rate"),
    (["--rounds", "0"], 2, "--rounds"),
    (["--mode", "http"], 2, "--mode http needs --http URL"),
    (["--http", "http://127.0.0.1:9", "--mode", "inflight"], 2, "add --mode http"),
    (["--http", "http://127.0.0.1:9"], 1, "cannot reach http://127.0.0.1:9/v1/models"),
])
def test_cli_bad_arguments_are_one_line_errors(monkeypatch, tmp_path, args, code, message):
    seen = _capture(monkeypatch)
    res = CliRunner().invoke(cli.bench_serve, [*args, "--out", str(tmp_path)])
    assert res.exit_code == code, res.output
    assert message in res.output and "Traceback" not in res.output
    assert "plan" not in seen                                       # nothing ran


def test_cli_vocabulary_matches_serve_bench():
    assert cli.SERVE_MODES == serve_bench.MODES and cli.SERVE_LOCAL_MODES == serve_bench.LOCAL_MODES
    assert cli.SERVE_CONCURRENCY == serve_bench.DEFAULT_CONCURRENCY
    assert cli.SERVE_QUICK_CONCURRENCY == serve_bench.QUICK_CONCURRENCY


def test_the_gpt2_engine_group_has_bench_serve():
    from cli.main import main
    assert "bench-serve" in main.commands
