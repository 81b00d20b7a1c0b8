"""TensorRT backend: one prebuilt engine (engines/<key>.plan), pycuda for memory, name-based I/O only.

Per step: pick the profile (decode for one token and one logit, prefill otherwise), set every input's
shape, copy the three small int64 inputs from pinned host memory, bind each layer's KV buffer as both
`past_key_values.{i}.*` and `present.{i}.*` (TensorRT's KV-cache layer updates it in place and requires
one address for both), `execute_async_v3` on our own stream, copy the float32 logits back, synchronize.
A decode step copies neither weights nor cache; only (B, K, vocab) logits cross to the host.

Memory: a KV cache is device memory owned by one request, allocated once in `new_cache` (zeroed, so
unwritten slots hold finite values for the masked attention) at the engine's fixed capacity. Input
buffers are allocated once at the engine's largest shapes; the logits buffers grow on demand (a
perplexity call asks for every position, generation for one).

Thread safety: a TensorRT execution context is not thread-safe, so one context is shared under a lock
held for a whole step. Requests on different caches may call `forward` from several threads; their
steps run one at a time on the GPU, which a single GPU does anyway for these kernel sizes. A pool of
contexts would let steps overlap at the cost of activation memory per context: measure first.

CUDA context: pycuda's primary context (`pycuda.autoprimaryctx`), the one the CUDA runtime and
TensorRT use, pushed around every pycuda call because the context stack is per thread. `close()` (or
interpreter exit) frees buffers and drops the TensorRT context, engine and runtime *before* the pycuda
context is released (we keep our own reference to the retained primary context, so that order holds
whichever atexit hook, pycuda's or ours, runs first).

Checked against the TensorRT Python API (ICudaEngine / IExecutionContext pages, 10.x and 11.x) and the
bindings' source: Runtime.deserialize_cuda_engine, ICudaEngine.num_io_tensors / get_tensor_name /
get_tensor_mode / get_tensor_dtype / get_tensor_location / get_aliased_input_tensor (11.x),
create_execution_context, IExecutionContext.set_optimization_profile_async(profile_index, stream_handle),
set_input_shape(name, shape), set_tensor_address(name, int), execute_async_v3(stream_handle).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine import artifact as io
from engine.artifact import Artifact
from engine.backends.trt_plan import (
    INSTALL_HINT,
    cache_buffer_nbytes,
    check_step,
    choose_profile,
    find_engine,
    import_tensorrt,
    input_buffer_nbytes,
    logits_nbytes,
    read_engine_metadata,
    step_shapes,
)
from engine.errors import BackendUnavailable, EngineError, InputError

_STEP_INPUTS = (io.INPUT_IDS, io.CACHE_POSITIONS, io.LOGITS_INDICES)  # small int64 inputs, staged per step


def _import_pycuda():
    try:
        import pycuda.autoprimaryctx  # noqa: F401 -- retains + pushes the device's primary context
        import pycuda.driver as cuda
    except Exception as e:  # noqa: BLE001 -- ImportError, or a CUDA init error without a GPU/driver
        raise BackendUnavailable(f"pycuda is not usable ({type(e).__name__}: {e}); {INSTALL_HINT}") from None
    import pycuda.autoprimaryctx as primary
    return cuda, primary.context


@dataclass(eq=False)
class TrtCache:
    """One request's KV cache: a device buffer per layer key/value, (B, nh, S, hs) each."""
    batch: int
    capacity: int
    buffers: dict = field(repr=False)   # past input name -> pycuda DeviceAllocation (present aliases it)
    row_bytes: int = 0                  # bytes of one row of one buffer: nh * S * hs * itemsize
    first_row: int = 0                  # a view (`TrtBackend.view`) starts here in its parent's buffers
    is_view: bool = False               # views never free the parent's memory

    def ptr(self, past_name: str) -> int:
        return int(self.buffers[past_name]) + self.first_row * self.row_bytes

    def free(self) -> None:
        if not self.is_view:
            for buf in self.buffers.values():
                buf.free()  # pycuda activates the allocation's own context for the free
        self.buffers = {}


class _Gpu:
    """Everything tied to the CUDA context, released in a fixed order by `close`."""

    def __init__(self, cuda, cuda_ctx):
        self.cuda, self.ctx = cuda, cuda_ctx
        self.runtime = self.engine = self.context = self.stream = None
        self.dev_inputs: dict = {}       # name -> DeviceAllocation at the largest shape
        self.host_inputs: dict = {}      # name -> pinned int64 staging array
        self.logits_dev = self.logits_host = None
        self.caches: weakref.WeakSet = weakref.WeakSet()
        self.lock = threading.Lock()
        self.closed = False

    def push(self) -> None:
        self.ctx.push()

    def pop(self) -> None:
        self.cuda.Context.pop()

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.push()
            try:
                if self.stream is not None:
                    self.stream.synchronize()
                for c in list(self.caches):
                    c.free()
                for buf in list(self.dev_inputs.values()) + ([self.logits_dev] if self.logits_dev else []):
                    buf.free()
                self.dev_inputs, self.host_inputs = {}, {}
                self.logits_dev = self.logits_host = None
                # TensorRT objects go before the stream and long before the pycuda context.
                self.context = None
                self.engine = None
                self.runtime = None
                self.stream = None
            finally:
                self.pop()


class TrtBackend:
    name = "trt"
    mixed_steps = False  # the fp16 graph has one segment: the engine loop runs prompt chunks as their own forwards

    def __init__(self, artifact: Artifact, engine_path: str | Path | None = None):
        trt = import_tensorrt()
        cuda, cuda_ctx = _import_pycuda()
        self.artifact, self.config, self.precision = artifact, artifact.config, artifact.precision
        self._trt, self._cuda = trt, cuda
        self._pairs = io.cache_io_pairs(self.config.n_layer)

        if engine_path is None:
            plan_path, meta = find_engine(artifact.path)
        else:
            plan_path = Path(engine_path)
            meta = next((m for m in read_engine_metadata(artifact.path) if m.get("plan") == plan_path.name), None)
            if meta is None:
                raise EngineError(f"{plan_path} has no metadata file beside it: rebuild with "
                                  f"`gpt2-engine build {artifact.path}`")
        self.plan_path, self.meta = plan_path, meta
        self.max_batch, self.max_prompt = int(meta["max_batch"]), int(meta["max_prompt"])
        self.fixed_capacity = int(meta["capacity"])  # the engine's static cache length

        g = self._gpu = _Gpu(cuda, cuda_ctx)
        weakref.finalize(self, g.close)  # on garbage collection or at exit, if close() was never called
        g.push()
        try:
            logger = trt.Logger(trt.Logger.WARNING)
            g.runtime = trt.Runtime(logger)
            g.engine = g.runtime.deserialize_cuda_engine(plan_path.read_bytes())
            if g.engine is None:
                raise EngineError(f"TensorRT could not load {plan_path} (see its log above): run "
                                  f"`gpt2-engine build {artifact.path}` again")
            self._check_io(g.engine)
            g.context = g.engine.create_execution_context()
            if g.context is None:
                raise EngineError("TensorRT could not create an execution context (GPU out of memory?)")
            g.stream = cuda.Stream()
            self._on_host = {n for n in _STEP_INPUTS if g.engine.get_tensor_location(n) == trt.TensorLocation.HOST}
            for name, nbytes in input_buffer_nbytes(self.config, self.precision, self.max_batch,
                                                    self.max_prompt).items():
                g.host_inputs[name] = cuda.pagelocked_empty(nbytes // 8, np.int64)
                g.dev_inputs[name] = cuda.mem_alloc(nbytes)
            self._profile = -1
        except BaseException:
            g.pop()
            g.close()
            raise
        g.pop()

    def _check_io(self, engine) -> None:
        """The engine's I/O must be the manifest's: same names, directions, dtypes, and cache aliasing."""
        trt = self._trt
        dtypes = {"int64": trt.int64, "float16": trt.float16, "float32": trt.float32}
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        spec = io.io_spec(self.config, self.precision)
        for mode, tensors in ((trt.TensorIOMode.INPUT, spec["inputs"]), (trt.TensorIOMode.OUTPUT, spec["outputs"])):
            for t in tensors:
                if t["name"] not in names or engine.get_tensor_mode(t["name"]) != mode \
                        or engine.get_tensor_dtype(t["name"]) != dtypes[t["dtype"]]:
                    raise EngineError(f"{self.plan_path.name} does not match {self.artifact.path}'s manifest at "
                                      f"{t['name']!r}: run `gpt2-engine build {self.artifact.path}` again")
        aliased = getattr(engine, "get_aliased_input_tensor", None)  # TensorRT 11 Python API
        for past, present in self._pairs if aliased else ():
            if aliased(present) != past:
                raise EngineError(f"{present!r} is not aliased to {past!r} in {self.plan_path.name}: the cache "
                                  "would not be updated in place; re-export and rebuild")

    # -- Backend interface ----------------------------------------------------------------------------

    def new_cache(self, batch: int, capacity: int, commit: bool = False) -> TrtCache:
        """Buffers at the engine's fixed capacity (>= the one asked for: more slots are harmless).
        Device memory is committed when allocated: `commit` changes nothing here."""
        if not 1 <= batch <= self.max_batch:
            raise InputError(f"batch must be in [1, {self.max_batch}] for this engine, got {batch}: "
                             f"build one with a larger --max-batch")
        if not 1 <= capacity <= self.fixed_capacity:
            raise InputError(f"capacity must be in [1, {self.fixed_capacity}] for this engine, got {capacity}: "
                             f"build one with --capacity {capacity}")
        g = self._gpu
        with g.lock:
            g.push()
            try:
                buffers = {}
                for past, nbytes in cache_buffer_nbytes(self.config, self.precision, batch,
                                                        self.fixed_capacity).items():
                    buffers[past] = self._cuda.mem_alloc(nbytes)                    # (B, nh, S, hs)
                    self._cuda.memset_d8(buffers[past], 0, nbytes)
            finally:
                g.pop()
        row_bytes = next(iter(cache_buffer_nbytes(self.config, self.precision, 1, self.fixed_capacity).values()))
        cache = TrtCache(batch, self.fixed_capacity, buffers, row_bytes)
        g.caches.add(cache)
        return cache

    def view(self, cache: TrtCache, start: int, stop: int) -> TrtCache:
        """Rows [start, stop) as a cache of their own: the same device buffers at a row offset."""
        if not 0 <= start < stop <= cache.batch:
            raise InputError(f"cache rows must satisfy 0 <= start < stop <= {cache.batch}, got [{start}, {stop})")
        return TrtCache(stop - start, cache.capacity, cache.buffers, cache.row_bytes,
                        cache.first_row + start, is_view=True)

    def copy_row(self, cache: TrtCache, src: int, dst: int, length: int) -> None:
        """Copy row src over row dst, whole rows (device bandwidth makes slot-exact copies not worth it)."""
        g = self._gpu
        with g.lock:
            g.push()
            try:
                for past in cache.buffers:
                    base = int(cache.buffers[past]) + cache.first_row * cache.row_bytes
                    self._cuda.memcpy_dtod(base + dst * cache.row_bytes, base + src * cache.row_bytes,
                                           cache.row_bytes)
            finally:
                g.pop()

    def forward(self, cache: TrtCache, input_ids: np.ndarray, cache_positions: np.ndarray,
                logits_indices: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)                      # (B, T)
        pos = np.ascontiguousarray(cache_positions, dtype=np.int64)                # (B,)
        li = np.ascontiguousarray(logits_indices, dtype=np.int64)                  # (B, K)
        B, T, K = check_step(ids, pos, li, cache_batch=cache.batch, capacity=cache.capacity,
                             max_batch=self.max_batch, max_prompt=self.max_prompt)
        g, cuda = self._gpu, self._cuda
        with g.lock:
            if g.closed:
                raise EngineError("this TensorRT backend is closed")
            g.push()
            try:
                ctx = g.context
                profile = choose_profile(T, K)
                if profile != self._profile:
                    ctx.set_optimization_profile_async(profile, g.stream.handle)
                    self._profile = profile
                for name, shape in step_shapes(self.config, self.precision, B, T, K, cache.capacity).items():
                    if not ctx.set_input_shape(name, shape):
                        raise EngineError(f"TensorRT rejected shape {shape} for {name!r} (profile {profile})")
                for name, arr in zip(_STEP_INPUTS, (ids, pos, li)):
                    host = g.host_inputs[name][: arr.size]
                    host[:] = arr.ravel()
                    if name in self._on_host:  # a shape-tensor input lives in host memory
                        ctx.set_tensor_address(name, host.ctypes.data)
                    else:
                        cuda.memcpy_htod_async(g.dev_inputs[name], host, g.stream)
                        ctx.set_tensor_address(name, int(g.dev_inputs[name]))
                for past, present in self._pairs:  # one buffer, two names: the in-place cache update
                    ptr = cache.ptr(past)
                    ctx.set_tensor_address(past, ptr)
                    ctx.set_tensor_address(present, ptr)
                logits_host = self._logits_buffers(B, K)
                ctx.set_tensor_address(io.LOGITS, int(g.logits_dev))
                if not ctx.execute_async_v3(g.stream.handle):
                    raise EngineError("TensorRT execute_async_v3 failed (see its log above)")
                cuda.memcpy_dtoh_async(logits_host, g.logits_dev, g.stream)
                g.stream.synchronize()
                return logits_host.reshape(B, K, self.config.vocab_size).copy()   # (B, K, V) float32
            finally:
                g.pop()

    def _logits_buffers(self, batch: int, n_logits: int) -> np.ndarray:
        """Pinned host view of exactly (B*K*V) floats; both buffers grow when a call needs more."""
        g, need = self._gpu, logits_nbytes(self.config, batch, n_logits)
        if g.logits_host is None or g.logits_host.nbytes < need:
            if g.logits_dev is not None:
                g.logits_dev.free()
            g.logits_dev = self._cuda.mem_alloc(need)
            g.logits_host = self._cuda.pagelocked_empty(need // 4, np.float32)
        return g.logits_host[: need // 4]

    def close(self) -> None:
        self._gpu.close()
