"""TensorRT backend on a GPU: engine build + lookup, the in-place cache, and parity with ORT fp32.

Marked `gpu`: collected everywhere, skipped with a reason when tensorrt, pycuda or a GPU is missing
(`pytest -m gpu` on a GPU machine, or `python -m benchmarks.gpu_check`). Engines are built for tiny
random models so the whole file runs in a few minutes; the 32-step greedy parity uses an init range of
0.1, where random GPT-2 output is diverse and the top-2 logit margin is far above fp16 error
(docs/ARCHITECTURE.md, "Tests: the oracle").
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def _require(modname: str, reason: str):
    try:
        return pytest.importorskip(modname, reason=reason, exc_type=ImportError)
    except OSError as e:  # the bindings wheel without NVIDIA's native libraries
        pytest.skip(f"{reason} ({e})", allow_module_level=True)


def _gpu_present() -> bool:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return False
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


_require("tensorrt", "TensorRT not installed (GPU machines: `pip install tensorrt-cu12`)")
_require("pycuda.driver", "pycuda not installed (GPU machines: `pip install pycuda`)")
if not _gpu_present():
    pytest.skip("no NVIDIA GPU: nvidia-smi is missing or lists no GPU", allow_module_level=True)

from engine import artifact as io  # noqa: E402
from engine.artifact import load_artifact  # noqa: E402
from engine.config import GPT2Config  # noqa: E402
from engine.errors import ArtifactError  # noqa: E402

TINY = GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=128, n_positions=64)
MAX_BATCH, MAX_PROMPT, CAPACITY = 4, 16, 64


def _write_artifact(out: Path, cfg: GPT2Config, weights: dict, precision: str) -> Path:
    """A model directory like the exporter's, for a config the size table does not name."""
    import onnx

    from export.checkpoint import sha256_file
    from export.graph import build_decoder_graph
    out.mkdir(parents=True)
    onnx.save_model(build_decoder_graph(cfg, weights, precision), str(out / io.MODEL_FILE))
    (out / io.TOKENIZER_FILE).write_text("{}")  # backend-level tests never tokenize
    manifest = {
        "format_version": io.FORMAT_VERSION, "config": cfg.to_dict(), "precision": precision,
        "opset": io.OPSET, "model_file": io.MODEL_FILE, "external_data_file": None,
        "onnx_sha256": {io.MODEL_FILE: sha256_file(out / io.MODEL_FILE)}, "tokenizer_file": io.TOKENIZER_FILE,
        "cache": {"max_capacity": cfg.n_positions, "dtype": "float16" if precision == "fp16" else "float32"},
        "io": io.io_spec(cfg, precision), "source": {"kind": "random", "name": "tiny", "seed": 0},
    }
    (out / io.MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from export.checkpoint import random_weights
    from export.trt_build import build_engine
    root = tmp_path_factory.mktemp("tiny")
    w = random_weights(TINY, seed=0, init_range=0.1)
    fp16 = _write_artifact(root / "fp16", TINY, w, "fp16")
    fp32 = _write_artifact(root / "fp32", TINY, w, "fp32")
    build_engine(fp16, max_batch=MAX_BATCH, max_prompt=MAX_PROMPT, capacity=CAPACITY, progress=None)
    return fp16, fp32


@pytest.fixture(scope="module")
def trt_backend(tiny_dirs):
    from engine.backends.trt import TrtBackend
    backend = TrtBackend(load_artifact(tiny_dirs[0]))
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def ort_backend(tiny_dirs):
    from engine.backends.ort import OrtBackend
    backend = OrtBackend(load_artifact(tiny_dirs[1]))
    yield backend
    backend.close()


def _greedy(backend, prompts: np.ndarray, steps: int) -> np.ndarray:
    """Prefill the (B, T) prompts, then `steps` one-token decode steps; the generated ids (B, steps)."""
    B, T = prompts.shape
    cache = backend.new_cache(B, CAPACITY)
    logits = backend.forward(cache, prompts, np.zeros(B, np.int64), np.full((B, 1), T - 1, np.int64))
    out = []
    for s in range(steps):
        nxt = logits[:, -1].argmax(-1).astype(np.int64)                                 # (B,)
        out.append(nxt)
        pos = np.full(B, T + s, np.int64)
        logits = backend.forward(cache, nxt[:, None], pos, np.zeros((B, 1), np.int64))
    return np.stack(out, axis=1)


def test_build_writes_plan_metadata_and_timing_cache(tiny_dirs):
    from engine.backends.trt_plan import find_engine
    from export.trt_build import build_engine
    fp16 = tiny_dirs[0]
    plan, meta = find_engine(fp16)
    assert plan.is_file() and (plan.parent / f"{meta['key']}.json").is_file()
    assert (fp16 / io.ENGINES_DIR / "timing.cache").is_file()
    assert meta["precision"] == "fp16" and meta["capacity"] == CAPACITY and len(meta["profiles"]) == 2
    again = build_engine(fp16, max_batch=MAX_BATCH, max_prompt=MAX_PROMPT, capacity=CAPACITY, progress=None)
    assert again == plan  # same inputs, same key: reused, not rebuilt


def test_engine_from_another_tensorrt_is_refused_with_a_fix(tiny_dirs, tmp_path):
    from engine.backends.trt_plan import find_engine
    copy = shutil.copytree(tiny_dirs[0], tmp_path / "copy")
    meta_file = next((copy / io.ENGINES_DIR).glob("*.json"))
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(meta | {"tensorrt_version": "0.0.0"}))
    with pytest.raises(ArtifactError, match=r"built for TensorRT 0\.0\.0 .* run `gpt2-engine build .*` again"):
        find_engine(copy)


def test_prefill_then_decode_equals_one_full_forward(trt_backend):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, TINY.vocab_size, (2, 12)).astype(np.int64)                  # (B, 12)
    full_cache = trt_backend.new_cache(2, CAPACITY)
    full = trt_backend.forward(full_cache, ids, np.zeros(2, np.int64), np.arange(8, 12)[None].repeat(2, 0))
    cache = trt_backend.new_cache(2, CAPACITY)
    trt_backend.forward(cache, ids[:, :8], np.zeros(2, np.int64), np.full((2, 1), 7, np.int64))
    steps = [trt_backend.forward(cache, ids[:, t:t + 1], np.full(2, t, np.int64), np.zeros((2, 1), np.int64))
             for t in range(8, 12)]
    stepped = np.concatenate(steps, axis=1)                                            # (B, 4, V)
    spread = float(full.std())
    np.testing.assert_allclose(stepped, full, atol=0.02 * spread + 1e-3)  # fp16 cache and matmuls


def test_greedy_tokens_match_ort_fp32_for_32_steps(trt_backend, ort_backend):
    rng = np.random.default_rng(2)
    prompts = rng.integers(0, TINY.vocab_size, (2, 8)).astype(np.int64)
    want = _greedy(ort_backend, prompts, 32)
    got = _greedy(trt_backend, prompts, 32)
    assert len(np.unique(want)) > 5, "degenerate reference: parity would prove little"
    np.testing.assert_array_equal(got, want)


def test_concurrent_requests_match_serial(trt_backend):
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, TINY.vocab_size, (1, 6)).astype(np.int64) for _ in range(4)]
    serial = [_greedy(trt_backend, p, 8) for p in prompts]
    results: list = [None] * len(prompts)

    def run(i):
        results[i] = _greedy(trt_backend, prompts[i], 8)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(results, serial):
        np.testing.assert_array_equal(a, b)


def test_generator_on_trt_matches_ort(tmp_path):
    """Through the public API (engine.generator, written separately): distilgpt2-sized random weights."""
    generator = pytest.importorskip("engine.generator", reason="engine/generator.py not written yet")
    from engine.sampling import SamplingParams
    from export.exporter import export_model
    from export.trt_build import build_engine
    fp16 = export_model("distilgpt2", tmp_path / "fp16", precision="fp16", init="random", init_range=0.1,
                        show_progress=False)
    fp32 = export_model("distilgpt2", tmp_path / "fp32", precision="fp32", init="random", init_range=0.1,
                        show_progress=False)
    build_engine(fp16, max_batch=2, max_prompt=64, capacity=128, progress=None)
    params = SamplingParams.greedy(max_new_tokens=32, stop_at_eos=False)
    trt = generator.Generator.from_pretrained(fp16, backend="trt")
    ort = generator.Generator.from_pretrained(fp32, backend="ort")
    try:
        got = trt.generate("The quick brown fox", params)
        want = ort.generate("The quick brown fox", params)
    finally:
        trt.close()
        ort.close()
    assert got.token_ids == want.token_ids
