"""The bench runner: the validation gate (pure, and through the per-runner path), a tiny end-to-end
run that writes every output, and the CLI's option handling. No test asserts a timing value."""

from __future__ import annotations

import importlib.util
import json
import time

import numpy as np
import pytest
from click.testing import CliRunner

from benchmarks import gates, harness, models, peers, runners, tables
from benchmarks.gates import LOSSY_MIN_AGREEMENT, LOSSY_TIE_X_STD, validate_tokens
from benchmarks.harness import Plan, measure_runner
from benchmarks.memory import PeakRss
from benchmarks.models import ModelSpec, prepare_model
from benchmarks.records import Skipped, read_jsonl
from benchmarks.runners import EngineRunner, RunnerSpec
from engine.config import GPT2Config

TINY = GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=50257, n_positions=1024)
FLOOR = (10.0, 100.0)  # injected rates (GB/s, GFLOP/s): the floor's arithmetic without its 2 s measurement


# ---- the gate, pure ------------------------------------------------------------------------------

def test_gate_accepts_the_reference_exactly():
    assert validate_tokens([5, 6, 7], [5, 6, 7]) is None
    assert validate_tokens([5, 6, 7], np.array([5, 6, 7])) is None


def test_gate_refuses_a_wrong_token_and_says_where():
    why = validate_tokens([5, 6, 7, 8], [5, 6, 9, 8])
    assert why is not None and "token 2 is 9, reference 7" in why and "2/4" in why


def test_gate_refuses_wrong_lengths():
    assert "returned 2 tokens" in validate_tokens([5, 6, 7], [5, 6])
    assert "returned 4 tokens" in validate_tokens([5, 6, 7], [5, 6, 7, 8])
    assert validate_tokens([5, 6, 7], []) is not None


def test_exact_gate_needs_a_reference():
    with pytest.raises(ValueError):
        validate_tokens([], [1])


def test_cache_path_gaps_measure_each_token_below_its_own_best():
    prompt_len, V = 3, 5
    logits = np.zeros((prompt_len + 2, V))          # predicts tokens 0..2 from rows 2, 3, 4
    logits[2, 1] = 4.0                               # token 0: best is 1
    logits[3, 2], logits[3, 4] = 3.0, 2.9            # token 1: best 2, runner-up 4 (a near tie)
    logits[4, 0] = 1.0                               # token 2: best 0
    std = logits.std()
    gaps = gates.cache_path_gaps(prompt_len, [1, 4, 3], logits)
    assert np.allclose(gaps, [0.0, 0.1 / std, 1.0 / std])
    with pytest.raises(ValueError, match="rows"):
        gates.cache_path_gaps(prompt_len, [1, 4, 3, 2], logits)


def test_lossy_gate_takes_accuracy_and_the_cache_path_not_token_luck():
    ok = {"argmax_agreement": 0.52}
    assert gates.validate_lossy(ok, [7, 8], np.array([0.0, LOSSY_TIE_X_STD / 2])) is None   # a near tie
    why = gates.validate_lossy({"argmax_agreement": LOSSY_MIN_AGREEMENT / 2}, [7, 8], np.zeros(2))
    assert why is not None and "agreement with HF fp32" in why and "wrong weights" in why
    why = gates.validate_lossy(ok, [7, 8], np.array([0.0, 3.0]))
    assert why is not None and "greedy token 1 (8)" in why and "cache path" in why
    assert "could not be measured" in gates.validate_lossy({"error": "boom"}, [7], np.zeros(1))


# ---- the per-runner path -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model prepared as the harness prepares any model, its engine artifact and the reference."""
    work = tmp_path_factory.mktemp("bench-work")
    spec = ModelSpec("tiny", "random", TINY, seed=0, init_range=0.1)
    model = prepare_model(spec, work)
    model.artifact("fp32")
    prompt = models.shipped_tokenizer().encode(gates.VALIDATION_TEXT, add_special_tokens=False).ids
    reference = peers.hf_reference(model.checkpoint_dir, prompt, gates.VALIDATION_NEW_TOKENS, threads=1)
    return spec, model, work, prompt, reference


class ShiftedBackend:
    """A real backend whose logits are rolled by one along the vocabulary: every argmax is off by one."""

    name = "shifted"

    def __init__(self, inner):
        self.inner = inner
        self.max_prompt, self.fixed_capacity, self.max_batch = inner.max_prompt, inner.fixed_capacity, inner.max_batch

    def new_cache(self, batch, capacity, commit=False):
        return self.inner.new_cache(batch, capacity)

    def forward(self, cache, input_ids, cache_positions, logits_indices):
        return np.roll(self.inner.forward(cache, input_ids, cache_positions, logits_indices), 1, axis=-1)

    def close(self):
        self.inner.close()


def _engine_spec(model, backend_cls=None) -> RunnerSpec:
    def load():
        from engine.artifact import load_artifact
        from engine.backends.ort import OrtBackend
        art = load_artifact(model.artifact("fp32"))
        be = OrtBackend(art, threads=1)
        return EngineRunner(backend_cls(be) if backend_cls else be, art.config, models.shipped_tokenizer())
    return RunnerSpec("engine-fake", "fp32", "cpu", load, threads=1)


PLAN = Plan(batches=(1, 2), prompt_lens=(8,), new_tokens=(4,), backends=("ort",), peers=(), threads=1,
            repeats=2, warmup=1, positions=(16, 64), position_steps=2)


def test_backend_returning_wrong_tokens_is_refused_and_not_timed(tiny):
    _, model, _, prompt, reference = tiny
    notes = []
    recs = measure_runner(_engine_spec(model, ShiftedBackend), model, PLAN, reference, prompt, log=notes.append)
    assert len(recs) == len(PLAN.configs)
    for r in recs:
        assert r.status.startswith("failed validation: "), r.status
        assert r.ttft is None and r.decode_per_token is None and r.e2e is None and r.per_position is None
    assert any("FAILED validation" in n for n in notes)


def test_the_same_backend_unshifted_passes_and_is_timed(tiny):
    _, model, _, prompt, reference = tiny
    recs = measure_runner(_engine_spec(model), model, PLAN, reference, prompt)
    assert [r.status for r in recs] == ["ok"] * len(PLAN.configs)
    r = recs[0]
    assert r.ttft["n"] == PLAN.repeats and r.decode_per_token["n"] == PLAN.repeats
    assert r.extra["decode_step_all"]["n"] == PLAN.repeats * 3  # 4 new tokens = 3 decode steps per run
    assert r.extra["validation"] == {"matched_prefix": 16, "of": 16, "gate": "exact"}
    assert [p for p, _ in r.per_position] == [16, 64] and recs[1].per_position is None
    assert r.peak_rss_mb > 0 and r.load_s > 0


def test_unloadable_runners_are_recorded_not_raised(tiny):
    _, model, _, prompt, reference = tiny

    def skip():
        raise Skipped("no GPU here")

    def boom():
        raise RuntimeError("engine file is corrupt")
    for load, prefix in ((skip, "skipped: no GPU here"), (boom, "failed: load: RuntimeError")):
        recs = measure_runner(RunnerSpec("engine-x", "fp32", "cpu", load), model, PLAN, reference, prompt)
        assert all(r.status.startswith(prefix) for r in recs), [r.status for r in recs]
    recs = measure_runner(_engine_spec(model), model, PLAN, None, prompt)
    assert all(r.status.startswith("skipped: no reference") for r in recs)


# ---- end to end ---------------------------------------------------------------------------------

def test_tiny_end_to_end_writes_records_table_and_plots(tiny, tmp_path):
    spec, _, work, _, _ = tiny
    plan = Plan(batches=(1, 2), prompt_lens=(8,), new_tokens=(4,), backends=("ort", "trt"), peers=("hf",),
                threads=1, repeats=2, warmup=1, positions=(16, 64), position_steps=2, peer_max_batch=1)
    out = tmp_path / "out"
    result = harness.run_bench([spec], plan, out, work_root=work, floor_rates=FLOOR, show_progress=False,
                               log=lambda s: None)

    recs = read_jsonl(out / "results.jsonl")
    assert len(recs) == 3 * len(plan.configs)  # engine-ort, engine-trt, hf per configuration
    by = {(r.backend, r.batch): r for r in recs}
    assert by[("hf", 2)].status == "skipped: peers run up to batch 1 (--peer-max-batch)"
    for backend, b in (("engine-ort", 1), ("engine-ort", 2), ("hf", 1)):
        r = by[(backend, b)]
        assert r.ok, r.status
        assert r.model == "tiny" and r.weights == "random" and r.threads == 1 and r.conditions
        assert r.floor["bandwidth_GBps"] == FLOOR[0] and r.ratios["x_floor"] > 0
    assert by[("engine-ort", 1)].per_position and by[("hf", 1)].per_position
    assert set(by[("engine-ort", 1)].ratios) >= {"decode_vs_hf", "ttft_vs_hf", "x_floor"}
    # batch 2 vs 1: the engine's own tokens/s scaling, beside ORT's kernels timed alone (kernel_scaling)
    b2 = by[("engine-ort", 2)]
    ceiling = b2.extra["kernel_ceiling"]
    assert ceiling["position"] == 8 + 4 // 2 and set(ceiling["linear_ms"]) == {"1", "2"}
    assert b2.ratios["tokens_scaling"] == pytest.approx(
        b2.tokens_per_s["p50"] / by[("engine-ort", 1)].tokens_per_s["p50"], rel=1e-3)
    assert b2.ratios["of_kernel_ceiling"] == pytest.approx(b2.ratios["tokens_scaling"] / ceiling["tokens_scaling"],
                                                           rel=1e-2)
    assert "kernel_ceiling" not in by[("engine-ort", 1)].extra and "kernel_ceiling" not in by[("hf", 1)].extra
    if runners.trt_unavailable() is not None:  # the usual case: no GPU / TensorRT on the test machine
        assert by[("engine-trt", 1)].status.startswith("skipped: no GPU/TensorRT") or \
            by[("engine-trt", 1)].status.startswith("skipped: no TensorRT")

    table = (out / "table.md").read_text()
    assert "| engine-ort | tiny | fp32 | 1 | 8 | 4 |" in table and "| hf | tiny |" in table
    assert "load avg 1m" in table and "decode / hf" in table
    assert "## Batch scaling" in table and f"| engine-ort | tiny | 2 | 8 | 4 | {b2.ratios['tokens_scaling']:.2f}x |" in table
    assert result.scaling and "kernel ceiling" in result.scaling
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == {"decode_vs_position.png", "tokens_per_s_vs_batch.png", "decode_vs_peers.png"}
    assert {p.name for p in result.plots} == pngs
    assert result.header in table


# ---- the CLI -------------------------------------------------------------------------------------

def _capture(monkeypatch):
    from cli import bench as cli
    seen = {}

    def fake_run_bench(specs, plan, out, *, work_root, **kw):
        seen.update(specs=specs, plan=plan, out=out, work_root=work_root)
        return tables.BenchResult([], out, "HEADER", "TABLE", "RATIOS", [])
    monkeypatch.setattr(cli, "run_bench", fake_run_bench)
    return cli, seen


def test_quick_sets_its_defaults_and_explicit_options_win(monkeypatch, tmp_path):
    cli, seen = _capture(monkeypatch)
    res = CliRunner().invoke(cli.bench, ["--quick", "--repeats", "4", "--out", str(tmp_path / "o"),
                                         "--work-dir", str(tmp_path / "w"), "--threads", "1"])
    assert "HEADER" in res.output and "TABLE" in res.output
    plan = seen["plan"]
    assert (plan.batches, plan.prompt_lens, plan.new_tokens) == ((1,), (32,), (32,))
    assert plan.repeats == 4 and plan.positions == harness.QUICK_POSITIONS and plan.peers == ("hf", "ct2")
    assert [s.name for s in seen["specs"]] == ["gpt2"] and seen["specs"][0].init == "random"


def test_peer_selection_and_checkpoint_dirs(monkeypatch, tmp_path, tiny):
    cli, seen = _capture(monkeypatch)
    _, model, _, _, _ = tiny
    CliRunner().invoke(cli.bench, ["--model", str(model.checkpoint_dir), "--peer", "ct2-int8", "--peer", "hf",
                                   "--no-positions", "--batch", "1", "--batch", "4", "--out", str(tmp_path)])
    assert seen["plan"].peers == ("ct2-int8", "hf") and seen["plan"].positions == ()
    assert seen["plan"].batches == (1, 4)
    assert seen["specs"][0].init == "checkpoint" and seen["specs"][0].source == str(model.checkpoint_dir)
    CliRunner().invoke(cli.bench, ["--no-peers", "--out", str(tmp_path)])
    assert seen["plan"].peers == ()
    res = CliRunner().invoke(cli.bench, ["--model", "gpt3", "--out", str(tmp_path)])
    assert res.exit_code == 1 and "neither a checkpoint directory nor a model name" in res.output


def test_lossy_runners_accuracy_is_stated_beside_their_timings(tiny, tmp_path):
    """ort-int8 and ct2-int8 on tiny: teacher-forced figures against HF fp32 logits land in every record
    and in table.md; they equal the figures computed here from the int8 graph directly, and a runner
    with wrong logits (every argmax off by one) shows it."""
    from benchmarks.gates import accuracy_figures, accuracy_ids
    from benchmarks.runners import engine_spec, peer_spec
    from benchmarks.tables import accuracy_table
    from engine.artifact import load_artifact
    from engine.backends.ort import OrtBackend
    _, model, _, prompt, reference = tiny
    ids = accuracy_ids(model.config)
    ref = peers.hf_logits(model.checkpoint_dir, ids, threads=1)                   # (128, V)
    plan = Plan(batches=(1,), prompt_lens=(8,), new_tokens=(3,), threads=1, repeats=1, warmup=0, positions=())
    specs = [engine_spec("ort-int8", model, 1)]
    if importlib.util.find_spec("ctranslate2"):
        specs.append(peer_spec("ct2-int8", model, 1))
    records = []
    for spec in specs:
        recs = measure_runner(spec, model, plan, reference, prompt, accuracy_ref=ref)
        acc = recs[0].extra["accuracy"]
        assert acc["positions"] == len(ids) == gates.ACCURACY_TOKENS and 0.5 < acc["argmax_agreement"] <= 1
        assert 0 < acc["mean_abs_err_x_std"] < 0.5 and acc["max_abs_err_x_std"] > 0, acc
        assert [r.status for r in recs] == ["ok"], recs[0].status    # and the lossy gate let it through
        records += recs
    be = OrtBackend(load_artifact(model.artifact("int8")), threads=1)
    direct = be.forward(be.new_cache(1, len(ids)), ids[None], np.zeros(1, np.int64), np.arange(len(ids))[None])[0]
    assert records[0].extra["accuracy"] == accuracy_figures(direct, ref)
    assert accuracy_figures(np.roll(direct, 1, axis=-1), ref)["argmax_agreement"] < 0.05
    table = accuracy_table(records)
    assert "| engine-ort-int8 | tiny | int8 |" in table
    tables.write_outputs(records, tmp_path, "H")
    assert "Lossy runners' accuracy" in (tmp_path / "table.md").read_text()


class CacheAmnesiaBackend(ShiftedBackend):
    """A real backend that wipes the KV cache before every decode step: its prompt path is right, its
    cache path is not (what a misplaced or unbound cache looks like)."""

    def forward(self, cache, input_ids, cache_positions, logits_indices):
        if input_ids.shape[1] == 1:
            for arr in cache.arrays:
                arr[...] = 0
        return self.inner.forward(cache, input_ids, cache_positions, logits_indices)


def _lossy_spec(model, backend_cls=None) -> RunnerSpec:
    spec = _engine_spec(model, backend_cls)
    return RunnerSpec("engine-lossy", "int8", "cpu", spec.load, lossy=True, threads=1)


def test_lossy_gate_refuses_a_broken_cache_and_times_an_honest_runner(tiny):
    """Through measure_runner: the same weights pass the lossy gate (timed, the gate's figures
    recorded) and, with the cache wiped before each decode step, fail it on the cache path."""
    _, model, _, prompt, reference = tiny
    ref = peers.hf_logits(model.checkpoint_dir, gates.accuracy_ids(model.config), threads=1)
    plan = Plan(batches=(1,), prompt_lens=(8,), new_tokens=(3,), threads=1, repeats=1, warmup=0, positions=())
    good = measure_runner(_lossy_spec(model), model, plan, reference, prompt, accuracy_ref=ref)
    assert [r.status for r in good] == ["ok"]
    v = good[0].extra["validation"]
    assert v["gate"].startswith("lossy") and v["max_gap_x_std"] < 1e-3 and v["matched_prefix"] == 16
    assert good[0].extra["accuracy"]["argmax_agreement"] == 1.0
    bad = measure_runner(_lossy_spec(model, CacheAmnesiaBackend), model, plan, reference, prompt, accuracy_ref=ref)
    assert bad[0].status.startswith("failed validation: ") and "cache path" in bad[0].status, bad[0].status
    assert bad[0].extra["validation"]["max_gap_x_std"] > LOSSY_TIE_X_STD
    assert bad[0].extra["accuracy"]["argmax_agreement"] == 1.0   # the prompt path alone cannot tell
    none = measure_runner(_lossy_spec(model), model, plan, reference, prompt, accuracy_ref=None)
    assert none[0].status.startswith("failed validation: ") and "HF fp32 logits" in none[0].status


def test_position_sweep_runs_up_then_down_and_takes_the_median_of_both_passes():
    """Drift control: positions are timed ascending, then descending; each median uses both passes."""
    calls = []

    class Drifting:  # gets 1 ms slower per call, whatever the position
        def step_times_at(self, prompts, steps):
            calls.append(prompts.shape[1])
            return [len(calls) * 1e-3] * steps

    plan = Plan(positions=(16, 256, 1000), position_steps=2)
    per_pos, _ = harness._position_sweep(Drifting(), TINY, 1, plan, PeakRss())
    assert calls == [16, 256, 1000, 1000, 256, 16]
    assert per_pos == [[16, 3.5e-3], [256, 3.5e-3], [1000, 3.5e-3]]  # drift cancels: flat, as it should be


def test_position_sweep_interleaves_runners_that_can_hold_several_caches():
    """Runners with a decode_stepper: each position prefilled once, then one step per position per
    round, alternating direction; a burst of load lands on every position alike."""
    calls, opened = [], []

    class Stepping:
        def decode_stepper(self, prompts, steps):
            p = prompts.shape[1]
            opened.append((p, steps))

            def step():
                calls.append(p)
                return 1.0 if len(calls) in (4, 5, 6) else 1e-3   # one burst: the 2nd round
            return step

    plan = Plan(positions=(16, 256, 1000), position_steps=2)
    per_pos, _ = harness._position_sweep(Stepping(), TINY, 1, plan, PeakRss())
    assert opened == [(16, 4), (256, 4), (1000, 4)]
    assert calls == [16, 256, 1000, 1000, 256, 16, 16, 256, 1000, 1000, 256, 16]
    assert per_pos == [[16, 1e-3], [256, 1e-3], [1000, 1e-3]]


def test_engine_decode_stepper_continues_the_greedy_sequence(tiny):
    """The stepper the sweep times decodes what generation decodes: its steps follow greedy tokens."""
    _, model, _, prompt, reference = tiny
    runner = _engine_spec(model).load()
    seen = []
    forward = runner.backend.forward
    runner.backend.forward = lambda cache, x, pos, idx: seen.append((int(x[0, -1]), int(pos[0]))) or forward(cache, x, pos, idx)
    step = runner.decode_stepper(np.asarray([prompt]), 3)
    assert all(step() > 0 for _ in range(3))
    assert [t for t, _ in seen[1:]] == reference[:3] and [p for _, p in seen[1:]] == [len(prompt) + i for i in range(3)]


def test_records_round_trip_as_json(tiny, tmp_path):
    _, model, _, prompt, reference = tiny
    recs = measure_runner(_engine_spec(model, ShiftedBackend), model, PLAN, reference, prompt)
    tables.write_outputs(recs, tmp_path, "H")
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(PLAN.configs) and all(json.loads(x)["status"].startswith("failed validation") for x in lines)


def test_ttft_spans_the_cache_allocation_for_the_engine_and_hf(tiny):
    """TTFT (benchmarks/records.py) starts at the call: a cache allocation made slow by 0.2 s lands in
    it, not before it (a lower bound forced by the test, not a measured timing)."""
    _, model, _, _, _ = tiny
    engine = _engine_spec(model).load()
    hf = peers.HFRunner(model.checkpoint_dir, threads=1)
    new_cache, new_hf_cache = engine.backend.new_cache, hf._new_cache
    engine.backend.new_cache = lambda b, c, commit=False: time.sleep(0.2) or new_cache(b, c, commit)
    hf._new_cache = lambda: time.sleep(0.2) or new_hf_cache()
    prompts = models.prompt_ids(2, 8, TINY.vocab_size, TINY.eos_token_id)
    for runner in (engine, hf):
        t = runner.run(prompts, 3)
        assert t.ttft_s >= 0.2 and len(t.step_s) == 2 and t.e2e_s >= t.ttft_s + sum(t.step_s)
        runner.close()


def test_ct2_stream_hands_over_every_row_of_a_step_before_the_next_step(tiny):
    """CT2Runner takes a step (step 0: the TTFT) as done when its last row arrives: right because the
    stream is step-major."""
    pytest.importorskip("ctranslate2")
    _, model, _, _, _ = tiny
    runner = peers.CT2Runner(model.ct2_dir(None), 1, "float32")
    prompts = models.prompt_ids(3, 8, TINY.vocab_size, TINY.eos_token_id)
    assert [(r.step, r.batch_id) for r in runner._stream(prompts, 4)] == [(s, b) for s in range(4) for b in range(3)]
    runner.close()


def test_ct2_peer_on_a_bare_checkpoint_dir(tiny, tmp_path):
    """A user's checkpoint without tokenizer files: CTranslate2's converter still gets a vocabulary
    (from links in the work dir; the user's directory is left untouched), and its greedy tokens pass."""
    pytest.importorskip("ctranslate2")
    from benchmarks.runners import peer_spec
    from export.checkpoint import random_weights, save_checkpoint
    _, _, _, prompt, reference = tiny
    bare = save_checkpoint(tmp_path / "bare", TINY, random_weights(TINY, 0, 0.1))
    model = prepare_model(ModelSpec("bare", "checkpoint", source=str(bare)), tmp_path / "work")
    assert model.weights == "real" and model.config == TINY
    plan = Plan(batches=(2,), prompt_lens=(8,), new_tokens=(3,), peers=("ct2",), threads=1, repeats=1, warmup=0,
                positions=(16,), position_steps=2)
    recs = measure_runner(peer_spec("ct2", model, 1), model, plan, reference, prompt)
    assert [r.status for r in recs] == ["ok"], recs[0].status
    assert recs[0].per_position and sorted(p.name for p in bare.iterdir()) == ["config.json", "model.safetensors"]


def test_cli_vocabulary_matches_the_harness():
    from cli import bench as cli
    for name in ("ENGINE_BACKENDS", "PEERS", "DEFAULT_PEERS", "DEFAULT_POSITIONS", "QUICK_POSITIONS"):
        assert getattr(cli, name) == getattr(harness, name), name


def test_a_failing_kernel_ceiling_probe_is_reported_not_raised(monkeypatch):
    from benchmarks import kernel_scaling

    def boom(*args, **kwargs):
        raise MemoryError("no room for the weights")
    monkeypatch.setattr(kernel_scaling, "measure", boom)
    said = []
    plan = Plan(batches=(1, 8), prompt_lens=(512, 32), new_tokens=(128,), peers=())
    assert harness.kernel_ceilings(GPT2Config(), plan, said.append) == {}
    assert said == ["kernel ceiling not measured for prompt 32 + 128 new tokens: MemoryError: no room for the weights"]
