"""TensorRT engine build: model directory -> engines/<key>.plan + engines/<key>.json (a build stage).

An engine is tied to the TensorRT version, the GPU, the precision, the optimization profiles and the
exact ONNX bytes, so all of them go into the cache key and into the metadata file beside the plan.
Finding and validating a built engine is the runtime's job (engine/backends/trt_plan.py): loading a
model never compiles one.

Precision: the engine is built from the fp16 graph by default. TensorRT 11 removed BuilderFlag.FP16
and weak typing; the network is strongly typed (we ask for it on 10.x too: one path), so the graph's
own casts decide what runs in fp32 (LayerNorm, GELU, softmax, the residual stream). An fp32 artifact
would build into a plain fp32 engine that is several times slower; it is refused unless the caller
passes `allow_fp32=True` (useful to separate fp16 error from engine bugs when debugging parity).

The pure parts (profiles, cache key) run and are tested on CPU; everything that touches TensorRT
imports it lazily, so this module imports on machines without it.

Checked against (TensorRT Python API, 10.x and 11.x pages on docs.nvidia.com):
  Builder / create_network / NetworkDefinitionCreationFlag.STRONGLY_TYPED (deprecated + ignored in 11.0:
  strong typing is always on), OnnxParser.parse_from_file (resolves external data next to the file),
  IBuilderConfig.set_memory_pool_limit / create_timing_cache / set_timing_cache / get_timing_cache,
  create_optimization_profile + IOptimizationProfile.set_shape, build_serialized_network, ITensor.shape
  (settable on network inputs) and ITensor.is_shape_tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from engine import artifact as io
from engine.artifact import load_artifact
from engine.backends.trt_plan import DECODE, METADATA_FORMAT, PREFILL, PROFILE_NAMES, gpu_identity, import_tensorrt, onnx_identity
from engine.config import GPT2Config
from engine.errors import ArtifactError, EngineError, InputError

DEFAULT_WORKSPACE_BYTES = 4 << 30  # builder scratch for tactics; TensorRT uses less when it can
TIMING_CACHE_FILE = "timing.cache"  # default location: <dir>/engines/timing.cache

Progress = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def plan_profiles(config: GPT2Config, max_batch: int, max_prompt: int, capacity: int,
                  precision: str = "fp16", opt_batch: int = 1, opt_prompt: int | None = None) -> list[dict]:
    """min/opt/max shape of every graph input, for the prefill profile then the decode profile.

    prefill: batch 1..max_batch, seq 1..max_prompt, n_logits 1..max_prompt (opt 1: generation reads one)
    decode:  batch 1..max_batch, seq = 1, n_logits = 1
    Both: cache capacity fixed at `capacity` (the KV-cache layer needs a static sequence dimension).
    `opt_batch` defaults to 1: single-request latency is what generation feels; kernels stay valid to max.
    """
    if not 1 <= max_batch <= 4096:
        raise InputError(f"max_batch must be in [1, 4096], got {max_batch}")
    if not 1 <= capacity <= config.n_positions:
        raise InputError(f"capacity must be in [1, {config.n_positions}] (the model's context), got {capacity}")
    if not 1 <= max_prompt <= capacity:
        raise InputError(f"max_prompt must be in [1, capacity={capacity}], got {max_prompt}")
    if not 1 <= opt_batch <= max_batch:
        raise InputError(f"opt_batch must be in [1, max_batch={max_batch}], got {opt_batch}")
    opt_prompt = max(1, max_prompt // 2) if opt_prompt is None else opt_prompt
    if not 1 <= opt_prompt <= max_prompt:
        raise InputError(f"opt_prompt must be in [1, max_prompt={max_prompt}], got {opt_prompt}")

    # symbolic dim -> (min, opt, max), per profile
    ranges = {
        PREFILL: {"batch": (1, opt_batch, max_batch), "seq": (1, opt_prompt, max_prompt),
                  "n_logits": (1, 1, max_prompt), "capacity": (capacity,) * 3},
        DECODE: {"batch": (1, opt_batch, max_batch), "seq": (1, 1, 1),
                 "n_logits": (1, 1, 1), "capacity": (capacity,) * 3},
    }
    profiles = []
    for index in (PREFILL, DECODE):
        shapes = {}
        for t in io.io_spec(config, precision)["inputs"]:
            sel = {}
            for j, which in enumerate(("min", "opt", "max")):
                sel[which] = [ranges[index][d][j] if isinstance(d, str) else int(d) for d in t["shape"]]
            shapes[t["name"]] = sel
        profiles.append({"name": PROFILE_NAMES[index], "shapes": shapes})
    return profiles


def engine_cache_key(trt_version: str, gpu_name: str, compute_capability: str, precision: str,
                     profiles: list[dict], onnx_sha256: str) -> str:
    """A readable prefix plus a hash over a canonical JSON of every build input."""
    payload = json.dumps({"tensorrt": trt_version, "gpu": gpu_name, "sm": compute_capability,
                          "precision": precision, "profiles": profiles, "onnx_sha256": onnx_sha256},
                         sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(payload.encode()).hexdigest()[:16]
    sm = compute_capability.replace(".", "")
    return f"{precision}-sm{sm}-trt{trt_version}-{digest}"


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _strongly_typed_flags(trt) -> int:
    # 10.x: opt in. 11.x: the flag is deprecated and ignored (always strongly typed); guard its removal.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _parse(trt, network, logger, model_path: Path) -> None:
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so model.onnx.data is found next to model.onnx.
    if not parser.parse_from_file(str(model_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {model_path}: {errors}. Re-export with this gpt2-engine "
                          f"(`gpt2-engine export ... --precision fp16`) and check export/trt_support.py")


def _fix_cache_capacity(network, config: GPT2Config, capacity: int) -> None:
    """Make the cache inputs' sequence dim static: TensorRT's KV-cache layer requires it."""
    pasts = {p for p, _ in io.cache_io_pairs(config.n_layer)}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        if t.name in pasts:
            t.shape = (-1, config.n_head, capacity, config.head_dim)  # (B, nh, S, hs)
    shape_inputs = [network.get_input(i).name for i in range(network.num_inputs)
                    if network.get_input(i).is_shape_tensor]
    if shape_inputs:
        raise EngineError(f"graph inputs {shape_inputs} decide tensor shapes by their values (TensorRT shape "
                          "tensors); the engine's profiles cover shapes, not values. Re-export with a graph that "
                          "passes export/trt_support.check_graph_for_tensorrt")


def build_engine(artifact_dir: str | Path, max_batch: int = 8, max_prompt: int = 512, capacity: int | None = None,
                 timing_cache_path: str | Path | None = None, progress: Progress | None = _stderr,
                 allow_fp32: bool = False, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
                 force: bool = False) -> Path:
    """Build (or reuse) the engine for this directory, TensorRT and GPU; return the .plan path.

    Writes engines/<key>.plan and engines/<key>.json atomically, and keeps a timing cache (default
    engines/timing.cache) so rebuilds for other profiles reuse tactic timings.
    """
    say = progress or (lambda _line: None)
    art = load_artifact(artifact_dir)
    cfg = art.config
    if art.precision != "fp16" and not allow_fp32:
        raise ArtifactError(f"{art.path} is a {art.precision} export; TensorRT engines are built from the fp16 graph: "
                            f"export with `gpt2-engine export MODEL --precision fp16 --out DIR` "
                            "(fp32 engines only with allow_fp32=True, for debugging)")
    capacity = int(capacity or art.max_capacity)
    profiles = plan_profiles(cfg, max_batch, max_prompt, capacity, art.precision)

    t0 = time.perf_counter()
    say(f"[1/5] checking {art.model_path.name} against TensorRT's ONNX support")
    import onnx

    from export.trt_support import check_graph_for_tensorrt
    violations = check_graph_for_tensorrt(onnx.load(str(art.model_path), load_external_data=False))
    if violations:
        shown = "\n  ".join(violations[:10]) + ("" if len(violations) <= 10 else f"\n  ... {len(violations) - 10} more")
        raise ArtifactError(f"{art.model_path} has {len(violations)} construct(s) TensorRT rejects:\n  {shown}")

    trt = import_tensorrt()
    gpu_name, cc = gpu_identity()
    onnx_sha = onnx_identity(art)
    key = engine_cache_key(trt.__version__, gpu_name, cc, art.precision, profiles, onnx_sha)
    engines = art.path / io.ENGINES_DIR
    plan_path, meta_path = engines / f"{key}.plan", engines / f"{key}.json"
    if plan_path.is_file() and meta_path.is_file() and not force:
        say(f"engine {plan_path.name} is up to date (TensorRT {trt.__version__}, {gpu_name})")
        return plan_path

    say(f"[2/5] parsing with TensorRT {trt.__version__} (strongly typed network) for {gpu_name}, sm {cc}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_strongly_typed_flags(trt))
    _parse(trt, network, logger, art.model_path)
    _fix_cache_capacity(network, cfg, capacity)

    say(f"[3/5] configuring: profiles prefill (batch<={max_batch}, seq<={max_prompt}) and decode; "
        f"cache capacity {capacity}; workspace <= {workspace_bytes >> 20} MiB")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    tc_path = Path(timing_cache_path) if timing_cache_path else engines / TIMING_CACHE_FILE
    cached = tc_path.read_bytes() if tc_path.is_file() else b""
    timing_cache = config.create_timing_cache(cached)
    config.set_timing_cache(timing_cache, False)  # (cache, ignore_mismatch)
    for p in profiles:
        prof = builder.create_optimization_profile()
        for name, s in p["shapes"].items():
            prof.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(prof)

    say(f"[4/5] building (minutes for the large sizes; timing cache: {tc_path}"
        f"{', reused' if cached else ', new'})")
    t_build = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError("TensorRT failed to build the engine (see the TensorRT log above); "
                          "a smaller --max-batch/--max-prompt lowers the memory the builder needs")
    build_s = time.perf_counter() - t_build

    say(f"[5/5] writing {plan_path.name} ({serialized.nbytes / 2**20:.0f} MiB) and its metadata")
    write_atomic(tc_path, bytes(config.get_timing_cache().serialize()))
    write_atomic(plan_path, bytes(serialized))
    meta = {
        "format": METADATA_FORMAT, "key": key, "plan": plan_path.name,
        "tensorrt_version": trt.__version__, "gpu_name": gpu_name, "compute_capability": cc,
        "precision": art.precision, "max_batch": max_batch, "max_prompt": max_prompt, "capacity": capacity,
        "profiles": profiles, "onnx_sha256": onnx_sha,
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(build_s, 1), "total_seconds": round(time.perf_counter() - t0, 1),
    }
    write_atomic(meta_path, json.dumps(meta, indent=2).encode())
    say(f"built {plan_path} in {build_s:.0f} s")
    return plan_path
