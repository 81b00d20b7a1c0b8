"""The conditions a benchmark ran under: CPU, cores, RAM, GPU, OS, library versions, thread settings.

A latency number without its machine is meaningless, so every run prints these first and stores
them with the records. Collection never fails: a probe that cannot answer records None.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
from pathlib import Path

import psutil

# import name -> distribution name. The import is what matters (the TensorRT bindings wheel installs
# without its native libraries and then cannot be imported), the distribution says what was installed.
LIBRARIES: dict[str, str] = {
    "numpy": "numpy",
    "onnxruntime": "onnxruntime",
    "onnx": "onnx",
    "torch": "torch",
    "transformers": "transformers",
    "ctranslate2": "ctranslate2",
    "tensorrt": "tensorrt",
    "pycuda": "pycuda",
}
# Thread settings that change what BLAS/ORT/torch do; recorded when set.
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "CT2_INTRA_THREADS")


def _cpuinfo() -> tuple[str | None, int | None, list[str]]:
    """(model name, physical cores, SIMD flags of interest) from /proc/cpuinfo (Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, None, []
    model, flags, cores = None, set(), set()
    physical_id = "0"
    for line in text.splitlines():
        key, _, value = (s.strip() for s in line.partition(":"))
        if key == "model name" and model is None:
            model = value
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            cores.add((physical_id, value))
        elif key == "flags" and not flags:
            flags = set(value.split())
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags]
    return model, (len(cores) or None), simd


def _library_version(module: str, dist: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 -- any failure to import means "not usable here"
        try:
            installed = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None
        return f"{installed} (import failed: {type(e).__name__})"
    version = getattr(mod, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
    return str(version)


def gpus() -> str | None:
    """'NAME (driver D, M MiB)' per GPU, '; '-joined, from nvidia-smi; None without one."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = []
    for line in out.strip().splitlines():
        name, driver, mem = (s.strip() for s in (line.split(",") + ["?", "?"])[:3])
        found.append(f"{name} (driver {driver}, {mem} MiB)")
    return "; ".join(found) or None


def _numpy_blas() -> str | None:
    try:
        import numpy as np

        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas['name']} {blas['version']}"
    except Exception:  # noqa: BLE001 -- older numpy has no mode="dicts"; the field is informative only
        return None


def _git_commit() -> str | None:
    """The project's commit, so a result can be traced to the code that produced it."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{out}{'-dirty' if dirty else ''}" or None


def collect_conditions() -> dict:
    """Everything about this machine and environment that a timing depends on (JSON-serialisable)."""
    model, physical, simd = _cpuinfo()
    onnxruntime_providers = None
    try:
        import onnxruntime

        onnxruntime_providers = onnxruntime.get_available_providers()
    except Exception:  # noqa: BLE001 -- not installed or broken: the version field says which
        pass
    return {
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": model or platform.processor() or None,
        "cpu_simd": simd,
        "physical_cores": physical or psutil.cpu_count(logical=False),
        "logical_cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "gpu": gpus(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _library_version(name, dist) for name, dist in LIBRARIES.items()},
        "numpy_blas": _numpy_blas(),
        "onnxruntime_providers": onnxruntime_providers,
        "thread_env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
        # Other work on the machine skews every number (measured here: another process halved the
        # 2-thread bandwidth), so the load at the start is part of the conditions.
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "git_commit": _git_commit(),
    }


def format_header(conditions: dict, extra: dict | None = None) -> str:
    """A readable multi-line header: the machine, the software, then the run's own settings."""
    c = conditions
    cores = f"{c.get('physical_cores')} physical / {c.get('logical_cores')} logical cores"
    simd = ", ".join(c.get("cpu_simd") or []) or "no AVX2"
    versions = c.get("versions") or {}
    present = ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None)
    absent = ", ".join(k for k, v in versions.items() if v is None)
    rows = [
        ("cpu", f"{c.get('cpu')} ({cores}; {simd})"),
        ("ram", f"{c.get('ram_gb')} GB"),
        ("gpu", c.get("gpu") or "none"),
        ("os", c.get("os")),
        ("python", c.get("python")),
        ("libraries", present + (f"; not installed: {absent}" if absent else "")),
        ("numpy blas", c.get("numpy_blas")),
        ("ort providers", ", ".join(c.get("onnxruntime_providers") or []) or None),
        ("load avg 1m", c.get("load_avg_1m")),
        ("thread env", ", ".join(f"{k}={v}" for k, v in (c.get("thread_env") or {}).items()) or "unset"),
        ("commit", c.get("git_commit")),
        ("time (UTC)", c.get("time_utc")),
    ]
    rows += [(str(k), v) for k, v in (extra or {}).items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {'-' if v is None else v}" for k, v in rows)


def busy_warning(conditions: dict) -> str | None:
    """Other work on the machine at the start: every number below is then noisy, say so up front."""
    load, cores = conditions.get("load_avg_1m"), conditions.get("physical_cores") or 1
    if load is None or load < 0.5:
        return None
    return (f"the machine was busy before this run (load avg {load} on {cores} cores): other processes "
            "compete for the cores, so timings are noisy and slower than on an idle machine; torch (HF) "
            "suffers most (measured on a busy 2-core machine: ~4x slower per token at 2 threads than at 1)")
