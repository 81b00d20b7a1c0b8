"""Checkpoint -> model directory (manifest.json, model.onnx + model.onnx.data, tokenizer.json).

Everything is written into a temporary sibling directory and moved into place only when complete,
so a failure never leaves a half-written model directory behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import onnx
from tqdm import tqdm

from engine import artifact as io
from engine.config import SIZES, canonical_size_name
from engine.errors import CheckpointError, EngineError
from export.checkpoint import Checkpoint, random_checkpoint, resolve_checkpoint, sha256_file
from export.graph import build_decoder_graph, resolve_attention
from export.quantize import quantization_info
from export.tokenizer import tokenizer_for_checkpoint

# Every size keeps its weights in model.onnx.data beside a small model.onnx (the graph), each weight at
# a page-aligned offset: ONNX Runtime memory-maps them instead of parsing them out of the protobuf into
# the heap, and unmaps each one it pre-packs, so a loaded model holds its weights about once (gpt2 fp32,
# RSS growth over load + first generate: 1.97x the weight bytes inside model.onnx, ~1.0x external). It
# is also what protobuf's 2 GB limit asks of gpt2-large and gpt2-xl.
EXTERNAL_DATA_FILE = "model.onnx.data"


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("gpt2-engine")
    except Exception:  # running from a source tree that was never installed
        return "0+unknown"


def _prepare_out(out: Path, force: bool) -> tuple[Path, Path | None]:
    """Fail early, before minutes of work, if --out cannot be written.

    Returns the temp directory and the topmost parent directory this call created (removed again if
    the export fails, so a failure leaves nothing behind)."""
    if out.exists() and not out.is_dir():
        raise EngineError(f"--out {out} is a file: choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise EngineError(f"--out {out} exists and is not empty: choose another path or pass --force to replace it")
    parent = out.resolve().parent
    created = next((p for p in reversed([parent, *parent.parents]) if not p.exists()), None)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent)), created
    except OSError as e:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise EngineError(f"cannot write to {parent} ({e.strerror}): choose a writable --out") from None


def export_model(spec: str, out: str | Path, precision: str = "fp32", init: str | None = None, seed: int = 0,
                 init_range: float = 0.02, force: bool = False, show_progress: bool = True,
                 attention: str | None = None, prepack: bool = False) -> Path:
    """Export `spec` (directory or model name; with init='random' a size name) into the directory `out`.

    prepack: for the CPU precisions (fp32, int8) also save ONNX Runtime's pre-packed model for this
    ORT and CPU under prepacked/ (engine.backends.ort.write_prepacked): loads map its packed weights
    from the file, so replicas on one machine share them through the page cache, and load 10-30%
    faster; it costs 1.4x (int8) to 2.3x (fp32) the weight file in disk, hence opt-in."""
    if precision not in io.PRECISIONS:
        raise EngineError(f"--precision must be one of {', '.join(io.PRECISIONS)}, got {precision!r}")
    if init not in (None, "random"):
        raise EngineError(f"--init must be 'random' (or omitted for real weights), got {init!r}")
    if init == "random" and not (isinstance(init_range, (int, float)) and math.isfinite(init_range) and init_range > 0):
        raise EngineError(f"--init-range (the std of the random weights) must be a number > 0, got {init_range!r}")
    if prepack and precision == "fp16":
        raise EngineError("--prepack is for the ONNX Runtime CPU precisions (fp32, int8); fp16 is for TensorRT / GPUs")
    requested_attention = attention
    try:
        attention = resolve_attention(precision, attention)
    except ValueError as e:
        raise EngineError(str(e)) from None
    out = Path(out)
    tmp, created_parent = _prepare_out(out, force)
    show_progress = show_progress and sys.stderr.isatty()  # no bar frames in logs
    size = _bar_size() if show_progress else {}
    t0 = time.perf_counter()
    try:
        with tqdm(total=4, desc="export", unit="step", disable=not show_progress, leave=False, **size) as bar:
            bar.set_postfix_str("random weights" if init == "random" else "loading weights")
            ckpt = _checkpoint(spec, init, seed, init_range, disable=not show_progress, leave=False, **size)
            cfg = ckpt.config
            attention = _attention_for(cfg, attention, requested_attention)
            bar.update(1)
            with tqdm(total=cfg.n_layer, desc="  graph", unit="layer", disable=not show_progress, leave=False,
                      **size) as layers:
                # Every weight streams straight to model.onnx.data as its layer is built (int8 quantized
                # one weight at a time on the way): peak memory stays at about the checkpoint's size.
                model = build_decoder_graph(cfg, ckpt.weights, precision, attention, progress=layers.update,
                                            external_data=tmp / EXTERNAL_DATA_FILE)
            del ckpt.weights
            bar.update(1)
            bar.set_postfix_str("writing model.onnx")
            onnx.save_model(model, str(tmp / io.MODEL_FILE))  # the graph: its weights are in model.onnx.data already
            del model
            bar.update(1)
            bar.set_postfix_str("tokenizer + manifest")
            tokenizer_for_checkpoint(ckpt.directory).save(str(tmp / io.TOKENIZER_FILE))
            files = [io.MODEL_FILE, EXTERNAL_DATA_FILE]
            manifest = {
                "format_version": io.FORMAT_VERSION,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "gpt2_engine_version": _version(),
                "config": cfg.to_dict(),
                "precision": precision,
                "quantization": quantization_info() if precision == "int8" else None,
                "opset": io.OPSET,
                "graph_version": io.GRAPH_VERSION,
                "attention": attention,
                "model_file": io.MODEL_FILE,
                "external_data_file": EXTERNAL_DATA_FILE,
                "onnx_sha256": {f: sha256_file(tmp / f) for f in files},
                "tokenizer_file": io.TOKENIZER_FILE,
                "cache": {"max_capacity": cfg.n_positions, "dtype": "float16" if precision == "fp16" else "float32",
                          "layout": "(batch, n_head, capacity, head_dim)", "padding": "right"},
                "io": io.io_spec(cfg, precision, chunk_segment=attention == "gqa"),
                "source": ckpt.source,
                "export_seconds": round(time.perf_counter() - t0, 2),
            }
            (tmp / io.MANIFEST).write_text(json.dumps(manifest, indent=2))
            bar.update(1)
            if prepack:
                bar.set_postfix_str("ONNX Runtime's pre-packed model")
                _write_prepacked(tmp)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_parent is not None:
            shutil.rmtree(created_parent, ignore_errors=True)
        raise
    return out


def _bar_size() -> dict:
    """{} (tqdm follows the terminal), or 80 x 24 where the terminal reports 0 x 0: a pseudo-terminal nobody
    sized (`script`, editors' and agents' shells) says so, and tqdm then prints nothing at all."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError):
        return {"ncols": 80, "nrows": 24}
    return {} if size.columns > 0 and size.lines > 0 else {"ncols": size.columns or 80, "nrows": size.lines or 24}


def _attention_for(cfg, attention: str, requested: str | None) -> str:
    """ONNX Runtime's GroupQueryAttention takes head sizes that are multiples of 8 only (every GPT-2 size:
    64); a fine-tune with another (sshleifer/tiny-gpt2: 1) gets the standard ONNX Attention by default."""
    if attention != "gqa" or cfg.head_dim % 8 == 0:
        return attention
    if requested == "gqa":
        raise EngineError(f"--attention gqa needs a head size that is a multiple of 8 (ONNX Runtime's "
                          f"GroupQueryAttention); this model's is {cfg.head_dim}: use --attention fused")
    return "fused"


def _checkpoint(spec: str, init: str | None, seed: int, init_range: float, **bar) -> Checkpoint:
    """The weights to export. Random ones take a while for the big sizes (gpt2-xl: 1.5 billion draws): a
    bar over the layers, as the graph's."""
    if init != "random":
        return resolve_checkpoint(spec)
    size = canonical_size_name(spec)
    with tqdm(total=SIZES[size].n_layer if size else None, desc="  weights", unit="layer", **bar) as layers:
        return random_checkpoint(spec, seed, init_range, progress=layers.update)


def _write_prepacked(directory: Path) -> None:
    """The pre-packed model is a load-time cache: an export without it is complete (it loads model.onnx)."""
    from engine.backends.ort import write_prepacked
    try:
        write_prepacked(io.load_artifact(directory))
    except Exception as e:  # noqa: BLE001
        print(f"note: ONNX Runtime's pre-packed model was not saved ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:200] if str(e) else ''}); loads will pack the weights", file=sys.stderr)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Replace `out` with the finished directory; the old one is removed only after the swap."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{int(time.time())}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["export_model", "CheckpointError"]
