"""Records, JSONL, the markdown table and the plots, all from synthetic records (no model runs)."""

import json

import pytest

from benchmarks import conditions, records, report
from benchmarks.records import BenchRecord
from benchmarks.stats import percentiles


def _ok(backend, precision="fp32", batch=1, decode_s=(0.030, 0.031, 0.034), floor_s=0.025):
    ttft = [0.40, 0.41, 0.45]
    e2e = [t + 31 * d for t, d in zip(ttft, decode_s)]
    return BenchRecord(
        backend=backend, model="gpt2", precision=precision, batch=batch, prompt_len=128, new_tokens=32,
        threads=2, warmup=1, load_s=0.8,
        ttft=percentiles(ttft), decode_per_token=percentiles(decode_s), e2e=percentiles(e2e),
        tokens_per_s=percentiles([batch * 32 / s for s in e2e]),
        peak_rss_mb=812.0,
        per_position=[[128 + i, decode_s[0] + 1e-5 * i] for i in range(31)],
        floor={"bandwidth_GBps": 20.0, "gflops": 145.0, "decode_floor_s": floor_s, "prefill_floor_s": 0.2},
    )


def _records():
    return [
        _ok("engine-ort"),
        _ok("engine-ort", batch=4, decode_s=(0.040, 0.041, 0.045)),
        _ok("hf", decode_s=(0.055, 0.056, 0.060)),
        _ok("ct2", precision="int8", decode_s=(0.020, 0.021, 0.026), floor_s=0.0065),
        BenchRecord(backend="engine-trt", model="gpt2", precision="fp16", batch=1, prompt_len=128,
                    new_tokens=32, status="failed validation: greedy tokens differ from HF at step 3 | row 0"),
    ]


def test_markdown_table_rows_and_failed_backend():
    table = report.markdown_table(_records())
    lines = table.splitlines()
    assert len(lines) == 2 + 5
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == list(report.COLUMNS)
    ort = lines[2]
    assert "engine-ort" in ort and "31.0 / 33.4 / 33.9" in ort  # decode p50/p90/p99 in ms
    assert "1.24x" in ort  # 31 ms p50 over a 25 ms floor
    failed = lines[-1]
    assert "failed validation: greedy tokens differ" in failed
    assert "\\|" in failed  # a pipe in the message does not break the table
    # The failed row carries no timings: every timing column is the empty marker.
    cells = [c.strip() for c in failed.strip("|").replace("\\|", "/").split("|")]
    assert cells[6:11] == ["-"] * 5
    assert not any(ch.isdigit() for ch in "".join(cells[6:11]))


def test_failed_record_refuses_timings():
    with pytest.raises(ValueError, match="must carry no timings"):
        BenchRecord(backend="x", model="gpt2", precision="fp32", batch=1, prompt_len=1, new_tokens=1,
                    status="failed: boom", ttft=percentiles([1.0]))


def test_jsonl_round_trip(tmp_path):
    recs = _records()
    recs[0].conditions = {"cpu": "test cpu", "versions": {"numpy": "2"}}
    recs[0].ratios = {"x_floor": 1.2, "speedup_vs_hf": 1.87}
    path = records.write_jsonl(tmp_path / "out" / "results.jsonl", recs)
    lines = path.read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(line)["schema"] == records.SCHEMA_VERSION for line in lines)
    assert records.read_jsonl(path) == recs
    # Appending, and plain dicts as input (what a runner may build), both work.
    records.write_jsonl(path, [recs[1].to_dict()], append=True)
    assert records.read_jsonl(path)[-1] == recs[1]


def test_reader_keeps_unknown_fields_and_names_bad_lines(tmp_path):
    d = _records()[0].to_dict() | {"future_field": 7}
    r = BenchRecord.from_dict(d)
    assert r.extra["future_field"] == 7
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_records()[0].to_json() + "\n" + json.dumps({"backend": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        records.read_jsonl(bad)


def test_plots_are_png_files(tmp_path):
    paths = report.make_plots(_records(), tmp_path / "plots")
    assert [p.name for p in paths] == ["decode_vs_position.png", "tokens_per_s_vs_batch.png", "decode_vs_peers.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_plots_skip_what_has_no_data(tmp_path):
    failed_only = [_records()[-1]]
    assert report.make_plots(failed_only, tmp_path) == []


def test_conditions_never_fail_and_header_lists_them():
    c = conditions.collect_conditions()
    json.dumps(c)  # stored in records: must be JSON
    assert c["logical_cores"] >= 1 and c["ram_gb"] > 0
    assert c["versions"]["numpy"] is not None  # a core dependency
    header = conditions.format_header(c, {"model": "gpt2", "threads": 2})
    assert "cpu" in header and "numpy" in header
    assert header.splitlines()[-1].split() == ["threads", "2"]
