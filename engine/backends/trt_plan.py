"""Bookkeeping for the TensorRT backend: profiles, per-step shapes, buffer sizes, and finding and
validating a built engine file (the builder is export/trt_build.py). Everything but `import_tensorrt`,
`gpu_identity` and `find_engine` is pure and runs on CPU.

The engine has two optimization profiles, in this order (see export/trt_build.plan_profiles):
  0 prefill: seq 1..max_prompt new tokens, n_logits 1..max_prompt
  1 decode:  seq = 1, n_logits = 1 (the steady state of generation, tuned on its own)
Both cover batch 1..max_batch and one fixed cache capacity: TensorRT's KV-cache layer needs a static
sequence dimension, so an engine serves exactly one capacity.

Shapes are resolved from engine.artifact.io_spec (the graph I/O declared once as data), never from
name literals here.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np

from engine import artifact as io
from engine.artifact import Artifact, load_artifact
from engine.config import GPT2Config
from engine.errors import ArtifactError, BackendUnavailable, InputError, install_hint

PREFILL, DECODE = 0, 1
PROFILE_NAMES = ("prefill", "decode")

_ITEMSIZE = {"int64": 8, "float32": 4, "float16": 2}


def choose_profile(seq: int, n_logits: int) -> int:
    """Decode profile for the one-token, one-logit step; prefill for everything else."""
    return DECODE if seq == 1 and n_logits == 1 else PREFILL


def resolve_shape(shape: list, dims: dict[str, int]) -> tuple[int, ...]:
    """io_spec shape (ints and symbolic names) -> concrete shape, e.g. ['batch', 12, 'capacity', 64]."""
    return tuple(int(dims[d]) if isinstance(d, str) else int(d) for d in shape)


def step_shapes(config: GPT2Config, precision: str, batch: int, seq: int, n_logits: int,
                capacity: int) -> dict[str, tuple[int, ...]]:
    """Every graph input's shape for one step: what `set_input_shape` receives, by name."""
    dims = {"batch": batch, "seq": seq, "n_logits": n_logits, "capacity": capacity}
    return {t["name"]: resolve_shape(t["shape"], dims) for t in io.io_spec(config, precision)["inputs"]}


def output_shapes(config: GPT2Config, precision: str, batch: int, n_logits: int,
                  capacity: int) -> dict[str, tuple[int, ...]]:
    dims = {"batch": batch, "n_logits": n_logits, "capacity": capacity}
    return {t["name"]: resolve_shape(t["shape"], dims) for t in io.io_spec(config, precision)["outputs"]}


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * _ITEMSIZE[dtype]


def cache_buffer_nbytes(config: GPT2Config, precision: str, batch: int, capacity: int) -> dict[str, int]:
    """One device buffer per past input (its present output aliases it): name -> bytes."""
    dims = {"batch": batch, "capacity": capacity}
    out = {}
    pasts = {p for p, _ in io.cache_io_pairs(config.n_layer)}
    for t in io.io_spec(config, precision)["inputs"]:
        if t["name"] in pasts:
            out[t["name"]] = _nbytes(resolve_shape(t["shape"], dims), t["dtype"])  # (B, nh, S, hs)
    return out


def input_buffer_nbytes(config: GPT2Config, precision: str, max_batch: int, max_prompt: int) -> dict[str, int]:
    """The per-step inputs (ids, positions, logits indices) at their largest: allocated once."""
    dims = {"batch": max_batch, "seq": max_prompt, "n_logits": max_prompt}
    pasts = {p for p, _ in io.cache_io_pairs(config.n_layer)}
    return {t["name"]: _nbytes(resolve_shape(t["shape"], dims), t["dtype"])
            for t in io.io_spec(config, precision)["inputs"] if t["name"] not in pasts}


def logits_nbytes(config: GPT2Config, batch: int, n_logits: int) -> int:
    """float32 (B, K, V): sized per call, since K = all prompt positions (perplexity) is rare and large."""
    return batch * n_logits * config.vocab_size * _ITEMSIZE["float32"]


def check_step(input_ids: np.ndarray, cache_positions: np.ndarray, logits_indices: np.ndarray, *,
               cache_batch: int, capacity: int, max_batch: int, max_prompt: int) -> tuple[int, int, int]:
    """Validate one forward call against the engine's profiles and the cache; return (B, T, K)."""
    if input_ids.ndim != 2 or cache_positions.ndim != 1 or logits_indices.ndim != 2:
        raise InputError(f"expected input_ids (B, T), cache_positions (B,), logits_indices (B, K); got shapes "
                         f"{input_ids.shape}, {cache_positions.shape}, {logits_indices.shape}")
    B, T = input_ids.shape
    K = logits_indices.shape[1]
    if B != cache_batch or cache_positions.shape[0] != B or logits_indices.shape[0] != B:
        raise InputError(f"batch must match the cache's {cache_batch} rows, got input_ids {input_ids.shape}, "
                         f"cache_positions {cache_positions.shape}, logits_indices {logits_indices.shape}")
    if not 1 <= B <= max_batch:
        raise InputError(f"batch must be in [1, {max_batch}] for this engine, got {B}")
    if not 1 <= T <= max_prompt:
        raise InputError(f"new tokens per call must be in [1, {max_prompt}] for this engine, got {T}")
    if not 1 <= K <= max_prompt:
        raise InputError(f"logits per row must be in [1, {max_prompt}] for this engine, got {K}")
    if B and (cache_positions.min() < 0 or cache_positions.max() + T > capacity):
        raise InputError(f"cache_positions + new tokens must stay within the cache capacity {capacity}, got "
                         f"positions {cache_positions.min()}..{cache_positions.max()} with {T} new tokens")
    if B and (logits_indices.min() < 0 or logits_indices.max() >= T):
        raise InputError(f"logits_indices must be in [0, {T}), got {logits_indices.min()}..{logits_indices.max()}")
    return B, T, K


# ---------------------------------------------------------------------------------------------------
# Finding and validating a built engine (the builder, export/trt_build.py, writes them)
# ---------------------------------------------------------------------------------------------------

METADATA_FORMAT = 1
TRT_MIN_VERSION = (10, 15)   # first release whose parser maps TensorScatter to IKVCacheUpdateLayer

INSTALL_HINT = (
    "the TensorRT backend needs TensorRT >= 10.15 and pycuda with an NVIDIA GPU and driver: "
    "`pip install tensorrt-cu12 pycuda` (or tensorrt-cu13 for CUDA 13; the wheels fetch NVIDIA's libraries "
    f"from pypi.nvidia.com), or {install_hint('trt')}; or install TensorRT from NVIDIA's "
    "tar/deb packages and its Python wheel"
)


def onnx_identity(art: Artifact) -> str:
    """sha256 over the ONNX file(s): from the manifest when the exporter recorded it, else hashed now."""
    recorded = art.manifest.get("onnx_sha256")
    if isinstance(recorded, dict) and recorded:
        return hashlib.sha256(json.dumps(recorded, sort_keys=True).encode()).hexdigest()
    files = [art.model_path]
    extra = art.manifest.get("external_data_file")
    if extra:
        files.append(art.path / extra)
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def _describe(meta: dict) -> str:
    return f"TensorRT {meta.get('tensorrt_version')} on {meta.get('gpu_name')} (sm {meta.get('compute_capability')})"


def select_engine(artifact_dir: Path, metas: list[dict], trt_version: str, gpu_name: str,
                  compute_capability: str, precision: str, onnx_sha256: str | None = None,
                  capacity: int | None = None) -> dict:
    """The newest engine built by this TensorRT for this GPU (and these weights); else a fix-it error."""
    if not metas:
        raise ArtifactError(f"no TensorRT engine in {artifact_dir / io.ENGINES_DIR}: "
                            f"build one with `gpt2-engine build {artifact_dir}`")
    here = {"tensorrt_version": trt_version, "gpu_name": gpu_name, "compute_capability": compute_capability}
    newest_first = sorted(metas, key=lambda m: m.get("built_at", ""), reverse=True)
    same_target = [m for m in newest_first if all(m.get(k) == v for k, v in here.items())]
    if not same_target:
        m = newest_first[0]
        raise ArtifactError(f"{artifact_dir}: the engine was built for {_describe(m)}, this is {_describe(here)}: "
                            f"run `gpt2-engine build {artifact_dir}` again")
    fits = [m for m in same_target if m.get("precision") == precision
            and (onnx_sha256 is None or m.get("onnx_sha256") == onnx_sha256)
            and (capacity is None or m.get("capacity") == capacity)]
    if not fits:
        m = same_target[0]
        why = (f"precision {m.get('precision')} (artifact is {precision})" if m.get("precision") != precision else
               "an older model.onnx" if onnx_sha256 is not None and m.get("onnx_sha256") != onnx_sha256 else
               f"cache capacity {m.get('capacity')} (asked for {capacity})")
        raise ArtifactError(f"{artifact_dir}: the engine for {_describe(here)} was built from {why}: "
                            f"run `gpt2-engine build {artifact_dir}` again")
    return fits[0]


def read_engine_metadata(artifact_dir: Path) -> list[dict]:
    """Every engines/*.json whose plan file exists (a crashed build leaves neither behind)."""
    d = Path(artifact_dir) / io.ENGINES_DIR
    metas = []
    for f in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            meta = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(meta, dict) and meta.get("format") == METADATA_FORMAT and (d / meta.get("plan", "")).is_file():
            metas.append(meta)
    return metas


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".")[:2] if p.isdigit())


def import_tensorrt():
    """The tensorrt module, >= 10.15; else BackendUnavailable with install instructions."""
    try:
        import tensorrt as trt
    except Exception as e:  # noqa: BLE001 -- ImportError, or OSError from missing native libraries
        raise BackendUnavailable(f"TensorRT is not importable ({type(e).__name__}: {e}); {INSTALL_HINT}") from None
    if _version_tuple(trt.__version__) < TRT_MIN_VERSION:
        raise BackendUnavailable(f"TensorRT {trt.__version__} is too old: the KV-cache update (ONNX TensorScatter) "
                                 f"needs >= {'.'.join(map(str, TRT_MIN_VERSION))}; {INSTALL_HINT}")
    return trt


def gpu_identity(device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability 'major.minor') from pycuda, else from nvidia-smi."""
    try:
        import pycuda.driver as cuda
        cuda.init()
        dev = cuda.Device(device)
        major, minor = dev.compute_capability()
        return dev.name(), f"{major}.{minor}"
    except Exception:  # noqa: BLE001 -- pycuda missing or unbuildable: ask the driver's tool
        pass
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise BackendUnavailable(f"no NVIDIA GPU found (no pycuda device, no nvidia-smi); {INSTALL_HINT}")
    try:
        out = subprocess.run([exe, f"--id={device}", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.strip()
        name, cc = (s.strip() for s in out.splitlines()[0].rsplit(",", 1))
    except (OSError, subprocess.SubprocessError, IndexError, ValueError) as e:
        raise BackendUnavailable(f"cannot query GPU {device} with nvidia-smi ({e}); {INSTALL_HINT}") from None
    return name, cc


def find_engine(artifact_dir: str | Path, capacity: int | None = None) -> tuple[Path, dict]:
    """(plan path, metadata) of the engine for this TensorRT + GPU; a fix-it error when there is none.

    Never compiles: a missing or stale engine is rebuilt by `gpt2-engine build DIR`, a separate stage.
    """
    art = load_artifact(artifact_dir)
    trt = import_tensorrt()
    gpu_name, cc = gpu_identity()
    meta = select_engine(art.path, read_engine_metadata(art.path), trt.__version__, gpu_name, cc, art.precision,
                         onnx_identity(art), capacity)
    return art.path / io.ENGINES_DIR / meta["plan"], meta
