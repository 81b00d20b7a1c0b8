"""`gpt2-engine bench`, `bench-kernels`, `bench-serve`, `bench-load`: the click commands over the harness (benchmarks/).

They live in cli/, the composition root, so that benchmarks/ imports no command-line code (the layers
import downwards only: docs/ARCHITECTURE.md); cli/main.py adds them to the `gpt2-engine` group, and
`bench` is also runnable alone: `python -m cli.bench --quick`. Each checks the optional libraries it
needs before any work (benchmarks/extras.py; bench-kernels needs none: ONNX Runtime and onnx are core).
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
import time
from pathlib import Path

import click
from click.core import ParameterSource

from cli.errors import friendly_errors
from cli.help import examples

# The bench's vocabulary (benchmarks/runners.py, benchmarks/harness.py), repeated here so that loading
# the `gpt2-engine` group (every CLI call) does not import them and numpy; tests/test_bench_harness.py
# checks the two agree.
ENGINE_BACKENDS = ("ort", "ort-int8", "ort-spec", "ort-cuda", "trt")
PEERS = ("hf", "ct2", "ct2-int8")
DEFAULT_PEERS = ("hf", "ct2")
DEFAULT_POSITIONS = (16, 128, 256, 512, 900, 1000)
QUICK_POSITIONS = (16, 256, 900)

# --quick: what it sets (unless the option is given explicitly). Measured on the 2-core CPU machine:
# under 5 minutes from nothing (random checkpoint, export, CT2 conversion, reference, all runners).
QUICK = {"models": ("gpt2",), "batches": (1,), "prompt_lens": (32,), "new_tokens": (32,), "repeats": 3,
         "position_list": QUICK_POSITIONS}


def run_bench(*args, **kwargs):
    """harness.run_bench, imported on first use (a seam the tests replace)."""
    from benchmarks.harness import run_bench as run
    return run(*args, **kwargs)


def _physical_cores() -> int:
    """The default thread count of the bench commands."""
    import psutil
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def _new_results_dir(prefix: str = "") -> Path:
    """bench-results/<prefix><UTC timestamp>, claimed with mkdir: two runs started in the same second get
    their own (the second with -2), never each other's results.jsonl."""
    stamp = prefix + _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    root = Path("bench-results")
    root.mkdir(exist_ok=True)
    n = 1
    while True:
        d = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            n += 1


def _default_work_dir() -> Path:
    from export.model_cache import default_cache_dir
    return default_cache_dir() / "bench"


def _model_spec(model: str, init: str, seed: int, init_range: float):
    from benchmarks.models import ModelSpec
    from engine.config import SIZES, canonical_size_name
    from engine.errors import InputError
    if Path(model).expanduser().is_dir():  # a directory is always a checkpoint, whatever --init says
        return ModelSpec(Path(model).expanduser().resolve().name, "checkpoint", source=model)
    size = canonical_size_name(model)
    if size is None:
        raise InputError(f"--model {model!r} is neither a checkpoint directory nor a model name "
                         f"({', '.join(SIZES)})")
    if init == "random":
        return ModelSpec(size, "random", SIZES[size], seed=seed, init_range=init_range)
    return ModelSpec(size, "checkpoint", source=model)


@click.command("bench", context_settings={"help_option_names": ["-h", "--help"]}, epilog=examples(
    "gpt2-engine bench --quick",
    "gpt2-engine bench --model gpt2 --batch 1 --batch 8 --new-tokens 64",
    "gpt2-engine bench --model gpt2-medium --backend ort --backend ort-int8 --no-peers"))
@click.option("--model", "models", multiple=True, default=("gpt2",), show_default=True,
              help="Size name (gpt2 .. gpt2-xl, distilgpt2) or HF checkpoint directory; repeatable.")
@click.option("--init", type=click.Choice(["random", "checkpoint"]), default="random", show_default=True,
              help="For size names: random weights (saved once under --work-dir, shared by every runner), "
                   "or the real checkpoint (HF hub cache, else download). Directories are always checkpoints.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--init-range", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True,
              help="Std of the random weights. 0.1, not 0.02: at 0.02 greedy output is one token repeated "
                   "and the validation gate proves little (docs/ARCHITECTURE.md, \"Tests: the oracle\"); "
                   "speed does not depend on it.")
@click.option("--batch", "batches", type=click.IntRange(min=1), multiple=True, default=(1,), show_default=True,
              help="Batch size; repeatable.")
@click.option("--prompt-len", "prompt_lens", type=click.IntRange(min=1), multiple=True, default=(32,),
              show_default=True, help="Prompt tokens per row; repeatable.")
@click.option("--new-tokens", "new_tokens", type=click.IntRange(min=1), multiple=True, default=(128,),
              show_default=True, help="Generated tokens per row; repeatable.")
@click.option("--backend", "backends", type=click.Choice(ENGINE_BACKENDS), multiple=True, default=("ort",),
              show_default=True, help="Engine backend; repeatable (GPU ones are reported skipped without a GPU).")
@click.option("--peers/--no-peers", default=True, show_default=True,
              help=f"Measure the peers ({', '.join(DEFAULT_PEERS)}) on the same weights and prompts.")
@click.option("--peer", "peer_list", type=click.Choice(PEERS), multiple=True,
              help="Choose the peers instead of the default set; repeatable.")
@click.option("--peer-max-batch", type=click.IntRange(min=1), default=None,
              help="Time peers only up to this batch size (they take minutes at large batches); "
                   "larger batches are recorded as skipped for them.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for every runner and the floor (default: physical cores).")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True, help="Timed runs per config.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed runs first.")
@click.option("--positions/--no-positions", default=True, show_default=True,
              help="Measure decode latency vs context position.")
@click.option("--position", "position_list", type=click.IntRange(min=1), multiple=True,
              default=DEFAULT_POSITIONS, show_default=True, help="Context positions to time; repeatable.")
@click.option("--kernel-ceiling/--no-kernel-ceiling", default=True, show_default=True,
              help="With batches > 1 and backend ort: also time ONNX Runtime's kernels alone (as "
                   "`gpt2-engine bench-kernels`) and report the engine's batch scaling against theirs.")
@click.option("--quick", is_flag=True,
              help="gpt2, batch 1, prompt 32, 32 new tokens, 3 repeats, positions 16/256/900 "
                   "(options given explicitly still win).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Results directory (default: bench-results/<UTC timestamp>, a new one per run).")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where random checkpoints, exports and CT2 conversions are kept for reuse "
                   "(default: $GPT2_ENGINE_CACHE/bench, i.e. ~/.cache/gpt2-engine/bench); runs at once share it "
                   "safely (each waits for what another is preparing).")
@click.pass_context
@friendly_errors
def bench(ctx, models, init, seed, init_range, batches, prompt_lens, new_tokens, backends, peers, peer_list,
          peer_max_batch, threads, repeats, warmup, positions, position_list, kernel_ceiling, quick, out,
          work_dir):
    """Benchmark the engine: TTFT, ms/token, tokens/s (p50/p90/p99), memory, decode vs context,
    beside HF transformers, CTranslate2 and the memory-bandwidth floor, every output validated first.

    Writes results.jsonl, table.md and PNG plots to --out, then prints the conditions and the table.
    """
    from benchmarks.extras import check_bench
    values = dict(models=models, batches=batches, prompt_lens=prompt_lens, new_tokens=new_tokens,
                  repeats=repeats, position_list=position_list)
    if quick:
        for name, v in QUICK.items():
            if ctx.get_parameter_source(name) in (ParameterSource.DEFAULT, None):
                values[name] = v
    threads = threads or _physical_cores()
    chosen_peers = tuple(dict.fromkeys(peer_list)) if peer_list else (DEFAULT_PEERS if peers else ())
    if peer_list and not peers:
        raise click.UsageError("--peer and --no-peers contradict each other: give one")
    check_bench(chosen_peers)  # before any export or timing: a missing library is one line, now
    from benchmarks.harness import Plan
    plan = Plan(batches=tuple(values["batches"]), prompt_lens=tuple(values["prompt_lens"]),
                new_tokens=tuple(values["new_tokens"]), backends=tuple(dict.fromkeys(backends)),
                peers=chosen_peers, threads=threads, repeats=values["repeats"], warmup=warmup,
                positions=tuple(values["position_list"]) if positions else (), peer_max_batch=peer_max_batch,
                kernel_ceiling=kernel_ceiling)
    specs = [_model_spec(m, init, seed, init_range) for m in dict.fromkeys(values["models"])]
    out = out or _new_results_dir()
    t0 = time.perf_counter()
    result = run_bench(specs, plan, out, work_root=work_dir or _default_work_dir())
    click.echo(result.header)
    click.echo()
    click.echo(result.table)
    click.echo()
    click.echo("Engine vs peers and floor (p50; below 1x against a peer, the engine is faster):")
    click.echo(result.ratios)
    click.echo()
    if result.scaling:
        click.echo("Batch scaling (tokens/s over batch 1) vs ONNX Runtime's kernels alone:")
        click.echo(result.scaling)
        click.echo()
    click.echo(f"wrote {out}/results.jsonl, table.md, {', '.join(p.name for p in result.plots) or 'no plots'} "
               f"in {time.perf_counter() - t0:.0f} s", err=True)
    if not any(r.ok for r in result.records):
        sys.exit(1)


@click.command("bench-kernels", context_settings={"help_option_names": ["-h", "--help"]}, epilog=examples(
    "gpt2-engine bench-kernels --model gpt2",
    "gpt2-engine bench-kernels --model gpt2-medium --batch 8 --threads 2",
    "gpt2-engine bench-kernels --forward fp32=DIR --forward int8=DIR2 --batch 8 --batch 16"))
@click.option("--model", "models", multiple=True, default=("gpt2",), show_default=True,
              help="Size name (gpt2 .. gpt2-xl, distilgpt2); repeatable.")
@click.option("--batch", "batches", type=click.IntRange(min=2), multiple=True, default=(8, 16), show_default=True,
              help="Batch size compared with batch 1; repeatable.")
@click.option("--prompt-len", type=click.IntRange(min=1), default=32, show_default=True,
              help="Prompt tokens per row (the bench's default).")
@click.option("--new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Generated tokens per row (the bench's default); decode is timed at the middle position.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads (default: physical cores).")
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True,
              help="Interleaved timing rounds; the best is kept (--forward: the median, default 7 rounds).")
@click.option("--forward", "forward", multiple=True, metavar="NAME=DIR",
              help="Instead of the kernels alone: each exported model directory's own forward (decode at batch 1 "
                   "and every --batch, prefill of --prefill-len tokens), one process per model, interleaved; "
                   "repeatable.")
@click.option("--prefill-len", type=click.IntRange(min=1), default=512, show_default=True,
              help="With --forward: prompt tokens of the timed prefill.")
@click.pass_context
@friendly_errors
def bench_kernels(ctx, models, batches, prompt_len, new_tokens, threads, repeats, forward, prefill_len):
    """How far ONNX Runtime's own CPU kernels let generation scale with batch: the decoder's linear
    layers and GroupQueryAttention timed alone, in the model's shapes, on random weights.

    Reads: the "end-to-end tokens/s scaling" column is what `gpt2-engine bench`'s tokens/s ratio
    would be for a graph made of these kernels only; an engine close to it is bounded by the kernels,
    not by its graph (benchmarks/kernel_scaling.py).
    """
    from benchmarks.kernel_scaling import measure, report
    from engine.config import SIZES, canonical_size_name
    from engine.errors import InputError
    threads = threads or _physical_cores()
    if forward:
        _bench_forward(forward, batches, prefill_len, threads,
                       repeats if ctx.get_parameter_source("repeats") is ParameterSource.COMMANDLINE else 7)
        return
    for model in dict.fromkeys(models):
        size = canonical_size_name(model)
        if size is None:
            raise InputError(f"--model {model!r} is not a model name ({', '.join(SIZES)})")
        results = measure(SIZES[size], tuple(dict.fromkeys(batches)), prompt_len, new_tokens, threads, repeats,
                          progress=lambda msg: click.echo(msg, err=True))
        click.echo(report(size, results, threads))
        click.echo()


def _bench_forward(forward, batches, prefill_len, threads, repeats):
    from benchmarks.conditions import collect_conditions, format_header
    from benchmarks.kernel_scaling import forward_report, forward_scaling
    from engine.errors import InputError
    models = {}
    for spec in forward:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path or not Path(path).is_dir():
            raise InputError(f"--forward takes NAME=DIR with an exported model directory, got {spec!r}")
        models[name] = Path(path)
    click.echo(format_header(collect_conditions()))
    result = forward_scaling(models, tuple(dict.fromkeys(batches)), prefill_len, threads, repeats,
                             progress=lambda msg: click.echo(msg, err=True))
    click.echo(forward_report(result, threads))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    click.echo(f"load average (1 min) after: {load:.2f}" if load is not None else "")


# bench-serve's vocabulary (benchmarks/serve_bench.py), repeated for the same reason as above;
# tests/test_serve_bench.py checks the two agree.
SERVE_MODES = ("inflight", "thread-per-request", "static", "http")
SERVE_LOCAL_MODES = ("inflight", "thread-per-request", "static")
SERVE_CONCURRENCY = (1, 2, 4, 8, 16)
SERVE_QUICK_CONCURRENCY = (1, 8)


def run_serve_bench(*args, **kwargs):
    """serve_bench.run_serve_bench, imported on first use (a seam the tests replace)."""
    from benchmarks.serve_bench import run_serve_bench as run
    return run(*args, **kwargs)


def _range(option: str, value: tuple[int, int]) -> tuple[int, int]:
    lo, hi = value
    if not 1 <= lo <= hi:
        raise click.BadParameter(f"MIN MAX with 1 <= MIN <= MAX, got {lo} {hi}", param_hint=option)
    return lo, hi


@click.command("bench-serve", context_settings={"help_option_names": ["-h", "--help"]}, epilog=examples(
    "gpt2-engine bench-serve --quick",
    "gpt2-engine bench-serve --concurrency 1 --concurrency 8 --rate 2",
    "gpt2-engine bench-serve --http http://127.0.0.1:8000 --http-model gpt2 --quick"))
@click.option("--model", "models", multiple=True, default=("gpt2",), show_default=True,
              help="Size name (gpt2 .. gpt2-xl, distilgpt2) or HF checkpoint directory; repeatable.")
@click.option("--init", type=click.Choice(["random", "checkpoint"]), default="random", show_default=True,
              help="For size names: random weights (prepared as `gpt2-engine bench` does, shared with it), "
                   "or the real checkpoint.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--init-range", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True,
              help="Std of the random weights (0.1: diverse greedy output, so the validation gate proves something).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="ONNX Runtime intra-op threads (default: physical cores).")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="The in-flight engine's KV-cache slots (requests decoding at once).")
@click.option("--prefill-chunk", type=click.IntRange(min=0), default=None,
              help="The in-flight engine's prompt tokens per iteration while others decode (default: adaptive, "
                   "~3/4 of a decode step; 0: never split a prompt, to measure what chunking buys).")
@click.option("--concurrency", "concurrency", type=click.IntRange(min=1), multiple=True,
              default=SERVE_CONCURRENCY, show_default=True, help="Closed-loop clients; repeatable.")
@click.option("--rate", "rates", type=click.FloatRange(min=0, min_open=True), multiple=True,
              help="Open-loop Poisson arrival rate, requests/s; repeatable (default: none).")
@click.option("--requests", type=click.IntRange(min=1), default=None,
              help="Requests per point (default: 4 x clients, at least 32; open loop 32; --quick: 2 x clients, "
                   "at least 8).")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              help="Seconds per point after which no request starts (those in flight finish).")
@click.option("--rounds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Measure each point this many times, its modes alternating (inflight, static, inflight, ...): "
                   "ratios are taken within a round and the goals read their median, so the machine's speed "
                   "drifting between modes doesn't read as a difference.")
@click.option("--mode", "modes", type=click.Choice(SERVE_MODES), multiple=True,
              help="Modes to run; repeatable (default: inflight, thread-per-request, static; with --http: http).")
@click.option("--http", "http_url", default=None, metavar="URL",
              help="An OpenAI-compatible server (e.g. http://127.0.0.1:8000) serving the same model: the 'http' "
                   "mode sends the workload to its /v1/completions, streaming.")
@click.option("--http-model", default=None, help="The `model` field of --http requests (default: none sent).")
@click.option("--prompt-lens", type=(int, int), default=(16, 512), show_default=True, metavar="MIN MAX",
              help="Prompt lengths of the workload, tokens (log-uniform).")
@click.option("--new-tokens", type=(int, int), default=(32, 128), show_default=True, metavar="MIN MAX",
              help="New tokens per request (uniform).")
@click.option("--workload-seed", type=int, default=0, show_default=True, help="Seed of prompts, lengths and arrivals.")
@click.option("--quick", is_flag=True,
              help="gpt2, clients 1 and 8, few requests, 60 s per point (options given explicitly still win).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Results directory (default: bench-results/serve-<UTC timestamp>).")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where random checkpoints and exports are kept (default: the bench's, $GPT2_ENGINE_CACHE/bench).")
@click.pass_context
@friendly_errors
def bench_serve(ctx, models, init, seed, init_range, threads, max_batch, prefill_chunk, concurrency, rates, requests, time_limit,
                rounds, modes, http_url, http_model, prompt_lens, new_tokens, workload_seed, quick, out, work_dir):
    """Serving benchmark: the in-flight engine, thread-per-request (the old Generator) and the static
    batch (the ceiling) under a closed-loop concurrency sweep and open-loop Poisson arrivals, on one
    seeded workload of mixed prompt lengths; every mode validated before it is timed.

    Reports request throughput, output tokens/s, TTFT, inter-token latency (ITL), TPOT, end-to-end and
    queue time (p50/p90/p99) and the ratios between modes; writes results.jsonl, table.md and plots.
    """
    def explicit(name):
        return ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)
    if quick:
        models = models if explicit("models") else ("gpt2",)
        concurrency = concurrency if explicit("concurrency") else SERVE_QUICK_CONCURRENCY
        time_limit = time_limit if explicit("time_limit") else 60.0
    prompt_lens, new_tokens = _range("--prompt-lens", prompt_lens), _range("--new-tokens", new_tokens)
    modes = tuple(dict.fromkeys(modes)) or (("http",) if http_url else SERVE_LOCAL_MODES)
    if "http" in modes and not http_url:
        raise click.UsageError("--mode http needs --http URL (the server to send the workload to)")
    if http_url and "http" not in modes:
        raise click.UsageError("--http is given but --mode leaves 'http' out: add --mode http")
    from benchmarks.extras import INSTALL, importable
    from engine.errors import BackendUnavailable
    if not importable("matplotlib"):
        raise BackendUnavailable(f"gpt2-engine bench-serve needs matplotlib (plots): {INSTALL}")
    if http_url:
        from benchmarks.serve_bench import check_http
        check_http(http_url)
    specs = [_model_spec(m, init, seed, init_range) for m in dict.fromkeys(models)]
    from engine.errors import InputError
    for s in specs:
        ctx_len = s.config.n_positions if s.config is not None else 1024
        if prompt_lens[1] + new_tokens[1] > ctx_len:
            raise InputError(f"--prompt-lens max {prompt_lens[1]} + --new-tokens max {new_tokens[1]} exceeds "
                             f"{s.name}'s context ({ctx_len} tokens): lower one of them")
    from benchmarks.serve_bench import ServePlan
    plan = ServePlan(concurrency=tuple(dict.fromkeys(concurrency)), rates=tuple(dict.fromkeys(rates)),
                     requests=requests, quick=quick, time_limit_s=time_limit, modes=modes,
                     threads=threads or _physical_cores(), max_batch=max_batch, prefill_chunk=prefill_chunk,
                     prompt_lens=prompt_lens,
                     new_tokens=new_tokens, workload_seed=workload_seed, arrival_seed=workload_seed,
                     http_url=http_url, http_model=http_model, rounds=rounds)
    out = out or _new_results_dir("serve-")
    t0 = time.perf_counter()
    result = run_serve_bench(specs, plan, out, work_root=work_dir or _default_work_dir(),
                             log=lambda msg: click.echo(msg, err=True))
    click.echo(result.header)
    click.echo()
    click.echo(result.table)
    for title, text in (("In-flight vs static batch and thread-per-request:", result.ratios),
                        ("Goals (issue 13):", result.goals)):
        if text:
            click.echo()
            click.echo(title)
            click.echo(text)
    click.echo()
    click.echo(f"wrote {out}/results.jsonl, table.md, {', '.join(p.name for p in result.plots) or 'no plots'} "
               f"in {time.perf_counter() - t0:.0f} s", err=True)
    if not any(r.ok for r in result.records):
        sys.exit(1)


@click.command("bench-load", context_settings={"help_option_names": ["-h", "--help"]}, epilog=examples(
    "gpt2-engine bench-load gpt2 --init random",
    "gpt2-engine bench-load artifacts/gpt2 --batch 8 --rounds 5 --out load.json"))
@click.argument("model")
@click.option("--init", type=click.Choice(["random"]), default=None, help="For a size name: random weights.")
@click.option("--precision", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
              help="For a name: the export to load.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime threads (default: physical cores).")
@click.option("--batch", type=click.IntRange(min=2), default=8, show_default=True, help="Clients (and slots).")
@click.option("--prompt-len", type=click.IntRange(min=1), default=12, show_default=True)
@click.option("--new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True, help="Interleaved rounds.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the record (JSON).")
@friendly_errors
def bench_load(model, init, precision, threads, batch, prompt_len, new_tokens, rounds, out):
    """The engine loop under concurrent load against its own ceiling: requests arriving together vs the
    static batch, closed-loop clients vs B / the raw batch-B forward, the loop's host time per step
    (benchmarks/engine_load.py); validated before timing."""
    import json

    from benchmarks.engine_load import LoadPlan, run_load_bench
    from engine import Generator
    kwargs = {"init": init, "precision": precision} if not Path(model).is_dir() else {}
    # Prefix caching off: the shapes repeat their prompts round after round, and this measures batching.
    with Generator.from_pretrained(model, threads=threads or _physical_cores(), max_batch=batch,
                                   prefix_caching=False, **kwargs) as gen:
        gen.warm_up()   # the slot pool committed up front, as `gpt2-engine serve` does
        rec = run_load_bench(gen, LoadPlan(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, rounds=rounds),
                             out, echo=lambda m: click.echo(m, err=True))
    click.echo(json.dumps({k: rec[k] for k in ("median_ratios", "median_ms", "first_tokens_ms_last_round",
                                               "conditions")}, indent=2))


if __name__ == "__main__":
    bench()
