"""`bench --quick` as a reader meets it (issue 24, item 18): a runner whose timed runs disagree wildly, or
whose decode p50 is far from the same run's decode-vs-position measurement, is flagged in the table
(HF at 239 ms/token in the table beside 40-50 ms in the position plot, unflagged, was what one run
showed); a tokens-vs-batch plot of single points (one batch size) is not drawn. Synthetic records."""

from __future__ import annotations

from benchmarks import report
from benchmarks.records import BenchRecord
from benchmarks.stats import percentiles


def record(backend="hf", batch=1, decode_s=(0.045, 0.046, 0.047), ttft_s=(0.40, 0.41, 0.42), by_position=0.045):
    e2e = [t + 31 * d for t, d in zip(ttft_s, decode_s)]
    return BenchRecord(backend=backend, model="gpt2", precision="fp32", batch=batch, prompt_len=32, new_tokens=32,
                       threads=2, ttft=percentiles(ttft_s), decode_per_token=percentiles(decode_s), e2e=percentiles(e2e),
                       tokens_per_s=percentiles([batch * 32 / s for s in e2e]),
                       per_position=[[16, by_position], [256, by_position * 1.1], [900, by_position * 1.3]])


def status(r: BenchRecord) -> str:
    return report.markdown_table([r]).splitlines()[2].rsplit("|", 2)[1].strip()


def test_steady_runs_are_not_flagged():
    assert report.unsteady(record()) is None
    assert status(record()) == "ok"


def test_runs_that_disagree_are_flagged():
    r = record(decode_s=(0.041, 0.239, 0.240))          # two of three repeats on a busy machine
    assert "decode runs 41.0-240 ms (5.9x)" in report.unsteady(r)
    assert status(r).startswith("ok, UNSTEADY: decode runs 41.0-240 ms (5.9x)") and "--repeats" in status(r)
    assert "TTFT runs" in report.unsteady(record(ttft_s=(0.4, 0.41, 1.2)))


def test_a_p50_far_from_the_runs_own_position_measurement_is_flagged():
    r = record(decode_s=(0.238, 0.239, 0.240), by_position=0.045)   # every repeat slow, the position run not
    assert report.unsteady(r) == "decode p50 239 ms vs 45.0-58.5 ms by position"
    assert report.unsteady(record(decode_s=(0.050, 0.051, 0.052), by_position=0.045)) is None


def test_a_one_point_batch_plot_is_not_drawn(tmp_path):
    one = report.make_plots([record("engine-ort"), record("hf")], tmp_path / "one")
    assert "tokens_per_s_vs_batch.png" not in [p.name for p in one]
    assert "decode_vs_position.png" in [p.name for p in one]
    two = report.make_plots([record("engine-ort"), record("engine-ort", batch=8)], tmp_path / "two")
    assert "tokens_per_s_vs_batch.png" in [p.name for p in two]
