"""ONNX Runtime backend: CPU by default, the CUDA execution provider when asked for and present.

A KV cache (the engine's slot pool, or one per call in the bench's static loop) is allocated once and
bound through IO binding as both the `past` input and the `present` output of every layer (row views
of the pool get bindings of their own over the same memory, made once per row range), so the graph
(TensorScatter, or GroupQueryAttention in the "gqa" variant) writes the new keys/values in place: a
decode step copies neither the cache nor the weights, and only the requested logits come back to the host.

Thread safety: one InferenceSession is shared (ORT's `run` is thread-safe); each cache (and
view) owns its own IO binding, so calls on different caches never share mutable state.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import platform
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine import artifact as io
from engine.artifact import Artifact
from engine.backends.base import Segment
from engine.errors import ArtifactError, BackendUnavailable, InputError

_NP_DTYPE = {"float32": np.float32, "float16": np.float16}


MADV_COLLAPSE = getattr(mmap, "MADV_COLLAPSE", 25)  # Linux >= 6.1: back a range with huge pages now
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14: commit a range now


def lazy_zeros(shape: tuple[int, ...], dtype, commit: bool = False) -> np.ndarray:
    """A zeroed array of KV-cache rows (axis 0) whose memory is committed where it is written: an
    anonymous mmap in which row 0 gets 4 KB pages and rows 1.. ask for transparent huge pages.

    np.zeros asks for 2 MB huge pages on the whole of a large array (numpy's madvise), so a slot pool
    whose first row is written at a few positions per head commits 2 MB per head range: gpt2's 8-row
    pool after one short request +92 MB RSS (0.19x the weights), gpt2-xl ~0.8 GB. 4 KB pages
    everywhere commit only what is written, but cost batched long-context decode its TLB reach (gpt2,
    batch 8 at position ~900: 12-22% slower per step; batch 1 the same). The slot pool keeps its rows
    packed at [0, n), so a lone request always decodes in row 0 and pays only for what it writes; the
    rows that fill when several requests share the pool have huge pages, and row 0 is moved onto
    huge pages too (huge_pages_for_row0) the first time a forward runs two rows or more.

    commit: every row on huge pages, all committed now (a server's warm-up): rows that fill for the
    first time under load otherwise fault their memory in inside a forward (gpt2 on 2 cores, THP
    defrag "madvise": the first forward over 5 fresh rows took 513 ms, the same forward again 49 ms)."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    nbytes = max(count * dtype.itemsize, 1)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if commit:
        if hasattr(mmap, "MADV_HUGEPAGE"):
            buf.madvise(mmap.MADV_HUGEPAGE)
        try:
            buf.madvise(MADV_POPULATE_WRITE)     # Linux >= 5.14: fault every page in, contents untouched
        except (OSError, ValueError):
            np.frombuffer(buf, np.uint8)[::mmap.PAGESIZE] = 0   # a write per page does the same
    elif hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux
        split = _row0_bytes(shape, dtype, nbytes)
        buf.madvise(mmap.MADV_NOHUGEPAGE, 0, split)  # also where THP is "always", not just "madvise"
        if split < nbytes:
            buf.madvise(mmap.MADV_HUGEPAGE, split, nbytes - split)
    return np.frombuffer(buf, dtype, count).reshape(shape)  # the array keeps the mapping alive


def _row0_bytes(shape, dtype, nbytes: int) -> int:
    row = nbytes // shape[0] if shape and shape[0] else nbytes
    return min(-(-row // mmap.PAGESIZE) * mmap.PAGESIZE, nbytes)  # row 0, rounded up to a page


def huge_pages_for_row0(array: np.ndarray) -> bool:
    """Move row 0 of a lazy_zeros array onto transparent huge pages (MADV_COLLAPSE: allocate and copy
    now). False where the kernel cannot (older than 6.1, THP off): it then keeps 4 KB pages."""
    buf = array.base
    while buf is not None and not isinstance(buf, mmap.mmap):
        buf = getattr(buf, "base", None) if not isinstance(buf, memoryview) else buf.obj
    if buf is None or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    split = _row0_bytes(array.shape, array.dtype, len(buf))
    try:
        buf.madvise(mmap.MADV_HUGEPAGE, 0, split)
        buf.madvise(MADV_COLLAPSE, 0, split)
    except OSError:
        return False
    return True


@dataclass
class OrtCache:
    batch: int
    capacity: int
    buffers: list          # OrtValues, one per (layer, key|value), in cache_io_pairs order
    binding: object        # the IO binding with the cache already bound
    arrays: list           # numpy views of CPU buffers (None on CUDA): what tests inspect
    views: dict = field(default_factory=dict)  # (start, stop) -> OrtCache over those rows, made once
    root: OrtCache | None = None  # a view's whole cache (None: this is one)
    row0_huge: bool = False       # row 0 moved onto huge pages (lazy_zeros), on the root
    mixed: dict = field(default_factory=dict)  # (first rows, chunk rows) -> IO binding of both, made once


def release_freed_heap() -> None:
    """Hand the heap that loading freed back to the OS (glibc's malloc_trim; elsewhere nothing): the
    tokenizer's JSON parse and the session's graph transforms leave ~15-20 MB freed but still resident,
    4% of gpt2's weights."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# ---- the pre-packed model: ORT's own packed weights, saved once, memory-mapped by every later load -------
#
# Loading model.onnx makes ONNX Runtime pre-pack every weight matmul (MLAS's packed fp32 panels,
# MatMulNBits' int8 blocks) into the heap: the bulk of a CPU load's time, and a private copy per
# process. prepacked/<key>.onnx (+ .onnx.data) is the same graph as ORT optimizes it, saved with the
# packed weights in its external data (session.save_external_prepacked_constant_initializers); a load
# at ORT_DISABLE_ALL maps them from the file. Measured (ORT 1.32, 2 cores): session creation 22-30%
# faster (gpt2-medium fp32 1.42 -> 0.99 s, int8 0.45 -> 0.35 s), and the packed weights are page-cache
# pages shared by every process that loads the model (two gpt2-medium fp32 replicas: PSS 1.42 -> 0.77
# GB each). It costs disk (fp32 ~2.3x the weight file, int8 ~1.4x: it also keeps the originals:
# ORT 1.32 packs them again while loading and compares, which is why the load gains only 10-30%), so
# the exporter writes it on request (export_model(prepack=True)). The packed layouts belong to one
# ONNX Runtime version and CPU (MLAS picks kernels by ISA): <key> hashes both with the export's weight
# hashes, and a file made for another ORT, CPU or export (or beside a model.onnx / .data of another
# size) is ignored; one that fails to load falls back to model.onnx with a warning.
PREPACKED_DIR = "prepacked"
_CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
              "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")


def _cpu_signature() -> dict:
    """What MLAS's kernel choice depends on: the architecture and the SIMD flags it dispatches on."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {"machine": platform.machine(), "flags": sorted(flags & set(_CPU_FLAGS)) if flags else None}


def prepacked_key(artifact: Artifact) -> dict:
    """Everything a pre-packed model is tied to: ONNX Runtime's version, this CPU, the export."""
    import onnxruntime as ort
    return {"onnxruntime": ort.__version__, "cpu": _cpu_signature(),
            "onnx_sha256": artifact.manifest.get("onnx_sha256"), "precision": artifact.precision}


def _key_name(key: dict) -> str:
    return "ort-cpu-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def find_prepacked(artifact: Artifact) -> Path | None:
    """The pre-packed model made for this ORT, CPU and export, if the directory holds one (its json is
    written last: a crashed write leaves none)."""
    key = prepacked_key(artifact)
    d = artifact.path / PREPACKED_DIR
    meta_path = d / f"{_key_name(key)}.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("key") != key:
        return None
    files = [d / f for f in meta.get("files", [])]
    if not files or not all(f.is_file() for f in files):
        return None
    if meta.get("source_bytes") != _source_bytes(artifact):  # model.onnx / .data replaced or damaged
        return None
    return d / meta["model"]


def _source_bytes(artifact: Artifact) -> dict:
    files = [artifact.manifest.get("model_file"), artifact.manifest.get("external_data_file")]
    return {f: (artifact.path / f).stat().st_size if (artifact.path / f).is_file() else None for f in files if f}


def write_prepacked(artifact: Artifact, threads: int | None = None) -> Path:
    """Save the pre-packed model for this ORT and CPU under <dir>/prepacked (replacing others): what
    export_model(..., prepack=True) does for the CPU precisions. Returns the model file."""
    import onnxruntime as ort
    key = prepacked_key(artifact)
    name = _key_name(key)
    d = artifact.path / PREPACKED_DIR
    d.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=d))
    try:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # not the "hardware specific optimizations" warning: the key holds the CPU
        if threads:
            so.intra_op_num_threads = int(threads)
        so.optimized_model_filepath = str(tmp / f"{name}.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{name}.onnx.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        so.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        ort.InferenceSession(str(artifact.model_path), so, providers=["CPUExecutionProvider"])
        files = [f"{name}.onnx", f"{name}.onnx.data"]
        for f in list(d.iterdir()):  # one per directory: the other ORT versions' / CPUs' go
            if f.is_file() and f.name.startswith("ort-cpu-"):
                f.unlink()
        for f in files:
            os.replace(tmp / f, d / f)
        meta = {"key": key, "model": files[0], "files": files, "source_bytes": _source_bytes(artifact),
                "bytes": sum((d / f).stat().st_size for f in files)}
        (d / f"{name}.json").write_text(json.dumps(meta, indent=2))  # last: it makes the files valid
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return d / files[0]


def _check_io(session, artifact: Artifact) -> None:
    """The graph must have exactly the inputs/outputs that the manifest's config implies: the runtime
    binds by those names."""
    spec = io.io_spec(artifact.config, artifact.precision, io.has_chunk_segment(artifact.manifest))
    for kind, actual in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        declared = {t["name"] for t in spec[kind]}
        names = {t.name for t in actual}
        if declared != names:
            diff = sorted(declared ^ names)[0]
            raise ArtifactError(f"{artifact.path}: model.onnx and manifest.json disagree on graph {kind} "
                                f"(e.g. {diff!r}): the directory mixes two exports; re-run `gpt2-engine export`")


class OrtBackend:
    name = "ort"
    max_prompt = 0           # any prompt length in one forward
    fixed_capacity = None    # caches of any capacity up to the artifact's
    max_batch = None

    def __init__(self, artifact: Artifact, device: str = "cpu", threads: int | None = None,
                 optimized_model_path: str | None = None, prepacked: bool = True, spin_after_run: bool = True):
        """prepacked: on the CPU, load the pre-packed model saved with the export (find_prepacked) when
        there is one for this ONNX Runtime and CPU; False (or none): model.onnx. `self.model_file`
        says which was loaded. spin_after_run=False: the session's worker threads stop spinning when a
        run ends (session.force_spinning_stop), for sessions that take turns on the same cores: a
        target and its draft (gpt2-large fp32 + int8 draft, 2 cores, interleaved A/B: speculative decode
        0.60x -> 0.52x of the target alone; the target alone 0.98x with it, i.e. unchanged)."""
        import onnxruntime as ort

        self.artifact = artifact
        self.config = artifact.config
        self.device = device

        def options(level):
            so = ort.SessionOptions()
            so.graph_optimization_level = level
            if threads:
                so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
            if not spin_after_run:
                so.add_session_config_entry("session.force_spinning_stop", "1")
            if optimized_model_path:
                so.optimized_model_filepath = optimized_model_path
            return so
        so = options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        self.attention = artifact.manifest.get("attention")
        if device == "cuda" and self.attention == "gqa":
            # ORT's CUDA GroupQueryAttention takes fp16/bf16 only: an fp32 node would fall back to the
            # CPU and copy the whole cache across PCIe every step.
            raise ArtifactError(f"{artifact.path} was exported with attention 'gqa' (ONNX Runtime CPU); for "
                                "the CUDA execution provider re-export with `gpt2-engine export --attention fused`")
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailable("backend 'ort' with device 'cuda' needs onnxruntime-gpu and a CUDA GPU: "
                                         "`pip install onnxruntime-gpu` (and uninstall onnxruntime), or use device 'cpu'")
            providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
        elif device == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        self.session = None
        packed = find_prepacked(artifact) if prepacked and device == "cpu" and not optimized_model_path else None
        failed = None
        if packed is not None:
            try:  # already optimized: no graph transforms; the packed weights are mapped from the file
                self.session = ort.InferenceSession(str(packed), options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                                                    providers=providers)
                _check_io(self.session, artifact)
                self.model_file = packed
            except Exception as e:  # noqa: BLE001 -- a damaged cache is not a failed load
                self.session, failed = None, e
        if self.session is None:
            self._load_plain(ort, artifact, so, providers)  # raises what is wrong with the directory, if anything
            if failed is not None:  # only the cache was bad
                warnings.warn(f"{packed} cannot be loaded ({type(failed).__name__}: "
                              f"{str(failed).splitlines()[0][:200]}): loaded {artifact.model_path.name} instead; "
                              "re-run `gpt2-engine export` to rewrite it", RuntimeWarning, stacklevel=2)
        release_freed_heap()  # the last step of a load (the tokenizer is read before the backend)
        self._ort = ort
        self._cache_dtype = _NP_DTYPE[artifact.manifest["cache"]["dtype"]]
        self._pairs = io.cache_io_pairs(self.config.n_layer)
        # Graph version >= 5 (GroupQueryAttention): a chunk segment rides in the same forward.
        self.mixed_steps = io.has_chunk_segment(artifact.manifest) and device == "cpu"
        self._chunk_pairs = [(io.chunk_name(a), io.chunk_name(b)) for a, b in self._pairs]

    def _load_plain(self, ort, artifact: Artifact, so, providers) -> None:
        try:
            self.session = ort.InferenceSession(str(artifact.model_path), so, providers=providers)
        except Exception as e:  # ORT raises InvalidProtobuf, Fail, RuntimeException... for bad files
            files = artifact.model_path.name + (f" / {ext}" if (ext := artifact.manifest.get("external_data_file")) else "")
            raise ArtifactError(f"{artifact.path}: {files} cannot be loaded by ONNX Runtime ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200]}): the file is truncated or corrupt; re-run "
                                "`gpt2-engine export`") from None
        _check_io(self.session, artifact)
        self.model_file = artifact.model_path

    def new_cache(self, batch: int, capacity: int, commit: bool = False) -> OrtCache:
        cfg = self.config
        shape = (batch, cfg.n_head, capacity, cfg.head_dim)  # (B, nh, S, hs)
        if self.device == "cpu":
            # A slot pool costs memory only where rows are written, 4 KB at a time (lazy_zeros);
            # committed: all of it now, on huge pages (no page faults in the forwards that fill rows).
            cache = self._bind([lazy_zeros(shape, self._cache_dtype, commit) for _ in self._pairs], capacity)
            cache.row0_huge = commit
            return cache
        ovs = [self._ort.OrtValue.ortvalue_from_shape_and_type(shape, self._cache_dtype, "cuda", 0)
               for _ in self._pairs]
        return self._bind_ortvalues(ovs, [None] * len(ovs), batch, capacity)

    def _bind(self, arrays: list[np.ndarray], capacity: int) -> OrtCache:
        ovs = [self._ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]  # share memory with the arrays
        return self._bind_ortvalues(ovs, arrays, arrays[0].shape[0], capacity)

    def _bind_ortvalues(self, ovs: list, arrays: list, batch: int, capacity: int) -> OrtCache:
        binding = self.session.io_binding()
        self._bind_segment(binding, self._pairs, io.LOGITS, ovs)
        if self.mixed_steps:  # the chunk segment empty: its inputs are zero rows
            self._bind_empty_chunk(binding, capacity)
        return OrtCache(batch, capacity, ovs, binding, arrays)

    @staticmethod
    def _bind_segment(binding, pairs: list[tuple[str, str]], logits: str, ovs: list) -> None:
        binding.bind_output(logits, "cpu")  # bound first: the segment's first output (a rebind keeps its slot)
        for (past, present), ov in zip(pairs, ovs):
            binding.bind_ortvalue_input(past, ov)
            binding.bind_ortvalue_output(present, ov)  # same buffer: the graph writes in place

    def _bind_empty_chunk(self, binding, capacity: int) -> None:
        cfg = self.config
        empty = np.zeros((0, cfg.n_head, capacity, cfg.head_dim), self._cache_dtype)  # (0, nh, S, hs)
        self._bind_segment(binding, self._chunk_pairs, io.chunk_name(io.LOGITS),
                           [self._ort.OrtValue.ortvalue_from_numpy(empty) for _ in self._chunk_pairs])
        self._bind_inputs(binding, io.CHUNK, np.zeros((0, 1), np.int64), np.zeros(0, np.int64),
                          np.zeros((0, 1), np.int64))

    @staticmethod
    def _bind_inputs(binding, prefix: str, input_ids, cache_positions, logits_indices) -> None:
        binding.bind_cpu_input(prefix + io.INPUT_IDS, np.ascontiguousarray(input_ids, dtype=np.int64))             # (B, T)
        binding.bind_cpu_input(prefix + io.CACHE_POSITIONS, np.ascontiguousarray(cache_positions, dtype=np.int64))  # (B,)
        binding.bind_cpu_input(prefix + io.LOGITS_INDICES, np.ascontiguousarray(logits_indices, dtype=np.int64))    # (B, K)

    def view(self, cache: OrtCache, start: int, stop: int) -> OrtCache:
        """Rows [start, stop) of `cache` as a cache of their own, sharing its memory (a contiguous row
        range of a (B, nh, S, hs) buffer is itself a valid (stop - start)-row cache). Made once per range."""
        if start == 0 and stop == cache.batch:
            return cache
        if not 0 <= start < stop <= cache.batch:
            raise InputError(f"cache rows must satisfy 0 <= start < stop <= {cache.batch}, got [{start}, {stop})")
        if self.device != "cpu":
            raise BackendUnavailable("row views of a CUDA cache are not implemented: the in-flight engine runs "
                                     "ONNX Runtime on the CPU (device 'cpu')")
        v = cache.views.get((start, stop))
        if v is None:
            v = cache.views[(start, stop)] = self._bind([a[start:stop] for a in cache.arrays], cache.capacity)
            v.root = cache.root or cache
        return v

    def copy_row(self, cache: OrtCache, src: int, dst: int, length: int) -> None:
        """Copy row src's first `length` slots over row dst (the slot pool compacts its rows with it)."""
        for a in cache.arrays:
            a[dst, :, :length] = a[src, :, :length]                               # (nh, length, hs)

    def forward(self, cache: OrtCache, input_ids: np.ndarray, cache_positions: np.ndarray,
                logits_indices: np.ndarray) -> np.ndarray:
        B, T = input_ids.shape
        cache_positions = np.asarray(cache_positions, np.int64)                  # (B,)
        if B and int(np.max(cache_positions)) + T > cache.capacity:
            # Checked here, not left to the graph: GroupQueryAttention would write past the buffer.
            raise InputError(f"cache_positions + new tokens must stay within the cache capacity {cache.capacity}, "
                             f"got position {int(np.max(cache_positions))} with {T} new tokens")
        if self.attention == "gqa" and B > 1 and T > 1 and np.any(cache_positions):
            logits_indices = np.asarray(logits_indices)
            if self.mixed_steps:  # GroupQueryAttention takes row 0, the chunk segment the rest
                first, rest = self.forward_mixed(cache, Segment(0, 1, input_ids[:1], cache_positions[:1], logits_indices[:1]),
                                                 Segment(1, B, input_ids[1:], cache_positions[1:], logits_indices[1:]))
                return np.concatenate([first, rest])
            return self._forward_token_by_token(cache, input_ids, cache_positions, logits_indices)
        return self._run(cache, input_ids, cache_positions, logits_indices)

    def forward_mixed(self, cache: OrtCache, first: Segment, chunk: Segment) -> tuple[np.ndarray, np.ndarray]:
        """Both segments in one run: the first segment's rows through GroupQueryAttention, the chunk
        segment's through the graph's elementary-ops attention; every matmul reads its weights once
        for all of their tokens. Each segment's past and present are bound to its own rows of `cache`."""
        if not self.mixed_steps:
            raise BackendUnavailable(f"{self.artifact.path} has no chunk segment (exported before graph version 5, "
                                     "or not for ONNX Runtime CPU): re-run `gpt2-engine export` for mixed steps")
        for seg in (first, chunk):
            if not 0 <= seg.start < seg.stop <= cache.batch:
                raise InputError(f"segment rows must satisfy 0 <= start < stop <= {cache.batch}, "
                                 f"got [{seg.start}, {seg.stop})")
            if seg.input_ids.shape[0] != seg.stop - seg.start:
                raise InputError(f"a segment of rows [{seg.start}, {seg.stop}) needs {seg.stop - seg.start} rows of "
                                 f"input ids, got {seg.input_ids.shape[0]}")
            if int(np.max(seg.cache_positions)) + seg.input_ids.shape[1] > cache.capacity:
                raise InputError(f"cache_positions + new tokens must stay within the cache capacity {cache.capacity}")
        if first.stop > chunk.start and chunk.stop > first.start:
            raise InputError(f"the segments' rows overlap: [{first.start}, {first.stop}) and [{chunk.start}, {chunk.stop})")
        key = (first.start, first.stop, chunk.start, chunk.stop)
        binding = cache.mixed.get(key)
        if binding is None:
            binding = cache.mixed[key] = self.session.io_binding()
            self._bind_segment(binding, self._pairs, io.LOGITS, self._row_values(cache, first.start, first.stop))
            self._bind_segment(binding, self._chunk_pairs, io.chunk_name(io.LOGITS),
                               self._row_values(cache, chunk.start, chunk.stop))
        self._huge_pages_once(cache)
        self._bind_inputs(binding, "", first.input_ids, first.cache_positions, first.logits_indices)
        self._bind_inputs(binding, io.CHUNK, chunk.input_ids, chunk.cache_positions, chunk.logits_indices)
        binding.bind_output(io.LOGITS, "cpu")
        binding.bind_output(io.chunk_name(io.LOGITS), "cpu")
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return outs[0].numpy(), outs[1 + len(self._pairs)].numpy()  # (B, K, V), (Bc, Kc, V)

    def _row_values(self, cache: OrtCache, start: int, stop: int) -> list:
        """OrtValues over rows [start, stop) of every layer's buffer (the view's, made once)."""
        return self.view(cache, start, stop).buffers

    def _forward_token_by_token(self, cache: OrtCache, input_ids: np.ndarray, cache_positions: np.ndarray,
                                logits_indices: np.ndarray) -> np.ndarray:
        """Several new tokens on top of a filled cache with batch > 1, which ORT's GroupQueryAttention
        refuses (it takes either a first prompt or a batch of 1): one single-token step per position,
        keeping the logits that were asked for. Only chunked prefill of a batch comes here."""
        B, T = input_ids.shape
        out = None
        zero = np.zeros((B, 1), np.int64)
        for t in range(T):
            step = self._run(cache, input_ids[:, t:t + 1], cache_positions + t, zero)[:, 0]  # (B, V)
            if out is None:
                out = np.empty(logits_indices.shape + step.shape[-1:], step.dtype)          # (B, K, V)
            rows, ks = np.nonzero(logits_indices == t)
            out[rows, ks] = step[rows]
        return out

    def _run(self, cache: OrtCache, input_ids: np.ndarray, cache_positions: np.ndarray,
             logits_indices: np.ndarray) -> np.ndarray:
        if input_ids.shape[0] > 1:
            self._huge_pages_once(cache)
        b = cache.binding
        self._bind_inputs(b, "", input_ids, cache_positions, logits_indices)
        b.bind_output(io.LOGITS, "cpu")  # rebind: ORT allocates logits of this step's shape
        self.session.run_with_iobinding(b)
        return b.get_outputs()[0].numpy()  # only the logits cross to the host                     # (B, K, V)

    @staticmethod
    def _huge_pages_once(cache: OrtCache) -> None:
        """Rows share the pool now: row 0 joins the others on huge pages (lazy_zeros), once."""
        root = cache.root or cache
        if not root.row0_huge and root.arrays and root.arrays[0] is not None:
            root.row0_huge = True
            for a in root.arrays:
                huge_pages_for_row0(a)

    def close(self) -> None:
        self.session = None
