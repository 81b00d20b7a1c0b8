"""`gpt2-engine`: export, inspect, generate, bench, bench-kernels, build.

Every EngineError becomes one line on stderr and exit code 1 (2 for usage errors, from click);
no traceback reaches the user for an error we anticipated.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import click

from cli.errors import friendly_errors
from cli.help import AliasGroup, examples
from engine.errors import install_hint


class _Main(AliasGroup):
    aliases = {"info": "inspect"}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("gpt2-engine")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown (not installed: `pip install -e .` in the checkout)"


def _print_version(ctx: click.Context, param, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    import platform
    from importlib.metadata import PackageNotFoundError, version
    try:
        ort = f"onnxruntime {version('onnxruntime')}"
    except PackageNotFoundError:
        ort = "onnxruntime missing"
    click.echo(f"gpt2-engine {_version()} ({ort}, Python {platform.python_version()})")
    ctx.exit()


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]},
             epilog="Each command's --help ends with examples.")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Print the version (and ONNX Runtime's) and exit.")
def main() -> None:
    """GPT-2 inference: export checkpoints to ONNX, generate with ONNX Runtime or TensorRT, benchmark."""


@main.command(epilog=examples(
    "gpt2-engine export gpt2 --out artifacts/gpt2",
    "gpt2-engine export gpt2-xl --init random --seed 0 --out artifacts/xl-random",
    "gpt2-engine export path/to/hf-checkpoint --precision int8 --out artifacts/mine-int8"))
@click.argument("model")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Model directory to create.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="fp32 for ONNX Runtime CPU; fp16 for TensorRT / GPUs; int8: weight-only int8 matmuls (CPU).")
@click.option("--init", type=click.Choice(["random"]), default=None,
              help="Random weights of the named size instead of a checkpoint (no download).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --init random.")
@click.option("--init-range", type=click.FloatRange(min=0, min_open=True), default=0.02, show_default=True,
              help="Std of random weights (> 0).")
@click.option("--attention", type=click.Choice(["gqa", "fused", "ops"]), default=None,
              help="gqa: ONNX Runtime's GroupQueryAttention (default for fp32/int8, CPU); fused: one standard "
                   "ONNX Attention node (for ONNX Runtime CUDA); ops: elementary ops (default for fp16/TensorRT).")
@click.option("--prepack", is_flag=True,
              help="fp32/int8: also save ONNX Runtime's pre-packed model for this ORT and CPU (prepacked/): "
                   "replicas on one machine share its packed weights through the page cache; 1.4x (int8) to "
                   "2.3x (fp32) more disk.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@friendly_errors
def export(model, out, precision, init, seed, init_range, attention, prepack, force):
    """Export MODEL (a HF checkpoint directory, a name: gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2,
    or a Hugging Face repo id of a GPT-2 model) into a model directory."""
    from export.exporter import export_model
    path = export_model(model, out, precision=precision, init=init, seed=seed, init_range=init_range, force=force,
                        attention=attention, prepack=prepack)
    from engine.artifact import load_artifact
    click.echo(f"exported {model} ({precision}) to {path}")
    _print_info(load_artifact(path))


def _print_info(art) -> None:
    m = art.manifest
    cfg = art.config
    files = {p.name: p.stat().st_size for p in sorted(art.path.iterdir()) if p.is_file()}
    click.echo(f"  weights:    {art.label}")
    click.echo(f"  config:     {cfg.n_layer} layers, {cfg.n_embd} wide, {cfg.n_head} heads, "
               f"vocab {cfg.vocab_size}, context {cfg.n_positions}  # {cfg.n_params() / 1e6:.0f}M params")
    click.echo(f"  precision:  {m['precision']}, opset {m['opset']}, attention {m.get('attention')}, "
               f"format v{m['format_version']}")
    click.echo(f"  cache:      {m['cache']['layout']} {m['cache']['dtype']}, capacity <= {m['cache']['max_capacity']}")
    click.echo(f"  inputs:     {', '.join(t['name'] for t in m['io']['inputs'][:3])}, + {len(m['io']['inputs']) - 3} cache")
    for name, size in files.items():
        click.echo(f"  {name:<18}{size / 1e6:10.1f} MB")
    engines = sorted((art.path / "engines").glob("*.json")) if (art.path / "engines").is_dir() else []
    for e in engines:
        meta = json.loads(e.read_text())
        click.echo(f"  engine:     {e.stem} (TensorRT {meta.get('trt_version')}, {meta.get('gpu_name')})")


@main.command(epilog=examples("gpt2-engine inspect artifacts/gpt2", "gpt2-engine info artifacts/gpt2 --json"))
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@friendly_errors
def inspect(directory, as_json):
    """Print what a model directory holds."""
    from engine.artifact import MANIFEST, load_artifact
    from engine.errors import ArtifactError
    if (directory / "config.json").is_file() and not (directory / MANIFEST).is_file():
        raise ArtifactError(f"{directory} is a Hugging Face checkpoint, not a model directory: make one with "
                            f"`gpt2-engine export {directory} --out DIR` and inspect DIR (generate and serve "
                            "take the checkpoint as it is)")
    art = load_artifact(directory)  # before printing anything: an error is the only line
    if as_json:
        click.echo(json.dumps(art.manifest, indent=2))
    else:
        click.echo(str(directory))
        _print_info(art)

from cli.bench import bench, bench_kernels, bench_load, bench_serve  # noqa: E402  (the harness is imported only when they run)

main.add_command(bench)
main.add_command(bench_kernels)
main.add_command(bench_serve)
main.add_command(bench_load)


@main.command(epilog=examples(
    'gpt2-engine generate gpt2 "Hello" --init random -n 32',
    'gpt2-engine generate artifacts/gpt2 "Hello" --top-p 0.9 --seed 0 --stream',
    "gpt2-engine generate artifacts/gpt2 --batch-file prompts.txt --greedy"))
@click.argument("model")
@click.argument("prompt", required=False)
@click.option("--max-new-tokens", "-n", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=1.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=40, show_default=True, help="0 disables top-k.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True)
@click.option("--greedy", is_flag=True, help="Greedy decoding (same as --temperature 0).")
@click.option("--seed", type=int, default=None, help="Sampling seed (reproducible output).")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--stream", is_flag=True, help="Print text as it is generated.")
@click.option("--batch-file", type=click.File("r"), default=None,
              help="One prompt per line, generated as one batch (- for stdin).")
@click.option("--truncate", type=click.Choice(["error", "left"]), default="error", show_default=True,
              help="What to do with a prompt that does not fit the context.")
@click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=int, default=None, help="CPU threads (default: ONNX Runtime's choice).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="When MODEL is a name: the precision to export it in.")
@click.option("--init", type=click.Choice(["random"]), default=None,
              help="When MODEL is a size name: random weights (no download).")
@click.option("--timings", is_flag=True, help="Print load / prefill / decode timings to stderr.")
@click.option("--draft", type=click.Path(path_type=Path), default=None,
              help="Speculative decoding: a draft model directory with the same tokenizer (e.g. MODEL's own int8 "
                   "export). Greedy output is unchanged; sampling keeps MODEL's distribution.")
@click.option("--draft-k", type=click.IntRange(1, 16), default=4, show_default=True,
              help="Most draft tokens per speculative round (each takes as many as pay, by acceptance and the draft's cost).")
@friendly_errors
def generate(model, prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, greedy, seed, stop,
             stream, batch_file, truncate, backend, device, threads, precision, init, timings, draft, draft_k):
    """Generate text from PROMPT with MODEL: a model directory, or a name exported on first use into
    ~/.cache/gpt2-engine (override with GPT2_ENGINE_CACHE)."""
    from engine.errors import InputError, RandomWeightsWarning
    from engine.generator import Generator
    from engine.sampling import SamplingParams
    from export.model_cache import resolve_model_dir

    if (prompt is None) == (batch_file is None):
        raise InputError("give either a PROMPT or --batch-file (not both)")
    if batch_file is not None and stream:
        raise InputError("--stream takes a single PROMPT, not --batch-file")
    if stream and timings:
        raise InputError("--timings reports a whole generate call; drop --stream to see them")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0 if greedy else temperature,
                            top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed,
                            stop=tuple(stop))
    prompts = [prompt] if prompt is not None else [line.rstrip("\r\n") for line in batch_file if line.strip()]
    if not prompts:
        raise InputError("--batch-file holds no prompts (one per line)")
    directory = resolve_model_dir(model, precision=precision, init=init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)   # labelled below, in the CLI's own words
        gen = Generator.from_pretrained(directory, backend=backend, device=device, threads=threads, draft=draft,
                                        draft_k=draft_k)
    with gen:
        if gen.artifact.is_random:
            click.echo(f"[{gen.artifact.label}]", err=True)
        if stream:
            click.echo(prompt, nl=False)
            for delta in gen.stream(prompt, params, truncate=truncate):
                click.echo(delta, nl=False)
            click.echo()
            return
        outs = gen.generate(prompts, params, truncate=truncate)
        for p, out in zip(prompts, outs):
            click.echo(p + out.text)
            if len(prompts) > 1:
                click.echo("---")
        if timings:
            t = outs[0].timings
            click.echo(f"load {gen.load_s * 1e3:.0f} ms | prefill {t.prefill_s * 1e3:.1f} ms | decode "
                       f"{t.decode_per_token_s * 1e3:.1f} ms/token over {t.decode_steps} steps | batch {len(prompts)} | "
                       f"finish {', '.join(o.finish_reason for o in outs)}"
                       + (f" | draft acceptance {t.acceptance_rate:.0%} of {t.drafts_proposed}" if t.acceptance_rate is not None
                          else " | draft unused (no round paid: see engine/speculative.py)" if draft is not None else ""),
                       err=True)

@main.command(epilog=examples(
    "gpt2-engine export gpt2 --precision fp16 --out artifacts/gpt2-fp16",
    "gpt2-engine build artifacts/gpt2-fp16 --max-batch 8",
    'gpt2-engine generate artifacts/gpt2-fp16 "Hello" --backend trt --device cuda'))
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--max-batch", type=int, default=8, show_default=True, help="Largest batch the engine serves.")
@click.option("--max-prompt", type=int, default=512, show_default=True, help="Longest prefill (tokens) per call.")
@click.option("--capacity", type=int, default=None, help="KV-cache slots per row (default: the context, 1024).")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None,
              help="Timing cache file (default: DIR/engines/timing.cache).")
@click.option("--force", is_flag=True, help="Rebuild even if a matching engine exists.")
@friendly_errors
def build(directory, max_batch, max_prompt, capacity, timing_cache, force):
    """Compile DIR's fp16 ONNX graph into a TensorRT engine for this GPU (needs tensorrt >= 10.15 and a GPU)."""
    from engine.backends.trt_plan import import_tensorrt
    from engine.errors import BackendUnavailable
    from export.trt_build import build_engine
    try:
        import_tensorrt()  # before any work: without TensorRT, one line that says what to install
    except BackendUnavailable as e:
        raise BackendUnavailable(f"{e}. Without a GPU there is nothing to build: `generate` and `serve` run fp32 "
                                 "and int8 exports on ONNX Runtime as they are") from None
    plan = build_engine(directory, max_batch=max_batch, max_prompt=max_prompt, capacity=capacity,
                        timing_cache_path=timing_cache, force=force)
    click.echo(f"engine: {plan}")


def _autoscale_range(ctx, param, value):
    if value is None:
        return None
    lo, sep, hi = value.partition(":")
    try:
        lo_n, hi_n = int(lo), int(hi)
    except ValueError:
        lo_n = hi_n = -1
    if not sep or not (0 <= lo_n <= hi_n and hi_n >= 1):
        raise click.BadParameter(f"MIN:MAX with 0 <= MIN <= MAX and MAX >= 1 (e.g. 1:4), got {value!r}")
    return lo_n, hi_n


def _serve_on_ray(model, **options) -> int:
    """`serve --ray`: server/ray_app.py, imported here only (nothing else imports the deployment module)."""
    try:
        from server.ray_app import RayDeployError, serve_from_cli
    except ImportError as e:
        msg = str(e)
        raise click.ClickException(msg if msg.startswith("Ray Serve is not installed") else
                                   f"gpt2-engine serve --ray needs the [serve] and [ray] extras ({e}): "
                                   f"{install_hint('serve', 'ray')}") from None
    num_cpus = options.pop("num_cpus")
    try:
        return serve_from_cli(model, **options, **({"num_cpus": num_cpus} if num_cpus is not None else {}),
                              echo=click.echo)
    except RayDeployError as e:
        raise click.ClickException(str(e)) from None


@main.command(epilog=examples(
    "gpt2-engine serve artifacts/gpt2 --port 8000",
    "gpt2-engine serve gpt2 --init random --max-batch 16",
    "gpt2-engine serve artifacts/gpt2 --ray --replicas 2 --num-cpus 1"))
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0: every one).")
@click.option("--port", type=int, default=8000, show_default=True, help="TCP port (0: a free one, printed at start).")
@click.option("--max-batch", type=int, default=8, show_default=True, help="Requests decoding at once (KV-cache slots).")
@click.option("--max-queue", type=int, default=64, show_default=True,
              help="Requests that may wait for a slot; beyond it, 503 with Retry-After.")
@click.option("--api-key", default=None, envvar="GPT2_ENGINE_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize (env GPT2_ENGINE_API_KEY).")
@click.option("--cors-origin", "cors_origins", multiple=True, help="Allowed CORS origin (repeatable; '*' for any).")
@click.option("--served-model-name", default=None, help="The model id clients send and /v1/models lists (default: MODEL).")
@click.option("--threads", type=int, default=None, help="CPU threads (default: ONNX Runtime's choice).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="When MODEL is a name: the precision to export it in.")
@click.option("--init", type=click.Choice(["random"]), default=None,
              help="When MODEL is a size name: random weights (no download).")
@click.option("--drain-timeout", type=float, default=30.0, show_default=True,
              help="On SIGTERM: seconds running requests get to finish before they are aborted.")
@click.option("--draft", type=click.Path(path_type=Path), default=None,
              help="Speculative decoding with this draft model directory (same tokenizer, e.g. MODEL's own int8 export) "
                   "whenever one request decodes alone.")
@click.option("--prefix-caching/--no-prefix-caching", default=True, show_default=True,
              help="Reuse the cached keys and values of a prompt's longest prefix held in the pool (a finished or "
                   "running request's): usage.prompt_tokens_details.cached_tokens says how many.")
@click.option("--ray", "use_ray", is_flag=True,
              help="Run on Ray Serve: replicas of this server, each with its own engine (docs/scaling.md; the [ray] extra).")
@click.option("--replicas", type=click.IntRange(min=1), default=None, help="With --ray: a fixed number of replicas [default: 1].")
@click.option("--autoscale", default=None, metavar="MIN:MAX", callback=_autoscale_range,
              help="With --ray: autoscale between MIN and MAX replicas (instead of --replicas).")
@click.option("--ray-address", default=None, metavar="ADDRESS",
              help="With --ray: join this Ray cluster (auto, HEAD_IP:6379, ray://...) instead of starting a local one.")
@click.option("--num-cpus", type=click.FloatRange(min=0, min_open=True), default=None,
              help="With --ray: CPUs per replica, fractions allowed; its ONNX Runtime threads follow (F rounded, at least 1) "
                   "unless --threads [default: 1].")
@friendly_errors
def serve(model, host, port, max_batch, max_queue, api_key, cors_origins, served_model_name, threads, precision, init,
          drain_timeout, draft, prefix_caching, use_ray, replicas, autoscale, ray_address, num_cpus):
    """Serve MODEL (a model directory or a name) over HTTP with OpenAI's completions API (docs/serving.md);
    with --ray, as replicas on a Ray cluster (docs/scaling.md)."""
    ray_only = {"--replicas": replicas, "--autoscale": autoscale, "--ray-address": ray_address, "--num-cpus": num_cpus}
    if use_ray and draft is not None:
        raise click.UsageError("--draft is not supported with --ray yet: serve the draft pair without --ray")
    if use_ray and not prefix_caching:
        raise click.UsageError("--no-prefix-caching is not supported with --ray yet: its replicas cache prefixes")
    if use_ray:
        raise SystemExit(_serve_on_ray(model, host=host, port=port, max_batch=max_batch, max_queue=max_queue,
                                       api_key=api_key, cors_origins=tuple(cors_origins),
                                       served_model_name=served_model_name, threads=threads, precision=precision,
                                       init=init, drain_timeout_s=drain_timeout, replicas=replicas, autoscale=autoscale,
                                       address=ray_address, num_cpus=num_cpus))
    given = [name for name, value in ray_only.items() if value is not None]
    if given:
        raise click.UsageError(f"{', '.join(given)} only apply with --ray")
    try:
        from server.run import serve as run_server
    except ImportError as e:
        raise click.ClickException(f"gpt2-engine serve needs the [serve] extra ({e}): {install_hint('serve')}") from None
    raise SystemExit(run_server(model, host=host, port=port, max_batch=max_batch, max_queue=max_queue, api_key=api_key,
                                cors_origins=tuple(cors_origins), served_model_name=served_model_name, threads=threads,
                                precision=precision, init=init, drain_timeout_s=drain_timeout,
                                draft=None if draft is None else str(draft), prefix_caching=prefix_caching))


if __name__ == "__main__":
    main()
