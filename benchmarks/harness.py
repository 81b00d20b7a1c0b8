"""The `gpt2-engine bench` run: the engine, its peers and the physical floor, measured in one run.
(~470 lines, one job: the order of a bench run, read top to bottom: measure_runner's phases and run_bench's
steps; every piece it calls lives in gates, memory, models, runners and tables.)

For every model the run prepares one set of weights (benchmarks/models.py), computes the reference
once (HF `generate`, greedy), then for each runner (engine backend or peer, benchmarks/runners.py),
in phases:

  load        artifact / checkpoint on disk -> ready to generate (timed: load_s), beside its yardsticks:
              the runner's weight files' bytes and the time to read them from the page cache (read
              just before the load, which so also reads a warm cache), and the RSS the load and the
              validation run added (memory.py; the ratios RSS / weight bytes and load / read are
              tables.add_ratios')
  validate    the gates of benchmarks/gates.py; a runner that fails is recorded as "failed
              validation: ..." and never timed (parity before speed: docs/ARCHITECTURE.md, "Conventions")
  per config  (batch, prompt length, new tokens): `warmup` untimed runs, then `repeats` timed runs,
              each split into TTFT (defined in benchmarks/records.py), per-step decode times and
              end-to-end
  positions   decode latency vs context length: prefill p tokens, time a few single steps (median)

and finally places the floor (benchmarks/floor.py: measured bandwidth and GFLOP/s with the same thread
count) beside every CPU record, and hands the records to benchmarks/tables.py for the ratios,
results.jsonl, table.md and the plots -- tables and plots come from the records only.

This module is the orchestration only: the Plan, one runner's path through the phases
(measure_runner) and the whole run (run_bench).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks import conditions as cond
from benchmarks import floor as fl
from benchmarks import gates
from benchmarks.memory import (
    PeakRss,
    derived_files,
    gpu_memory_mb,
    page_cache_read_s,
    read_files,
    release_memory,
    weight_bytes,
    weight_files,
)
from benchmarks.models import ModelSpec, PreparedModel, prepare_model, prompt_ids, shipped_tokenizer
from benchmarks.peers import Runner, RunTiming, hf_logits, hf_reference
from benchmarks.records import BenchRecord, Skipped, short_error
from benchmarks.runners import (
    DEFAULT_PEERS,
    DRAFT_PRECISION,
    ENGINE_BACKENDS,
    ENGINE_PRECISION,
    PEERS,
    RunnerSpec,
    engine_spec,
    peer_spec,
)
from benchmarks.stats import percentiles, rates
from benchmarks.tables import BenchResult, add_ratios, write_outputs
from engine.backends.ort import PREPACKED_DIR
from engine.config import GPT2Config
from engine.errors import InputError, install_hint

DEFAULT_POSITIONS = (16, 128, 256, 512, 900, 1000)
QUICK_POSITIONS = (16, 256, 900)
POSITION_STEPS = 5             # decode steps timed per position; the median is recorded

BYTES_PER_PARAM = {"fp32": 4, "fp16": 2, "int8": 1}
# CTranslate2 int8 quantizes weights only: the KV cache stays float32.
KV_BYTES = {"fp32": 4, "fp16": 2, "int8": 4}
KERNEL_CEILING_REPEATS = 10  # interleaved rounds; ~10 s for gpt2, ~30 s for gpt2-medium at prompt 32


@dataclass(frozen=True)
class Plan:
    """What one run measures, for every model: the configurations (batch x prompt x new tokens), the
    runners, the repeats and the position sweep."""

    batches: tuple[int, ...] = (1,)
    prompt_lens: tuple[int, ...] = (32,)
    new_tokens: tuple[int, ...] = (128,)
    backends: tuple[str, ...] = ("ort",)
    peers: tuple[str, ...] = DEFAULT_PEERS
    threads: int | None = None
    repeats: int = 5
    warmup: int = 1
    positions: tuple[int, ...] = DEFAULT_POSITIONS   # () = no position sweep
    position_steps: int = POSITION_STEPS
    peer_max_batch: int | None = None   # peers skip larger batches (they take minutes there); None = all
    kernel_ceiling: bool = True         # batch > 1 with backend "ort": also time ORT's kernels alone (kernel_scaling)

    def __post_init__(self):
        for name in ("batches", "prompt_lens", "new_tokens"):
            v = getattr(self, name)
            if not v or min(v) < 1:
                raise InputError(f"{name} must be one or more integers >= 1, got {v}")
        if self.repeats < 1:
            raise InputError(f"repeats must be >= 1, got {self.repeats}")
        if self.warmup < 0:
            raise InputError(f"warmup must be >= 0, got {self.warmup}")
        bad = [b for b in self.backends if b not in ENGINE_BACKENDS] + [p for p in self.peers if p not in PEERS]
        if bad:
            raise InputError(f"unknown backend/peer {bad[0]!r}: backends are {', '.join(ENGINE_BACKENDS)}, "
                             f"peers {', '.join(PEERS)}")
        if self.positions and min(self.positions) < 1:
            raise InputError(f"positions must be >= 1, got {self.positions}")
        if self.peer_max_batch is not None and self.peer_max_batch < 1:
            raise InputError(f"peer_max_batch must be >= 1, got {self.peer_max_batch}")

    @property
    def configs(self) -> list[tuple[int, int, int]]:
        return [(b, p, n) for b in self.batches for p in self.prompt_lens for n in self.new_tokens]


def measure_runner(spec: RunnerSpec, model: PreparedModel, plan: Plan, reference: list[int] | None,
                   validation_prompt: Sequence[int], *, conditions: dict | None = None,
                   log: Callable[[str], None] = lambda s: None, progress: Callable[[str], None] = lambda s: None,
                   accuracy_ref: np.ndarray | None = None) -> list[BenchRecord]:
    """Load, validate, time every configuration of ``plan`` and the position sweep for one runner.

    Always returns one record per configuration: timed ("ok"), or with the status that says why not
    ("skipped: ...", "failed: ...", "failed validation: ..."). ``progress`` is called once per
    configuration (whatever its fate), ``log`` with human-readable notes. For a lossy runner,
    ``accuracy_ref`` (HF fp32 logits over ``gates.accuracy_ids``) adds its accuracy figures to every record.
    """
    cfg = model.config
    base = dict(backend=spec.backend, model=model.name, precision=spec.precision, weights=model.weights,
                threads=spec.threads, device=spec.device, conditions=conditions)
    common_extra = {"setup_s": dict(model.setup_s)}
    if model.weights == "random":
        common_extra.update(seed=model.spec.seed, init_range=model.spec.init_range)

    def untimed(status: str, extra: dict | None = None) -> list[BenchRecord]:
        out = []
        for b, p, n in plan.configs:
            out.append(BenchRecord(batch=b, prompt_len=p, new_tokens=n, status=status,
                                   extra={**common_extra, **(extra or {})}, **base))
            progress(f"{model.name} {spec.backend} {spec.precision}")
        return out

    if reference is None:
        return untimed("skipped: no reference to validate against (HF transformers + torch are needed: "
                       f"{install_hint('bench')})")

    rss = PeakRss()
    phase = "prepare"
    try:
        if spec.prepare is not None:
            spec.prepare()                   # untimed: availability, export, conversion
        weights = _weight_yardsticks(spec, model)  # untimed; also leaves the files in the page cache
        phase = "load"
        release_memory()
        baseline = rss.rss_mb()
        rss.reset()
        t0 = time.perf_counter()
        runner = spec.load()
    except Skipped as e:
        log(f"{spec.backend} {spec.precision}: skipped: {e}")
        return untimed(f"skipped: {e}")
    except Exception as e:  # noqa: BLE001 -- a runner that cannot load is a result, not a crash
        log(f"{spec.backend} {spec.precision}: failed to {phase}: {short_error(e)}")
        return untimed(f"failed: {phase}: {short_error(e)}")
    load_s = time.perf_counter() - t0
    load_peak = rss.peak_mb()
    loaded = getattr(getattr(runner, "backend", None), "model_file", None)
    if loaded is not None:  # the engine on ORT: model.onnx, or the pre-packed model saved with the export
        loaded = Path(loaded)
        common_extra["loaded_model_file"] = f"{loaded.parent.name}/{loaded.name}" if loaded.parent.name == PREPACKED_DIR \
            else loaded.name
    common_extra.update(rss_baseline_mb=round(baseline, 1), load_peak_rss_mb=round(load_peak, 1), **weights)
    common_extra["setup_s"] = dict(model.setup_s)  # the export / conversion prepare may have added
    try:
        # --- validate: parity before speed ----------------------------------------------------
        try:
            got = runner.greedy(validation_prompt, len(reference))
        except Exception as e:  # noqa: BLE001
            log(f"{spec.backend} {spec.precision}: failed during validation: {short_error(e)}")
            return untimed(f"failed: validation run: {short_error(e)}", {"load_s": load_s})
        # What the loaded runner holds once it has generated: weights, kernels' packed copies, arena.
        common_extra["rss_after_load_mb"] = round(rss.rss_mb(), 1)
        agree = gates.matched_prefix(reference, got)
        if spec.lossy:
            reason, verdict, acc = gates.validate_lossy_runner(runner, cfg, validation_prompt, got, accuracy_ref)
            if acc is not None:
                common_extra["accuracy"] = acc
            if acc and "error" not in acc:
                log(f"{spec.backend} {spec.precision}: accuracy vs HF fp32 over {acc['positions']} teacher-forced "
                    f"positions: argmax agreement {acc['argmax_agreement']:.1%}, max |logit error| "
                    f"{acc['max_abs_err_x_std']:.3f} x logit std")
        else:
            reason, verdict = gates.validate_tokens(reference, got), {"gate": "exact"}
        common_extra["validation"] = {"matched_prefix": agree, "of": len(reference), **verdict}
        if reason is not None:
            log(f"{spec.backend} {spec.precision}: FAILED validation, not timed: {reason}")
            return untimed(f"{gates.STATUS_FAILED_VALIDATION}: {reason}")
        log(f"{spec.backend} {spec.precision}: {agree}/{len(reference)} greedy tokens match the reference"
            + ("" if not spec.lossy else f" (lossy gate: teacher-forced agreement and cache path, max gap "
               f"{verdict['max_gap_x_std']:.3f} x std)")
            + f"; loaded in {load_s:.2f} s")

        # --- configurations ---------------------------------------------------------------------
        records: list[BenchRecord] = []
        for b, p, n in plan.configs:
            rec = BenchRecord(batch=b, prompt_len=p, new_tokens=n, warmup=plan.warmup, **base,
                              extra=dict(common_extra))
            if p + n > cfg.n_positions:
                rec.status = f"skipped: prompt {p} + new tokens {n} > context {cfg.n_positions}"
            elif spec.peer and plan.peer_max_batch is not None and b > plan.peer_max_batch:
                rec.status = f"skipped: peers run up to batch {plan.peer_max_batch} (--peer-max-batch)"
            else:
                prompts = prompt_ids(b, p, cfg.vocab_size, cfg.eos_token_id)
                try:
                    _time_config(rec, runner, prompts, n, plan, rss)
                except Exception as e:  # noqa: BLE001 -- one failing configuration does not end the run
                    log(f"{spec.backend} b{b} p{p} n{n}: failed: {short_error(e)}")
                    log(traceback.format_exc(limit=3))
                    rec = BenchRecord(batch=b, prompt_len=p, new_tokens=n, **base, extra=dict(common_extra),
                                      status=f"failed: {short_error(e)}")
            if rec.ok:
                rec.load_s = load_s  # one load serves every configuration of this runner
            records.append(rec)
            progress(f"{model.name} {spec.backend} {spec.precision} b{b} p{p} n{n}")

        # --- decode latency vs context position -----------------------------------------------
        ok = [r for r in records if r.ok]
        if plan.positions and ok:
            b = min(r.batch for r in ok)
            try:
                per_pos, peak = _position_sweep(runner, cfg, b, plan, rss)
            except Exception as e:  # noqa: BLE001
                log(f"{spec.backend}: position sweep failed: {short_error(e)}")
            else:
                # Attached once (to the first record of the smallest batch) so each runner draws one line.
                first = next(r for r in ok if r.batch == b)
                first.per_position = per_pos
                first.extra.update(per_position_batch=b, per_position_steps=plan.position_steps,
                                   per_position_peak_rss_mb=round(peak, 1))
        return records
    finally:
        runner.close()
        del runner
        release_memory()


def _weight_dirs(spec: RunnerSpec, model: PreparedModel) -> list:
    """The directories whose weight files ``spec``'s runner loads (after its prepare)."""
    if spec.peer is None:
        backend = spec.backend.removeprefix("engine-")
        dirs = [model.artifact(ENGINE_PRECISION.get(backend, spec.precision))]
        if backend in DRAFT_PRECISION:
            dirs.append(model.artifact(DRAFT_PRECISION[backend]))
        return dirs
    if spec.peer == "hf":
        return [model.checkpoint_dir]
    return [model.ct2_dir("int8" if spec.peer == "ct2-int8" else None)]


def _weight_yardsticks(spec: RunnerSpec, model: PreparedModel) -> dict:
    """weight_bytes (the runner's weight files) and weight_read_s (reading them from the page cache,
    memory.page_cache_read_s); {} when they cannot be found (a figure, never a reason to fail). What
    the load may read instead (ONNX Runtime's pre-packed model) is read once too, untimed: every load
    here is from the page cache."""
    try:
        dirs = _weight_dirs(spec, model)
        files = [f for d in dirs for f in weight_files(d)]
        if not files:
            return {}
        out = {"weight_bytes": weight_bytes(files), "weight_read_s": round(page_cache_read_s(files), 4)}
        read_files([f for d in dirs for f in derived_files(d)])
        return out
    except Exception:  # noqa: BLE001
        return {}


def _time_config(rec: BenchRecord, runner: Runner, prompts: np.ndarray, n: int, plan: Plan, rss: PeakRss) -> None:
    """Warm up, then time ``plan.repeats`` runs into ``rec`` (percentiles over the runs)."""
    b = prompts.shape[0]
    rss.reset()
    for _ in range(plan.warmup):
        runner.run(prompts, n)
    runs: list[RunTiming] = []
    for _ in range(plan.repeats):
        runs.append(runner.run(prompts, n))
        rss.sample()
    rec.ttft = percentiles(r.ttft_s for r in runs)
    if n > 1:
        bad = [len(r.step_s) for r in runs if len(r.step_s) != n - 1]
        if bad:
            raise RuntimeError(f"a run made {bad[0] + 1} tokens, expected {n}")
        rec.decode_per_token = percentiles(float(np.mean(r.step_s)) for r in runs)
        # Per-run means hide a slow step; the pooled steps show the per-token tail.
        rec.extra["decode_step_all"] = percentiles(s for r in runs for s in r.step_s)
    rec.e2e = percentiles(r.e2e_s for r in runs)
    rec.tokens_per_s = percentiles(rates(b * n, (r.e2e_s for r in runs)))
    if hasattr(runner, "acceptance"):  # speculative decoding: the draft's acceptance rate over these runs
        rec.extra["draft_acceptance"] = runner.acceptance()
    rec.peak_rss_mb = round(rss.peak_mb(), 1)
    if rec.device != "cpu":
        rec.gpu_mem_mb = gpu_memory_mb()


def _position_sweep(runner: Runner, cfg: GPT2Config, batch: int, plan: Plan, rss: PeakRss):
    """Median decode-step time at each of ``plan.positions``: [[position, seconds], ...], and peak RSS.

    Runners with a ``decode_stepper`` (the engine, HF) are interleaved: every position is prefilled
    once, then the sweep takes one step at each position per round, 2 x position_steps rounds,
    alternating direction. Bursts of load on a shared machine then land on every position alike
    (a block-per-position sweep read 1.35x for 1000 vs 16 in one run where an interleaved loop read
    1.15x). Others (CTranslate2, whose token stream runs ahead in its own thread) get blocks of steps
    per position, up then down, each position's median over both passes.
    """
    rss.reset()
    steps = plan.position_steps
    rounds = 2 * steps
    order = [p for p in sorted(set(plan.positions)) if p + rounds <= cfg.n_positions]  # room for the steps
    times: dict[int, list[float]] = {p: [] for p in order}
    if hasattr(runner, "decode_stepper"):
        steppers = {p: runner.decode_stepper(prompt_ids(batch, p, cfg.vocab_size, cfg.eos_token_id), rounds)
                    for p in order}
        rss.sample()
        for r in range(rounds):
            for pos in (order if r % 2 == 0 else order[::-1]):
                times[pos].append(steppers[pos]())
        rss.sample()
    else:
        for pos in order + order[::-1]:
            prompts = prompt_ids(batch, pos, cfg.vocab_size, cfg.eos_token_id)
            times[pos] += runner.step_times_at(prompts, steps)
            rss.sample()
    return [[p, float(np.median(times[p]))] for p in order], rss.peak_mb()


def kernel_ceilings(cfg: GPT2Config, plan: Plan, say: Callable[[str], None]) -> dict[tuple, dict]:
    """benchmarks/kernel_scaling.py for this run's batch > 1 configurations at its shortest prompt (the
    throughput configuration; a long prompt's prefill would make the probe take minutes): the
    end-to-end tokens/s scaling a graph made of nothing but ORT's kernels would reach. Keyed like the
    records, (batch, prompt_len, new_tokens)."""
    from benchmarks import kernel_scaling as ks
    batches = tuple(b for b in plan.batches if b > 1)
    p = min(plan.prompt_lens)
    out = {}
    for n in plan.new_tokens:
        try:
            results = ks.measure(cfg, batches, p, n, plan.threads or 1, KERNEL_CEILING_REPEATS, progress=lambda _: None)
        except Exception as e:  # a probe beside the run: its failure is reported, never ends the run
            say(f"kernel ceiling not measured for prompt {p} + {n} new tokens: {short_error(e)}")
            continue
        for r in results:
            out[(r.batch, p, n)] = {
                "tokens_scaling": round(r.tokens_scaling, 3), "step_scaling": round(r.step_scaling, 3),
                "position": r.position, "repeats": KERNEL_CEILING_REPEATS,
                **{f"{part}_ms": {str(b): round(t * 1e3, 3) for b, t in getattr(r, f"{part}_s").items()}
                   for part in ("linear", "attention", "prefill")}}
    return out


def attach_kernel_ceiling(records: list[BenchRecord], model: str, ceilings: dict[tuple, dict]) -> None:
    """On the fp32 ORT engine's records (whose graph is made of those kernels)."""
    for r in records:
        if r.model == model and r.backend == "engine-ort" and (r.batch, r.prompt_len, r.new_tokens) in ceilings:
            r.extra["kernel_ceiling"] = ceilings[(r.batch, r.prompt_len, r.new_tokens)]


def run_bench(models: Sequence[ModelSpec], plan: Plan, out_dir: Path, *, work_root: Path,
              floor_rates: tuple[float, float] | None = None, show_progress: bool = True,
              log: Callable[[str], None] | None = None) -> BenchResult:
    """Measure every model x runner x configuration of ``plan``; write and return the results.

    ``floor_rates`` (bandwidth GB/s, GFLOP/s) skips the floor measurement (tests); by default both
    are measured once here with ``plan.threads`` threads.
    """
    from tqdm import tqdm

    t_start = time.perf_counter()
    conditions = cond.collect_conditions()
    runners_per_model = len(plan.backends) + len(plan.peers)
    bar = tqdm(total=len(models) * runners_per_model * len(plan.configs), desc="bench", unit="config",
               disable=not show_progress, file=sys.stderr, dynamic_ncols=True)
    say = log or (lambda s: bar.write(s, file=sys.stderr))

    def step(label: str) -> None:
        bar.set_postfix_str(label, refresh=False)
        bar.update(1)

    threads = plan.threads
    if floor_rates is None:
        bar.set_postfix_str(f"floor: bandwidth and GFLOP/s, {threads} threads")
        floor_rates = (fl.measure_memory_bandwidth(threads or 1), fl.measure_matmul_gflops(threads or 1))
    bw, gflops = floor_rates
    busy = cond.busy_warning(conditions)
    if busy:
        say(f"warning: {busy}")
    say(f"floor: {bw:.1f} GB/s memory bandwidth, {gflops:.0f} GFLOP/s fp32 matmul ({threads} threads)")

    records: list[BenchRecord] = []
    try:
        for mspec in models:
            bar.set_postfix_str(f"{mspec.name}: preparing weights")
            model = prepare_model(mspec, work_root)
            tok = shipped_tokenizer()
            vprompt = tok.encode(gates.VALIDATION_TEXT, add_special_tokens=False).ids
            reference = None
            bar.set_postfix_str(f"{mspec.name}: HF reference")
            try:
                t0 = time.perf_counter()
                reference = hf_reference(model.checkpoint_dir, vprompt, gates.VALIDATION_NEW_TOKENS, threads)
                release_memory()
                model.setup_s["reference"] = round(time.perf_counter() - t0, 2)
                say(f"{model.name}: reference = HF generate, greedy, {len(reference)} tokens after a "
                    f"{len(vprompt)}-token prompt ({len(set(reference))} distinct)")
            except ImportError as e:
                say(f"{model.name}: no reference (transformers/torch not installed: {e}); nothing is timed")
            specs = [engine_spec(b, model, threads) for b in plan.backends]
            specs += [peer_spec(p, model, threads) for p in plan.peers]
            acc_ref = None
            if reference is not None and any(s.lossy for s in specs):
                acc_ref = hf_logits(model.checkpoint_dir, gates.accuracy_ids(model.config), threads)
                release_memory()
            for spec in specs:
                bar.set_postfix_str(f"{model.name} {spec.backend} {spec.precision}: load + validate")
                recs = measure_runner(spec, model, plan, reference, vprompt, conditions=conditions,
                                      log=say, progress=step, accuracy_ref=acc_ref)
                for r in recs:
                    if r.ok and r.device == "cpu":  # the floor is this CPU's; a GPU run has its own
                        r.floor = fl.floor_record(
                            model.config, batch=r.batch, prompt_len=r.prompt_len, new_tokens=r.new_tokens,
                            bytes_per_param=BYTES_PER_PARAM[r.precision], bandwidth_GBps=bw, gflops=gflops,
                            kv_bytes_per_elem=KV_BYTES[r.precision])
                records.extend(recs)
            if plan.kernel_ceiling and "ort" in plan.backends and max(plan.batches) > 1:
                bar.set_postfix_str(f"{model.name}: ONNX Runtime's kernels alone (batch scaling ceiling)")
                attach_kernel_ceiling(records, model.name, kernel_ceilings(model.config, plan, say))
    except KeyboardInterrupt:
        say("interrupted: writing the records measured so far")
    finally:
        bar.close()
    add_ratios(records)
    wall = time.perf_counter() - t_start
    extra = {
        "threads": threads,
        "repeats / warmup": f"{plan.repeats} / {plan.warmup}",
        "floor": f"{bw:.1f} GB/s read bandwidth, {gflops:.0f} GFLOP/s fp32 matmul ({threads} threads)",
        "weights": "; ".join(_weights_label(m) for m in models),
        "validation": f"greedy {gates.VALIDATION_NEW_TOKENS} tokens vs HF generate (exact); lossy precisions: "
                      f"teacher-forced argmax agreement with HF fp32 >= {gates.LOSSY_MIN_AGREEMENT:.0%} and greedy "
                      f"tokens within {gates.LOSSY_TIE_X_STD} x logit std of their own teacher-forced best",
        "memory": "peak RSS is process-wide (see extra.rss_baseline_mb per record); RSS / weights = "
                  "(RSS after load + validation - RSS before load) / weight file bytes; load / read = load_s / "
                  "reading the weight files from the page cache, in the same run",
        "load avg 1m at end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        **({"warning": busy} if busy else {}),
        "wall": f"{wall:.0f} s",
    }
    header = cond.format_header(conditions, extra)
    return write_outputs(records, out_dir, header)


def _weights_label(m: ModelSpec) -> str:
    if m.init == "random":
        return f"{m.name}: random (seed {m.seed}, init range {m.init_range:g})"
    return f"{m.name}: checkpoint {m.source or m.name}"
