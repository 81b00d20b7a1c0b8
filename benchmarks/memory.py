"""Memory figures of a bench run: this process's peak RSS per phase, its GPU memory, handing freed
memory back between runners so the next one's baseline is its own, and the yardsticks of a load: the
bytes of a runner's weight files and the time to read them from the page cache."""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from engine.backends.ort import PREPACKED_DIR

READ_CHUNK = 1 << 20  # what `cat` does: read() into one reused buffer
READ_REPEATS = 3


class PeakRss:
    """Peak resident memory of THIS PROCESS over a phase, MB (1e6 bytes).

    RSS is process-wide: it includes the interpreter, every imported library (torch alone is a few
    hundred MB once the reference has been computed) and whatever an earlier runner left behind.
    Runners are closed and garbage-collected before the next loads, and each record also stores the
    RSS just before its runner loaded (``extra.rss_baseline_mb``), so peak - baseline approximates
    the runner's own footprint. On Linux the kernel's high-water mark (VmHWM) is reset at each phase
    (/proc/self/clear_refs, "5"), so transient peaks between samples are caught; elsewhere the peak
    is the max of psutil samples taken between runs. The reset also resets what getrusage (and so
    `/usr/bin/time -v`) reports for the process: after a bench, those show the last phase's peak.
    """

    def __init__(self):
        self.proc = psutil.Process()
        self._hwm_ok = False
        self._samples: list[int] = []

    @staticmethod
    def _vmhwm() -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def rss_mb(self) -> float:
        return self.proc.memory_info().rss / 1e6

    def reset(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._hwm_ok = self._vmhwm() is not None
        except OSError:
            self._hwm_ok = False
        self._samples = [self.proc.memory_info().rss]

    def sample(self) -> None:
        self._samples.append(self.proc.memory_info().rss)

    def peak_mb(self) -> float:
        self.sample()
        peak = max(self._samples)
        if self._hwm_ok:
            peak = max(peak, self._vmhwm() or 0)
        return peak / 1e6


def gpu_memory_mb() -> float | None:
    """GPU memory this process holds (nvidia-smi, all GPUs), MB; None without a GPU."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    import subprocess
    try:
        out = subprocess.run([exe, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    total = 0.0
    for line in out.strip().splitlines():
        pid, _, mib = (s.strip() for s in line.partition(","))
        if pid == str(os.getpid()) and mib.replace(".", "", 1).isdigit():
            total += float(mib) * 2**20 / 1e6
    return total


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so the next runner's RSS baseline is not
    inflated by the previous one's freed-but-kept pages (measured: ~400 MB left behind by a closed
    ORT session without malloc_trim)."""
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim with
        pass


def weight_files(directory: str | Path) -> list[Path]:
    """The files that hold a runner's weights: an engine model directory's graph and external data
    (its manifest's model_file and external_data_file), else a checkpoint's or a converted model's
    weight files (*.safetensors, *.bin)."""
    d = Path(directory)
    manifest = d / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        return [d / f for f in (m.get("model_file"), m.get("external_data_file")) if f and (d / f).is_file()]
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))


def derived_files(directory: str | Path) -> list[Path]:
    """What a load may read instead of the weight files: ONNX Runtime's pre-packed model (prepacked/)."""
    d = Path(directory) / PREPACKED_DIR
    return sorted(p for p in d.iterdir() if p.is_file()) if d.is_dir() else []


def weight_bytes(files: Sequence[Path]) -> int:
    return sum(Path(f).stat().st_size for f in files)


def page_cache_read_s(files: Sequence[Path], repeats: int = READ_REPEATS) -> float:
    """Seconds to read ``files`` from the page cache (the yardstick of a load): one untimed read
    first (brings them into the cache), then the median of ``repeats`` timed reads of them all, each
    as `cat FILE > /dev/null` reads (read_files)."""
    read_files(files)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        read_files(files)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_files(files: Sequence[Path]) -> None:
    """Read ``files`` once (into the page cache), 1 MiB read() calls into one buffer."""
    view = memoryview(bytearray(READ_CHUNK))
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
