"""One command for a GPU machine: build TensorRT engines, run the GPU tests, time prefill and decode.

    python -m benchmarks.gpu_check --sizes gpt2 gpt2-medium [--work-dir artifacts/gpu-check]

Steps, each printed as it starts:
  1. conditions (machine, versions) and the TensorRT/pycuda/GPU probe -- without them: "skipped", exit 0
  2. per size: export an fp16 model directory (random weights unless --checkpoint-dir has the size),
     build its engine (engines/<key>.plan, reused when up to date; timing cache kept)
  3. `pytest -m gpu tests/test_trt_gpu.py` (parity with ORT fp32, in-place cache, engine lookup)
  4. per size: validate (prefill+decode == one forward, finite logits), then time prefill of
     --prompt tokens and --steps decode steps at batch 1: p50/p90/p99 ms in a table
A size whose validation fails is reported and not timed (parity before speed).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.conditions import collect_conditions, format_header
from benchmarks.stats import summarize_ms
from engine.config import SIZES
from engine.errors import BackendUnavailable, EngineError

ROOT = Path(__file__).resolve().parent.parent


def _probe() -> str | None:
    """Why this machine cannot run the TensorRT path, or None when it can."""
    try:
        from engine.backends.trt import _import_pycuda
        from engine.trt_build import gpu_identity, import_tensorrt
        trt = import_tensorrt()
        name, cc = gpu_identity()
        _import_pycuda()
    except BackendUnavailable as e:
        return str(e)
    print(f"TensorRT {trt.__version__} on {name} (sm {cc})", flush=True)
    return None


def _model_dir(size: str, work: Path, checkpoint_dir: Path | None) -> Path:
    from export.exporter import export_model
    out = work / f"{size}-fp16"
    if (out / "manifest.json").is_file():
        return out
    spec, init = size, "random"
    if checkpoint_dir is not None and (checkpoint_dir / size).is_dir():
        spec, init = str(checkpoint_dir / size), None
    print(f"  exporting {size} fp16 ({'random weights' if init else spec}) -> {out}", flush=True)
    return export_model(spec, out, precision="fp16", init=init, show_progress=False)


def _validate(backend, prompt_len: int) -> str | None:
    """Prefill of P tokens + 4 decode steps must equal one forward over P+4 tokens (fp16 tolerance)."""
    rng = np.random.default_rng(0)
    V = backend.config.vocab_size
    ids = rng.integers(0, V, (1, prompt_len + 4)).astype(np.int64)
    full = backend.forward(backend.new_cache(1, backend.fixed_capacity), ids, np.zeros(1, np.int64),
                           np.arange(prompt_len, prompt_len + 4)[None])
    cache = backend.new_cache(1, backend.fixed_capacity)
    backend.forward(cache, ids[:, :prompt_len], np.zeros(1, np.int64), np.array([[prompt_len - 1]]))
    stepped = np.concatenate([backend.forward(cache, ids[:, t:t + 1], np.array([t]), np.zeros((1, 1), np.int64))
                              for t in range(prompt_len, prompt_len + 4)], axis=1)
    if not np.isfinite(full).all():
        return "non-finite logits"
    err = float(np.abs(stepped - full).max())
    tol = 0.02 * float(full.std()) + 1e-3
    if err > tol or (stepped.argmax(-1) != full.argmax(-1)).any():
        return f"prefill+decode differs from one forward: max |diff| {err:.4g} > {tol:.4g}"
    return None


def _time(backend, prompt_len: int, steps: int, repeats: int) -> dict:
    V = backend.config.vocab_size
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, V, (1, prompt_len)).astype(np.int64)
    last = np.array([[prompt_len - 1]])
    prefill_s, decode_s = [], []
    for r in range(repeats + 1):  # the first round warms up (lazy allocations, clocks) and is dropped
        cache = backend.new_cache(1, backend.fixed_capacity)
        t0 = time.perf_counter()
        logits = backend.forward(cache, prompt, np.zeros(1, np.int64), last)
        t1 = time.perf_counter()
        tok, per_step = int(logits[0, -1].argmax()), []
        for s in range(steps):
            ts = time.perf_counter()
            logits = backend.forward(cache, np.array([[tok]]), np.array([prompt_len + s]), np.zeros((1, 1), np.int64))
            per_step.append(time.perf_counter() - ts)
            tok = int(logits[0, -1].argmax())
        if r:
            prefill_s.append(t1 - t0)
            decode_s += per_step
    return {"prefill": summarize_ms(prefill_s), "decode": summarize_ms(decode_s)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["gpt2"], choices=list(SIZES), help="model sizes")
    ap.add_argument("--work-dir", type=Path, default=ROOT / "artifacts" / "gpu-check")
    ap.add_argument("--checkpoint-dir", type=Path, default=None,
                    help="directory with one HF checkpoint per size name (else random weights)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-prompt", type=int, default=512)
    ap.add_argument("--capacity", type=int, default=1024)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens for the prefill timing")
    ap.add_argument("--steps", type=int, default=64, help="decode steps per timed round")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    ap.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu")
    args = ap.parse_args(argv)

    conditions = collect_conditions()
    print(format_header(conditions, {"sizes": " ".join(args.sizes), "engine": f"fp16, batch<={args.max_batch}, "
                                     f"prompt<={args.max_prompt}, capacity {args.capacity}"}), flush=True)
    why = _probe()
    if why is not None:
        print(f"skipped: {why}")
        return 0

    from engine.artifact import load_artifact
    from engine.backends.trt import TrtBackend
    from engine.trt_build import build_engine

    print("\n[build]", flush=True)
    dirs = {}
    for size in args.sizes:
        d = _model_dir(size, args.work_dir, args.checkpoint_dir)
        build_engine(d, args.max_batch, args.max_prompt, args.capacity, progress=lambda s: print("  " + s, flush=True))
        dirs[size] = d

    tests_rc = None
    if not args.skip_tests:
        print("\n[tests] pytest -m gpu tests/test_trt_gpu.py", flush=True)
        tests_rc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-ra",
                                   str(ROOT / "tests" / "test_trt_gpu.py")], cwd=ROOT).returncode

    print("\n[benchmark] batch 1, TensorRT fp16", flush=True)
    rows = []
    for size, d in dirs.items():
        backend = TrtBackend(load_artifact(d))
        try:
            problem = _validate(backend, min(args.prompt, args.max_prompt))
            if problem:
                rows.append((size, f"NOT TIMED: {problem}", "", ""))
                continue
            t = _time(backend, min(args.prompt, args.max_prompt), args.steps, args.repeats)
        except EngineError as e:
            rows.append((size, f"NOT TIMED: {e}", "", ""))
            continue
        finally:
            backend.close()
        p, dcd = t["prefill"], t["decode"]
        rows.append((size, f"{p['p50']:.2f} / {p['p90']:.2f} / {p['p99']:.2f}",
                     f"{dcd['p50']:.3f} / {dcd['p90']:.3f} / {dcd['p99']:.3f}", f"{1e3 / dcd['p50']:.0f}"))

    head = ("size", f"prefill {args.prompt} tok ms p50/p90/p99", "decode ms/token p50/p90/p99", "tokens/s")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(4)]
    print("\n" + " | ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    if tests_rc is not None:
        print(f"\npytest -m gpu: {'passed' if tests_rc == 0 else f'FAILED (exit {tests_rc})'}")
    failed = (tests_rc not in (None, 0)) or any(r[1].startswith("NOT TIMED") for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
