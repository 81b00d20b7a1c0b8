"""`gpt2-engine bench-load`: the engine loop under concurrent load against its own ceiling, in one run.

The scheduler issue's figures (engine/scheduler.py: one forward per iteration), all from one loaded
Generator, interleaved round by round so that drift hits every shape alike:

  raw forward   backend.forward of one decode step on the slot pool, batch 1 and batch B (the ceiling
                of B rows: B / the batch-B forward, tokens/s)
  static        the B prompts as one `generate` call (every row starts together: the reference)
  together      B threads calling `generate` at the same moment (a barrier), the same prompts
  closed loop   B threads, each sending `requests_per_client` requests one after the other
  host time     the loop's time outside forwards per iteration (planning, sampling, deltas), at
                batch 1 and batch B (EngineCore.host_s / steps)

Every shape is validated first: the greedy tokens of each prompt in the concurrent shapes must equal
the prompt run alone. Medians over rounds; ratios are taken within a round, then their median.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.conditions import collect_conditions
from engine.sampling import SamplingParams


@dataclass(frozen=True)
class LoadPlan:
    batch: int = 8
    prompt_len: int = 12
    new_tokens: int = 64
    requests_per_client: int = 2
    rounds: int = 3
    raw_repeats: int = 20


def _prompts(gen, plan: LoadPlan, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, gen.config.vocab_size - 1, plan.prompt_len).tolist() for _ in range(plan.batch)]


def raw_forward_s(gen, batch: int, repeats: int, position: int = 48) -> float:
    """Median time of one decode forward of `batch` rows at ~`position` filled slots (a fresh pool)."""
    be = gen.backend
    cache = be.new_cache(batch, gen.max_context)
    ids = np.ones((batch, position), np.int64)
    be.forward(cache, ids, np.zeros(batch, np.int64), np.zeros((batch, 1), np.int64))
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        be.forward(cache, np.ones((batch, 1), np.int64), np.full(batch, position + i % 16, np.int64),
                   np.zeros((batch, 1), np.int64))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _static(gen, prompts, params) -> dict:
    t0 = time.perf_counter()
    outs = gen.generate(prompts, params)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    return {"tokens_per_s": tokens / wall, "ttft_max_s": max(o.timings.ttft_s for o in outs),
            "decode_per_step_s": float(np.median([o.timings.decode_s / max(len(o.timings.itl_s), 1) for o in outs])),
            "tokens": [o.token_ids for o in outs]}


def _threads(gen, jobs: list[list[list[int]]], params) -> dict:
    """One thread per job (a list of prompts sent one after the other), released together."""
    barrier = threading.Barrier(len(jobs) + 1)
    results: list = [None] * len(jobs)

    def client(i):
        barrier.wait()
        results[i] = [gen.generate(p, params) for p in jobs[i]]
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    calls0 = gen.stats().forward_calls
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    outs = [o for r in results for o in r]
    first = sorted(o.timings.ttft_s for r in results for o in r[:1])        # each client's first request
    return {"tokens_per_s": sum(len(o.token_ids) for o in outs) / wall, "first_tokens_s": first,
            "ttft_max_s": first[-1], "forwards": gen.stats().forward_calls - calls0,
            "tokens": [[o.token_ids for o in r] for r in results]}


def _host_per_step(gen, prompts, params) -> float:
    core = gen.core
    h0, s0 = core.host_s, core.steps
    gen.generate(prompts, params)
    return (core.host_s - h0) / max(core.steps - s0, 1)


def run_load_bench(gen, plan: LoadPlan, out: Path | None = None, echo=print) -> dict:
    """The whole run; returns (and writes to `out`, a JSON file) the record."""
    params = SamplingParams.greedy(plan.new_tokens, stop_at_eos=False)
    prompts = _prompts(gen, plan)
    # Validation: each prompt alone is the reference for every concurrent shape.
    alone = [gen.generate(p, params).token_ids for p in prompts]
    static = _static(gen, prompts, params)
    together = _threads(gen, [[p] for p in prompts], params)
    if static["tokens"] != alone or [t[0] for t in together["tokens"]] != alone:
        raise RuntimeError("a concurrent shape's greedy tokens differ from the prompts run alone: not timed")
    echo("All results match. Starting benchmarks.")
    rounds = []
    for r in range(plan.rounds):
        row = {"raw_b1_s": raw_forward_s(gen, 1, plan.raw_repeats), "raw_bB_s": raw_forward_s(gen, plan.batch, plan.raw_repeats)}
        row["static"] = {k: v for k, v in _static(gen, prompts, params).items() if k != "tokens"}
        row["together"] = {k: v for k, v in _threads(gen, [[p] for p in prompts], params).items() if k != "tokens"}
        closed = _threads(gen, [[p] * plan.requests_per_client for p in prompts], params)
        row["closed"] = {k: v for k, v in closed.items() if k != "tokens"}
        row["host_b1_s"] = _host_per_step(gen, prompts[:1], params)
        row["host_bB_s"] = _host_per_step(gen, prompts, params)
        ceiling = plan.batch / row["raw_bB_s"]
        row["ratios"] = {
            "together_vs_static_tokens_per_s": row["together"]["tokens_per_s"] / row["static"]["tokens_per_s"],
            "together_last_ttft_vs_static_ttft": row["together"]["ttft_max_s"] / row["static"]["ttft_max_s"],
            "static_decode_step_vs_raw_bB": row["static"]["decode_per_step_s"] / row["raw_bB_s"],
            "closed_vs_ceiling": row["closed"]["tokens_per_s"] / ceiling,
            "raw_bB_vs_b1": row["raw_bB_s"] / row["raw_b1_s"],
            "host_b1_vs_raw_b1": row["host_b1_s"] / row["raw_b1_s"],
            "host_bB_vs_raw_bB": row["host_bB_s"] / row["raw_bB_s"],
        }
        rounds.append(row)
        echo(f"round {r + 1}/{plan.rounds}: " + ", ".join(f"{k} {v:.3f}" for k, v in row["ratios"].items()))
    med = {k: float(np.median([rw["ratios"][k] for rw in rounds])) for k in rounds[0]["ratios"]}
    record = {"plan": asdict(plan), "model": str(gen.artifact.path), "precision": gen.artifact.precision,
              "mixed_steps": gen.core.mixed_steps, "conditions": collect_conditions(), "rounds": rounds,
              "median_ratios": med,
              "median_ms": {k: 1e3 * float(np.median([rw[k] for rw in rounds]))
                            for k in ("raw_b1_s", "raw_bB_s", "host_b1_s", "host_bB_s")},
              "first_tokens_ms_last_round": [round(1e3 * t, 1) for t in rounds[-1]["together"]["first_tokens_s"]]}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2))
    return record
