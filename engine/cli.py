"""`gpt2-engine`: export, inspect, generate, bench, build.

Every EngineError becomes one line on stderr and exit code 1 (2 for usage errors, from click);
no traceback reaches the user for an error we anticipated.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from engine.errors import EngineError


def _friendly(fn):
    """Turn anticipated errors into one-line messages with a non-zero exit code."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EngineError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """GPT-2 inference: export checkpoints to ONNX, generate with ONNX Runtime or TensorRT, benchmark."""


@main.command()
@click.argument("model")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Model directory to create.")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="fp32 for ONNX Runtime CPU; fp16 for TensorRT / GPUs.")
@click.option("--init", type=click.Choice(["random"]), default=None,
              help="Random weights of the named size instead of a checkpoint (no download).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --init random.")
@click.option("--init-range", type=float, default=0.02, show_default=True, help="Std of random weights.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@_friendly
def export(model, out, precision, init, seed, init_range, force):
    """Export MODEL (a HF checkpoint directory or a name: gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2)."""
    from export.exporter import export_model
    path = export_model(model, out, precision=precision, init=init, seed=seed, init_range=init_range, force=force)
    click.echo(f"exported {model} ({precision}) to {path}")
    _print_info(path)


def _print_info(path: Path) -> None:
    from engine.artifact import load_artifact
    art = load_artifact(path)
    m = art.manifest
    cfg = art.config
    files = {p.name: p.stat().st_size for p in sorted(art.path.iterdir()) if p.is_file()}
    click.echo(f"  weights:    {art.label}")
    click.echo(f"  config:     {cfg.n_layer} layers, {cfg.n_embd} wide, {cfg.n_head} heads, "
               f"vocab {cfg.vocab_size}, context {cfg.n_positions}  # {cfg.n_params() / 1e6:.0f}M params")
    click.echo(f"  precision:  {m['precision']}, opset {m['opset']}, format v{m['format_version']}")
    click.echo(f"  cache:      {m['cache']['layout']} {m['cache']['dtype']}, capacity <= {m['cache']['max_capacity']}")
    click.echo(f"  inputs:     {', '.join(t['name'] for t in m['io']['inputs'][:3])}, + {len(m['io']['inputs']) - 3} cache")
    for name, size in files.items():
        click.echo(f"  {name:<18}{size / 1e6:10.1f} MB")
    engines = sorted((art.path / "engines").glob("*.json")) if (art.path / "engines").is_dir() else []
    for e in engines:
        meta = json.loads(e.read_text())
        click.echo(f"  engine:     {e.stem} (TensorRT {meta.get('trt_version')}, {meta.get('gpu_name')})")


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@_friendly
def inspect(directory, as_json):
    """Print what a model directory holds."""
    from engine.artifact import load_artifact
    if as_json:
        click.echo(json.dumps(load_artifact(directory).manifest, indent=2))
    else:
        click.echo(str(directory))
        _print_info(directory)


main.add_command(inspect, name="info")

if __name__ == "__main__":
    main()
