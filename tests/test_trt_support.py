"""TensorRT support on CPU: the ONNX check, engine profiles, cache keys, engine lookup, buffer sizes.

Nothing here imports tensorrt or pycuda: this is the part of the TensorRT path that can be proven
without a GPU (tests/test_trt_gpu.py holds the rest).
"""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine import artifact as io
from engine.backends.trt_plan import (
    DECODE,
    PREFILL,
    cache_buffer_nbytes,
    check_step,
    choose_profile,
    input_buffer_nbytes,
    logits_nbytes,
    read_engine_metadata,
    select_engine,
    step_shapes,
)
from engine.config import SIZES, GPT2Config
from engine.errors import ArtifactError, InputError
from export.trt_build import engine_cache_key, plan_profiles, write_atomic
from export.trt_support import SOURCES, SUPPORTED_OPS, UNSUPPORTED_OPS, check_graph_for_tensorrt

TINY = GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=128, n_positions=64)
SIZES_4 = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
F32, F16, I64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64


# --- the support table -----------------------------------------------------------------------------

def test_every_table_row_cites_a_source():
    for op, spec in SUPPORTED_OPS.items():
        assert spec.cite in SOURCES, op
        assert spec.types, op
    for op, cite in UNSUPPORTED_OPS.items():
        assert cite in SOURCES, op
    assert not set(SUPPORTED_OPS) & set(UNSUPPORTED_OPS)
    assert all("TensorRT" in s and s.startswith("https://") for s in SOURCES.values())


# --- check_graph_for_tensorrt on tiny hand-made graphs ----------------------------------------------

def _model(nodes, inputs, outputs, initializers=(), opset=24):
    g = helper.make_graph(nodes, "t", inputs, outputs, list(initializers))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def test_a_plain_graph_passes():
    m = _model([helper.make_node("Add", ["a", "b"], ["c"], name="/add")],
               [_vi("a", F32, [2, 3]), _vi("b", F32, [2, 3])], [_vi("c", F32, [2, 3])])
    assert check_graph_for_tensorrt(m) == []


def test_contrib_domain_is_flagged():
    node = helper.make_node("FastGelu", ["a"], ["c"], name="/h.0/mlp/FastGelu", domain="com.microsoft")
    m = _model([node], [_vi("a", F32, [2, 3])], [_vi("c", F32, [2, 3])])
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    v = check_graph_for_tensorrt(m)
    assert len(v) == 1 and "com.microsoft" in v[0] and "/h.0/mlp/FastGelu" in v[0]


def test_float64_is_flagged():
    m = _model([helper.make_node("Add", ["a", "b"], ["c"], name="/add")],
               [_vi("a", TensorProto.DOUBLE, [2]), _vi("b", TensorProto.DOUBLE, [2])],
               [_vi("c", TensorProto.DOUBLE, [2])])
    v = check_graph_for_tensorrt(m)
    assert any("DOUBLE" in s and "'a'" in s for s in v)
    assert any("DOUBLE" in s and "/add" in s for s in v)  # the op's type rule fires too


def test_unsupported_and_unknown_ops_are_flagged():
    m = _model([helper.make_node("Unique", ["a"], ["u"], name="/unique"),
                helper.make_node("Hardmax", ["a"], ["h"], name="/hardmax")],
               [_vi("a", F32, [4])], [_vi("u", F32, None), _vi("h", F32, [4])])
    v = check_graph_for_tensorrt(m)
    assert any("does not support Unique" in s for s in v)
    assert any("Hardmax is not in" in s for s in v)


def test_opset_outside_the_parsers_range_is_flagged():
    m = _model([helper.make_node("Add", ["a", "a"], ["c"])], [_vi("a", F32, [2])], [_vi("c", F32, [2])], opset=8)
    assert any("opset 8" in s for s in check_graph_for_tensorrt(m))


def _scatter_model(axis=-2, mode="linear", through_identity=False, rank=4):
    past_shape = [1, 2, 8, 4][:rank] if rank == 4 else [1, 8, 4]
    upd_shape = [1, 2, 1, 4] if rank == 4 else [1, 1, 4]
    nodes, past = [], "past"
    if through_identity:
        nodes.append(helper.make_node("Identity", ["past"], ["past_copy"], name="/copy"))
        past = "past_copy"
    nodes.append(helper.make_node("TensorScatter", [past, "upd", "pos"], ["present"], name="/h.0/attn/TensorScatter",
                                  axis=axis, mode=mode))
    return _model(nodes, [_vi("past", F16, past_shape), _vi("upd", F16, upd_shape), _vi("pos", I64, [1])],
                  [_vi("present", F16, past_shape)])


def test_tensor_scatter_as_exported_passes():
    assert check_graph_for_tensorrt(_scatter_model()) == []
    assert check_graph_for_tensorrt(_scatter_model(axis=2)) == []  # -2 of a 4-D cache


@pytest.mark.parametrize("kwargs, expect", [
    ({"axis": 1}, "axis must be -2"),
    ({"mode": "circular"}, "mode must be 'linear'"),
    ({"through_identity": True}, "must be a graph input"),
    ({"rank": 3, "axis": -2}, "must be 4-D"),
])
def test_tensor_scatter_constraints(kwargs, expect):
    v = check_graph_for_tensorrt(_scatter_model(**kwargs))
    assert any(expect in s for s in v), v


def test_gemm_needs_2d_and_gelu_needs_known_approximation():
    w = numpy_helper.from_array(np.zeros((8, 4), np.float32), "w")
    m = _model([helper.make_node("Gemm", ["x", "w"], ["y"], name="/lm_head/Gemm", transB=1),
                helper.make_node("Gelu", ["y"], ["z"], name="/gelu", approximate="sigmoid")],
               [_vi("x", F32, [2, 3, 4])], [_vi("z", F32, None)], [w])
    v = check_graph_for_tensorrt(m)
    assert any("/lm_head/Gemm" in s and "2-D" in s for s in v)
    assert any("/gelu" in s and "approximate" in s for s in v)


def test_data_dependent_slice_is_flagged_but_shape_derived_slice_is_not():
    # ends = ReduceMax(positions) + 1: the slice length depends on input values
    consts = [numpy_helper.from_array(np.array([0], np.int64), "zero"),
              numpy_helper.from_array(np.array([1], np.int64), "one"),
              numpy_helper.from_array(np.array([2], np.int64), "axis")]
    dependent = [helper.make_node("ReduceMax", ["pos"], ["mx"], keepdims=1, name="/max"),
                 helper.make_node("Add", ["mx", "one"], ["end"], name="/end"),
                 helper.make_node("Slice", ["cache", "zero", "end", "axis"], ["k"], name="/h.0/attn/Slice")]
    inputs = [_vi("cache", F16, [1, 2, 8, 4]), _vi("pos", I64, [1])]
    v = check_graph_for_tensorrt(_model(dependent, inputs, [_vi("k", F16, None)], consts))
    assert any("/h.0/attn/Slice" in s and "data-dependent shape" in s for s in v)

    from_shape = [helper.make_node("Shape", ["cache"], ["shp"], name="/shape"),
                  helper.make_node("Slice", ["shp", "axis", "axis_end"], ["end"], name="/cap"),
                  helper.make_node("Slice", ["cache", "zero", "end", "axis"], ["k"], name="/h.0/attn/Slice")]
    consts.append(numpy_helper.from_array(np.array([3], np.int64), "axis_end"))
    assert check_graph_for_tensorrt(_model(from_shape, inputs, [_vi("k", F16, None)], consts)) == []


# --- the exported decoder graph --------------------------------------------------------------------

def _exported_fp16_graph() -> onnx.ModelProto:
    graph = pytest.importorskip("export.graph", reason="export/graph.py (build_decoder_graph) not written yet")
    if not hasattr(graph, "build_decoder_graph"):
        pytest.skip("export.graph has no build_decoder_graph yet")
    checkpoint = pytest.importorskip("export.checkpoint", reason="export/checkpoint.py not written yet")
    weights = checkpoint.random_weights(TINY, seed=0)
    return graph.build_decoder_graph(TINY, weights, "fp16")


def test_exported_fp16_graph_uses_only_what_tensorrt_parses():
    """Ops, domains, dtypes and the TensorScatter wiring (everything but shape provenance)."""
    v = [s for s in check_graph_for_tensorrt(_exported_fp16_graph()) if "data-dependent shape" not in s]
    assert v == []


def test_exported_fp16_graph_has_no_data_dependent_shapes():
    assert check_graph_for_tensorrt(_exported_fp16_graph()) == []


# --- engine profiles -------------------------------------------------------------------------------

@pytest.mark.parametrize("size", SIZES_4)
def test_profiles_are_consistent_for_each_size(size):
    cfg = SIZES[size]
    profiles = plan_profiles(cfg, max_batch=8, max_prompt=512, capacity=1024)
    json.dumps(profiles)  # stored in the engine metadata as-is
    assert [p["name"] for p in profiles] == ["prefill", "decode"]
    names = {t["name"] for t in io.io_spec(cfg, "fp16")["inputs"]}
    pasts = {p for p, _ in io.cache_io_pairs(cfg.n_layer)}
    for p in profiles:
        assert set(p["shapes"]) == names
        for name, s in p["shapes"].items():
            assert len(s["min"]) == len(s["opt"]) == len(s["max"]), name
            assert all(a <= b <= c for a, b, c in zip(s["min"], s["opt"], s["max"])), (p["name"], name, s)
            assert s["min"][0] == 1 and s["max"][0] == 8, name  # batch 1..8 everywhere
        caches = {tuple(map(tuple, (s["min"], s["opt"], s["max"]))) for n, s in p["shapes"].items() if n in pasts}
        assert caches == {((1, cfg.n_head, 1024, cfg.head_dim), (1, cfg.n_head, 1024, cfg.head_dim),
                           (8, cfg.n_head, 1024, cfg.head_dim))}, "every KV input: same shapes, fixed capacity"
    prefill, decode = profiles[PREFILL]["shapes"], profiles[DECODE]["shapes"]
    assert prefill[io.INPUT_IDS]["max"] == [8, 512] and prefill[io.LOGITS_INDICES]["max"] == [8, 512]
    for which in ("min", "opt", "max"):
        assert decode[io.INPUT_IDS][which][1] == 1
        assert decode[io.LOGITS_INDICES][which][1] == 1


@pytest.mark.parametrize("args, match", [
    ({"max_prompt": 600, "capacity": 512}, "max_prompt must be in"),
    ({"capacity": 2048}, "capacity must be in"),
    ({"max_batch": 0}, "max_batch must be in"),
])
def test_profile_arguments_are_validated(args, match):
    kw = {"max_batch": 8, "max_prompt": 512, "capacity": 1024} | args
    with pytest.raises(InputError, match=match):
        plan_profiles(SIZES["gpt2"], **kw)


@pytest.mark.parametrize("B, T, K", [(1, 1, 1), (8, 1, 1), (1, 512, 1), (3, 17, 17), (2, 1, 1), (1, 2, 1)])
def test_each_step_lands_inside_the_profile_it_selects(B, T, K):
    cfg = SIZES["gpt2"]
    profiles = plan_profiles(cfg, max_batch=8, max_prompt=512, capacity=1024)
    chosen = profiles[choose_profile(T, K)]["shapes"]
    for name, shape in step_shapes(cfg, "fp16", B, T, K, 1024).items():
        lo, hi = chosen[name]["min"], chosen[name]["max"]
        assert all(a <= d <= b for a, d, b in zip(lo, shape, hi)), (name, shape, lo, hi)
    assert choose_profile(T, K) == (DECODE if (T, K) == (1, 1) else PREFILL)


# --- engine cache key and lookup -------------------------------------------------------------------

_BASE = dict(trt_version="10.15.1", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
             precision="fp16", profiles=plan_profiles(TINY, 4, 16, 64), onnx_sha256="ab" * 32)


def test_cache_key_is_stable_and_filename_safe():
    k = engine_cache_key(**_BASE)
    assert k == engine_cache_key(**json.loads(json.dumps(_BASE)))
    assert re.fullmatch(r"[A-Za-z0-9._-]+", k), k


@pytest.mark.parametrize("field, value", [
    ("trt_version", "11.4.0"), ("gpu_name", "NVIDIA A100-SXM4-40GB"), ("compute_capability", "8.0"),
    ("precision", "fp32"), ("profiles", plan_profiles(TINY, 8, 16, 64)), ("onnx_sha256", "cd" * 32),
])
def test_cache_key_changes_with_every_build_input(field, value):
    assert engine_cache_key(**(_BASE | {field: value})) != engine_cache_key(**_BASE)


def _meta(**kw):
    m = {"format": 1, "plan": "x.plan", "tensorrt_version": "10.15.1", "gpu_name": "NVIDIA H100 80GB HBM3",
         "compute_capability": "9.0", "precision": "fp16", "onnx_sha256": "ab" * 32, "capacity": 64,
         "built_at": "2026-11-01T00:00:00+00:00"}
    return m | kw


def test_select_engine_picks_the_newest_match(tmp_path):
    old, new = _meta(plan="old.plan"), _meta(plan="new.plan", built_at="2026-11-02T00:00:00+00:00")
    other = _meta(plan="a100.plan", gpu_name="NVIDIA A100", compute_capability="8.0",
                  built_at="2026-11-03T00:00:00+00:00")
    got = select_engine(tmp_path, [old, other, new], "10.15.1", "NVIDIA H100 80GB HBM3", "9.0", "fp16", "ab" * 32)
    assert got["plan"] == "new.plan"


def test_select_engine_says_what_to_rerun(tmp_path):
    with pytest.raises(ArtifactError, match=r"built for TensorRT 10\.15\.1 on NVIDIA H100 80GB HBM3 \(sm 9\.0\), "
                                            r"this is TensorRT 11\.4\.0 on NVIDIA H100 80GB HBM3 .*"
                                            r"run `gpt2-engine build .*` again"):
        select_engine(tmp_path, [_meta()], "11.4.0", "NVIDIA H100 80GB HBM3", "9.0", "fp16")
    with pytest.raises(ArtifactError, match=r"NVIDIA L4 \(sm 8\.9\)"):
        select_engine(tmp_path, [_meta()], "10.15.1", "NVIDIA L4", "8.9", "fp16")
    with pytest.raises(ArtifactError, match="older model.onnx"):
        select_engine(tmp_path, [_meta()], "10.15.1", "NVIDIA H100 80GB HBM3", "9.0", "fp16", "ff" * 32)
    with pytest.raises(ArtifactError, match="no TensorRT engine"):
        select_engine(tmp_path, [], "10.15.1", "NVIDIA H100 80GB HBM3", "9.0", "fp16")


def test_metadata_without_its_plan_is_ignored(tmp_path):
    engines = tmp_path / io.ENGINES_DIR
    write_atomic(engines / "a.json", json.dumps(_meta(plan="a.plan")).encode())
    write_atomic(engines / "b.json", json.dumps(_meta(plan="b.plan")).encode())
    write_atomic(engines / "b.plan", b"\0" * 16)
    (engines / "c.json").write_text("{not json")
    assert [m["plan"] for m in read_engine_metadata(tmp_path)] == ["b.plan"]
    assert not list(engines.glob("*.partial"))  # atomic writes leave no temp files


# --- buffers and per-step validation ---------------------------------------------------------------

def test_buffer_sizes_for_gpt2_fp16():
    cfg = SIZES["gpt2"]  # 12 layers, 12 heads, head_dim 64
    cache = cache_buffer_nbytes(cfg, "fp16", batch=2, capacity=1024)
    assert len(cache) == 24 and set(cache) == {p for p, _ in io.cache_io_pairs(12)}
    assert set(cache.values()) == {2 * 12 * 1024 * 64 * 2}                          # (B, nh, S, hs) fp16
    assert sum(cache.values()) == 24 * 3_145_728
    assert cache_buffer_nbytes(cfg, "fp32", 1, 1024)[io.past_key(0)] == 12 * 1024 * 64 * 4
    inputs = input_buffer_nbytes(cfg, "fp16", max_batch=8, max_prompt=512)
    assert inputs == {io.INPUT_IDS: 8 * 512 * 8, io.CACHE_POSITIONS: 8 * 8, io.LOGITS_INDICES: 8 * 512 * 8}
    assert logits_nbytes(cfg, batch=8, n_logits=1) == 8 * 50257 * 4


def test_step_shapes_are_named_by_the_manifest():
    cfg = SIZES["gpt2"]
    shapes = step_shapes(cfg, "fp16", batch=3, seq=1, n_logits=1, capacity=256)
    assert shapes[io.INPUT_IDS] == (3, 1) and shapes[io.CACHE_POSITIONS] == (3,)
    assert shapes[io.LOGITS_INDICES] == (3, 1) and shapes[io.past_value(11)] == (3, 12, 256, 64)


def _step(B=2, T=3, K=1, pos=(0, 5)):
    ids = np.zeros((B, T), np.int64)
    return ids, np.array(pos[:B], np.int64), np.full((B, K), T - 1, np.int64)


def test_check_step_accepts_a_valid_step():
    assert check_step(*_step(), cache_batch=2, capacity=64, max_batch=8, max_prompt=16) == (2, 3, 1)


@pytest.mark.parametrize("args, kw, match", [
    (_step(), {"cache_batch": 3}, "batch must match"),
    (_step(T=20), {}, r"new tokens per call must be in \[1, 16\]"),
    (_step(pos=(0, 62)), {}, "within the cache capacity 64"),
    ((np.zeros((2, 3), np.int64), np.zeros(2, np.int64), np.full((2, 1), 3, np.int64)), {}, "logits_indices"),
])
def test_check_step_rejects_what_the_engine_cannot_run(args, kw, match):
    kw = {"cache_batch": 2, "capacity": 64, "max_batch": 8, "max_prompt": 16} | kw
    with pytest.raises(InputError, match=match):
        check_step(*args, **kw)


# --- the builder's gates, before any TensorRT is needed --------------------------------------------

def _tiny_artifact(out, precision):
    graph = pytest.importorskip("export.graph", reason="export/graph.py not written yet")
    checkpoint = pytest.importorskip("export.checkpoint", reason="export/checkpoint.py not written yet")
    out.mkdir()
    # The TensorRT graph family (elementary-ops attention, one segment) in either precision.
    onnx.save_model(graph.build_decoder_graph(TINY, checkpoint.random_weights(TINY, seed=0), precision, attention="ops"),
                    str(out / io.MODEL_FILE))
    (out / io.TOKENIZER_FILE).write_text("{}")
    manifest = {"format_version": io.FORMAT_VERSION, "config": TINY.to_dict(), "precision": precision,
                "model_file": io.MODEL_FILE, "tokenizer_file": io.TOKENIZER_FILE, "io": io.io_spec(TINY, precision),
                "cache": {"max_capacity": TINY.n_positions, "dtype": "float16" if precision == "fp16" else "float32"},
                "source": {"kind": "random"}}
    (out / io.MANIFEST).write_text(json.dumps(manifest))
    return out


def test_missing_tensorrt_says_how_to_install(monkeypatch):
    from engine.backends.trt_plan import import_tensorrt
    from engine.errors import BackendUnavailable
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import raises ImportError
    with pytest.raises(BackendUnavailable, match=r"pip install tensorrt-cu12 pycuda"):
        import_tensorrt()


def test_build_refuses_an_fp32_export(tmp_path):
    from export.trt_build import build_engine
    d = _tiny_artifact(tmp_path / "fp32", "fp32")
    with pytest.raises(ArtifactError, match=r"fp32 export.*--precision fp16"):
        build_engine(d, max_batch=2, max_prompt=8, progress=None)


def test_build_checks_the_graph_before_touching_tensorrt(tmp_path, monkeypatch):
    import export.trt_support as support
    from engine.errors import BackendUnavailable
    from export.trt_build import build_engine
    d = _tiny_artifact(tmp_path / "fp16", "fp16")
    monkeypatch.setattr(support, "check_graph_for_tensorrt", lambda m: ["/h.0/attn/Slice (Slice): bad"])
    with pytest.raises(ArtifactError, match=r"1 construct\(s\) TensorRT rejects:\n  /h.0/attn/Slice"):
        build_engine(d, max_batch=2, max_prompt=8, progress=None)
    monkeypatch.setattr(support, "check_graph_for_tensorrt", lambda m: [])
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailable):
        build_engine(d, max_batch=2, max_prompt=8, progress=None)


# --- TrtBackend's bookkeeping, driven by fake tensorrt/pycuda modules ------------------------------
# The fakes run the fp32 ONNX graph with ONNX Runtime on the "device" buffers the backend binds by
# name, so this checks everything the backend decides (profiles, shapes, addresses, the shared
# past/present buffer, copies, logits sizing, teardown) against the ORT backend -- on CPU. It does not
# check TensorRT itself: tests/test_trt_gpu.py does, on a GPU.

class _FakeDevice:
    def __init__(self):
        self.mem: dict[int, np.ndarray] = {}
        self.next = 1 << 20

    def alloc(self, nbytes):
        dev = self

        class Alloc:
            def __init__(self):
                self.ptr, dev.next = dev.next, dev.next + nbytes + 4096
                dev.mem[self.ptr] = np.full(nbytes, 0xAB, np.uint8)  # garbage until memset

            def __int__(self):
                return self.ptr

            def free(self):
                dev.mem.pop(self.ptr, None)
        return Alloc()

    def view(self, ptr, shape, dtype):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return self.mem[ptr][:n].view(dtype).reshape(shape)


def _fake_modules(dev: _FakeDevice, calls: list):
    import types

    import onnxruntime as ort
    cuda = types.ModuleType("pycuda.driver")
    cuda.init = lambda: None
    cuda.mem_alloc = dev.alloc
    cuda.pagelocked_empty = lambda n, dtype: np.empty(n, dtype)
    cuda.memset_d8 = lambda a, v, n: dev.mem[int(a)].__setitem__(slice(0, n), v)
    cuda.memcpy_htod_async = lambda d, s, stream: dev.mem[int(d)].__setitem__(slice(0, s.nbytes), s.view(np.uint8))
    cuda.memcpy_dtoh_async = lambda d, s, stream: d.view(np.uint8).__setitem__(slice(None), dev.mem[int(s)][:d.nbytes])
    cuda.Stream = lambda: types.SimpleNamespace(handle=7, synchronize=lambda: None)
    cuda.Context = types.SimpleNamespace(pop=lambda: calls.append(("pop",)))
    primary = types.ModuleType("pycuda.autoprimaryctx")
    primary.context = types.SimpleNamespace(push=lambda: calls.append(("push",)))
    pycuda = types.ModuleType("pycuda")
    pycuda.driver, pycuda.autoprimaryctx = cuda, primary

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.15.1"
    trt.int64, trt.float16, trt.float32 = "int64", "float16", "float32"
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.TensorLocation = types.SimpleNamespace(DEVICE="dev", HOST="host")
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})

    class Context:
        def __init__(self, art):
            self.spec, self.pairs = io.io_spec(art.config, art.precision), io.cache_io_pairs(art.config.n_layer)
            self.session = ort.InferenceSession(str(art.model_path), providers=["CPUExecutionProvider"])
            self.shapes, self.addr = {}, {}

        def set_optimization_profile_async(self, index, stream):
            calls.append(("profile", index))

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr
            return True

        def execute_async_v3(self, stream):
            for past, present in self.pairs:  # TensorRT's KV-cache layer demands one address for both
                assert self.addr[past] == self.addr[present], (past, present)
            feeds = {t["name"]: dev.view(self.addr[t["name"]], self.shapes[t["name"]], t["dtype"]).copy()
                     for t in self.spec["inputs"]}
            outs = self.session.run([t["name"] for t in self.spec["outputs"]], feeds)
            for t, value in zip(self.spec["outputs"], outs):
                dev.view(self.addr[t["name"]], value.shape, t["dtype"])[...] = value
            calls.append(("execute", self.shapes[io.INPUT_IDS]))
            return True

    class Engine:
        def __init__(self, art):
            self.art, spec = art, io.io_spec(art.config, art.precision)
            self.tensors = {t["name"]: ("in", t["dtype"]) for t in spec["inputs"]}
            self.tensors |= {t["name"]: ("out", t["dtype"]) for t in spec["outputs"]}
            self.names = list(self.tensors)
            self.num_io_tensors = len(self.names)

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return self.tensors[name][0]

        def get_tensor_dtype(self, name):
            return self.tensors[name][1]

        def get_tensor_location(self, name):
            return "dev"

        def get_aliased_input_tensor(self, name):
            return {present: past for past, present in io.cache_io_pairs(self.art.config.n_layer)}.get(name)

        def create_execution_context(self):
            return Context(self.art)

    from engine.artifact import load_artifact
    trt.Runtime = lambda logger: types.SimpleNamespace(
        deserialize_cuda_engine=lambda data: Engine(load_artifact(data.decode())))
    return {"tensorrt": trt, "pycuda": pycuda, "pycuda.driver": cuda, "pycuda.autoprimaryctx": primary}


@pytest.fixture
def fake_trt_backend(tmp_path, monkeypatch):
    from engine.artifact import load_artifact
    d = _tiny_artifact(tmp_path / "fp32", "fp32")
    (d / io.ENGINES_DIR).mkdir()
    (d / io.ENGINES_DIR / "fake.plan").write_text(str(d))  # the fake engine runs this directory's ONNX
    meta = {"format": 1, "plan": "fake.plan", "max_batch": 4, "max_prompt": 16, "capacity": 64}
    (d / io.ENGINES_DIR / "fake.json").write_text(json.dumps(meta))
    dev, calls = _FakeDevice(), []
    for name, module in _fake_modules(dev, calls).items():
        monkeypatch.setitem(sys.modules, name, module)
    from engine.backends.trt import TrtBackend
    backend = TrtBackend(load_artifact(d), engine_path=d / io.ENGINES_DIR / "fake.plan")
    return backend, load_artifact(d), dev, calls


def test_trt_backend_bookkeeping_matches_ort(fake_trt_backend):
    from engine.backends.ort import OrtBackend
    trt_b, art, dev, calls = fake_trt_backend
    ort_b = OrtBackend(art)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, TINY.vocab_size, (2, 6)).astype(np.int64)
    c_trt, c_ort = trt_b.new_cache(2, 32), ort_b.new_cache(2, 64)
    assert c_trt.capacity == 64  # the engine's fixed capacity, >= the 32 asked for
    args = (ids, np.zeros(2, np.int64), np.arange(6)[None].repeat(2, 0))               # every position: K = 6
    np.testing.assert_allclose(trt_b.forward(c_trt, *args), ort_b.forward(c_ort, *args), rtol=1e-5, atol=1e-5)
    for t in range(6, 10):
        step = (ids[:, :1] + t, np.full(2, t, np.int64), np.zeros((2, 1), np.int64))
        np.testing.assert_allclose(trt_b.forward(c_trt, *step), ort_b.forward(c_ort, *step), rtol=1e-5, atol=1e-5)
    # profile: prefill once, then decode once (not re-selected every step); shapes as the step's
    assert [c for c in calls if c[0] == "profile"] == [("profile", 0), ("profile", 1)]
    assert [c[1] for c in calls if c[0] == "execute"] == [(2, 6)] + [(2, 1)] * 4
    pushes, pops = sum(c == ("push",) for c in calls), sum(c == ("pop",) for c in calls)
    assert pushes == pops
    with pytest.raises(InputError, match="capacity must be in"):
        trt_b.new_cache(1, 65)
    trt_b.close()
    assert dev.mem == {}, "close() frees every device buffer (caches, inputs, logits)"
    ort_b.close()


def test_trt_backend_serializes_concurrent_requests(fake_trt_backend):
    import threading
    backend = fake_trt_backend[0]
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, TINY.vocab_size, (1, 4)).astype(np.int64) for _ in range(4)]

    def greedy(p):
        cache = backend.new_cache(1, 64)
        logits = backend.forward(cache, p, np.zeros(1, np.int64), np.array([[3]]))
        out = []
        for t in range(4, 10):
            out.append(int(logits[0, -1].argmax()))
            logits = backend.forward(cache, np.array([[out[-1]]]), np.array([t]), np.zeros((1, 1), np.int64))
        return out

    serial = [greedy(p) for p in prompts]
    got: list = [None] * 4
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, greedy(prompts[i]))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == serial
    backend.close()
