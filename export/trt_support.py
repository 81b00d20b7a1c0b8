"""What the TensorRT ONNX parser accepts (TensorRT >= 10.15), as data, and a check of a graph against it.

The table is read from onnx-tensorrt's own support matrix and importer source, one row per op with the
types the matrix lists and the restrictions that matter to us; every row names its source in `cite`
(a key of SOURCES: URL + TensorRT version). `check_graph_for_tensorrt` runs on CPU, in milliseconds,
so the exporter's tests catch a graph TensorRT would reject long before anyone holds a GPU, and
`gpt2-engine build` refuses such a graph before spending minutes in the builder.

Beyond per-op rules it checks two graph-level properties the KV-cache layer and the builder need:
- TensorScatter (-> IKVCacheUpdateLayer) reads its cache straight from a graph input and writes its
  result straight to a graph output: the layer requires cache = network input, output = network output,
  bound to one address.
- No tensor *shape* depends on a graph input's *values* (e.g. a Slice end computed from
  ReduceMax(cache_positions)). ISliceLayer's size and IFillLayer's (Range's) length must be shape
  tensors; a network input feeding one becomes a shape-tensor input, which TensorRT wants in host memory
  with build-time value ranges and (as far as we could read) a static length -- our `cache_positions`
  has a dynamic batch dimension. Attend over the full, fixed-capacity cache with a mask instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto

from engine.backends.trt_plan import TRT_MIN_VERSION  # the runtime checks it too: one constant

OPSET_RANGE = (9, 24)        # "TensorRT 10.15 supports operators in the inclusive range of opset 9 to opset 24"

SOURCES = {
    "ops-md": "https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md "
              "(header: TensorRT 10.15, opset 9-24)",
    "importer": "https://github.com/onnx/onnx-tensorrt/blob/main/onnxOpImporters.cpp (TensorRT 10.15 importers)",
    "changelog": "https://github.com/onnx/onnx-tensorrt/blob/main/docs/Changelog.md "
                 "(TensorRT 10.15 GA: TensorScatter added)",
    "kv-layer": "https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/operators/KVCacheUpdate.html "
                "(TensorRT 10.15+; same text in inference-library/transformers-kv-cache.html)",
}

# ONNX element type -> the names the support matrix uses.
TYPE_NAMES = {
    TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
    TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.INT8: "INT8", TensorProto.UINT8: "UINT8",
    TensorProto.BOOL: "BOOL", TensorProto.DOUBLE: "DOUBLE", TensorProto.FLOAT8E4M3FN: "FP8",
    TensorProto.INT4: "INT4", TensorProto.FLOAT4E2M1: "FP4",
}
# ops-md, TRT 10.15 preamble: "TensorRT supports the following ONNX data types: DOUBLE, FLOAT32, FLOAT16,
# BFLOAT16, FP8, FP4, INT32, INT64, INT8, INT4, UINT8, and BOOL" -- DOUBLE only by a clamping cast to
# FLOAT, UINT8 only as network I/O. We refuse DOUBLE outright: export float32 instead.
TENSOR_TYPES = frozenset({"FP32", "FP16", "BF16", "FP8", "FP4", "INT32", "INT64", "INT8", "INT4", "BOOL"})
IO_ONLY_TYPES = frozenset({"UINT8"})

_F = frozenset({"FP32", "FP16", "BF16"})
_FI = _F | {"INT32", "INT64"}
_FIB = _FI | {"BOOL"}


@dataclass(frozen=True)
class OpSupport:
    types: frozenset[str]          # types of the data input(s), as the matrix lists them
    restrictions: str = ""         # the matrix's restriction text, or what the importer enforces
    cite: str = "ops-md"           # key of SOURCES
    data_inputs: tuple[int, ...] = (0,)  # which inputs carry the type above (others: indices, axes...)


# One row per op: the ops our decoder uses, plus their usual neighbours in transformer graphs.
SUPPORTED_OPS: dict[str, OpSupport] = {
    "Add": OpSupport(_FI),                                                   # ops-md 10.15
    "Sub": OpSupport(_FI),                                                   # ops-md 10.15
    "Mul": OpSupport(_FI),                                                   # ops-md 10.15
    "Div": OpSupport(_FI),                                                   # ops-md 10.15
    "Pow": OpSupport(_FI),                                                   # ops-md 10.15
    "Sqrt": OpSupport(_F),                                                   # ops-md 10.15
    "Erf": OpSupport(_F),                                                    # ops-md 10.15
    "Tanh": OpSupport(_F),                                                   # ops-md 10.15
    "Sigmoid": OpSupport(_F),                                                # ops-md 10.15
    # importer: approximate 'none' -> ActivationType.kGELU_ERF, 'tanh' -> kGELU_TANH, anything else rejected.
    "Gelu": OpSupport(_F | {"INT8", "INT32", "INT64"}, "approximate must be 'none' or 'tanh'", "importer"),
    "MatMul": OpSupport(_F, data_inputs=(0, 1)),                             # ops-md 10.15
    # importer: "GEMM must have 2D inputs!"; transA/transB map to MatrixOperation.kTRANSPOSE.
    "Gemm": OpSupport(_F, "A and B must be 2-D", "importer", data_inputs=(0, 1)),
    # ops-md 10.15: "Only the first output Y is supported."; importer: addNormalizationV2, in strongly
    # typed mode computed in the input's type (so feed it fp32 for fp32 statistics).
    "LayerNormalization": OpSupport(_F, "only the first output Y is supported", data_inputs=(0, 1, 2)),
    "RMSNormalization": OpSupport(_F),                                       # ops-md 10.15
    "Softmax": OpSupport(_F),                                                # ops-md 10.15
    "Cast": OpSupport(_FIB | {"UINT8"}),                                     # ops-md 10.15
    "Reshape": OpSupport(_FIB),                                              # ops-md 10.15
    "Transpose": OpSupport(_FIB),                                            # ops-md 10.15
    "Split": OpSupport(_FIB),                                                # ops-md 10.15
    "Concat": OpSupport(_FIB, data_inputs=()),                               # ops-md 10.15 (every input checked)
    # importer: starts/ends may be runtime tensors (cast to INT64 shape tensors); axes constant or tensor.
    "Slice": OpSupport(_FIB),                                                # ops-md 10.15
    "Squeeze": OpSupport(_FIB, "axes must be resolvable to a constant"),    # ops-md 10.15
    "Unsqueeze": OpSupport(_FIB, "axes must be resolvable to a constant"),  # ops-md 10.15
    "Shape": OpSupport(_FIB),                                                # ops-md 10.15
    "Expand": OpSupport(_FIB),                                               # ops-md 10.15
    "Tile": OpSupport(_FIB),                                                 # ops-md 10.15
    "Identity": OpSupport(_FIB),                                             # ops-md 10.15
    # importer: start/limit/delta of identical type, one of int32/int64/float32; int64 -> IFillLayer kINT64.
    "Range": OpSupport(_FI, "start, limit and delta must share one type (int32, int64 or float32)", "importer"),
    # ops-md 10.15: "`axes` must be an initializer" (absent axes = reduce over all axes is fine).
    "ReduceMax": OpSupport(_FI, "axes must be an initializer"),
    "ReduceMin": OpSupport(_FI, "axes must be an initializer"),
    "ReduceMean": OpSupport(_FI, "axes must be an initializer"),
    "ReduceSum": OpSupport(_FI, "axes must be an initializer"),
    "Equal": OpSupport(_FI, data_inputs=(0, 1)),                             # ops-md 10.15
    "Less": OpSupport(_FI, data_inputs=(0, 1)),                              # ops-md 10.15
    "LessOrEqual": OpSupport(_FI, data_inputs=(0, 1)),                       # ops-md 10.15
    "Greater": OpSupport(_FI, data_inputs=(0, 1)),                           # ops-md 10.15
    "GreaterOrEqual": OpSupport(_FI, data_inputs=(0, 1)),                    # ops-md 10.15
    "Not": OpSupport(frozenset({"BOOL"})),                                   # ops-md 10.15
    "And": OpSupport(frozenset({"BOOL"}), data_inputs=(0, 1)),               # ops-md 10.15
    "Where": OpSupport(_FIB, data_inputs=(1, 2)),                            # ops-md 10.15
    "Max": OpSupport(_FI, data_inputs=(0, 1)),                               # ops-md 10.15
    "Min": OpSupport(_FI, data_inputs=(0, 1)),                               # ops-md 10.15
    # importer: int64 indices are cast to int32 unless the data is int64; negative indices allowed.
    "Gather": OpSupport(_FIB),                                               # ops-md 10.15
    "GatherElements": OpSupport(_FIB),                                       # ops-md 10.15
    # importer: batch_dims -> IGatherLayer(kND).setNbElementWiseDims(batch_dims): batch_dims=1 is supported.
    "GatherND": OpSupport(_FIB, "batch_dims maps to setNbElementWiseDims", "importer"),
    "ScatterND": OpSupport(_FI, "reduction other than 'none' is not supported"),   # ops-md 10.15
    "ScatterElements": OpSupport(_FI),                                       # ops-md 10.15
    "Constant": OpSupport(_FIB, "sparse_value, value_string, value_strings unsupported", data_inputs=()),
    "ConstantOfShape": OpSupport(_FIB, data_inputs=()),                      # ops-md 10.15
    "Trilu": OpSupport(_FIB),                                                # ops-md 10.15
    # ops-md 10.15: "`past_cache` and `update` must be 4D. `axis` must be -2." Importer: mode must be
    # 'linear'; write_indices cast to INT32. kv-layer: cache a network input with a static sequence dim,
    # output a network output sharing the cache's device address.
    "TensorScatter": OpSupport(frozenset({"FP32", "FP16", "BF16", "INT32"}),
                               "past_cache and update 4-D, axis -2, mode 'linear'", data_inputs=(0, 1)),
    # ops-md 10.15: "past_key, past_value and nonpad_kv_seqlen inputs are unsupported. present_key,
    # present_value and qk_matmul_output outputs are unsupported." -- so it cannot own our KV cache.
    "Attention": OpSupport(_F | {"INT8", "FP8"}, "no past_key/past_value/nonpad_kv_seqlen inputs, one output",
                           data_inputs=(0, 1, 2)),
}

# Rows the matrix marks N (a few, so an error can say "TensorRT does not support X" rather than "unknown").
UNSUPPORTED_OPS: dict[str, str] = {
    "Unique": "ops-md", "SplitToSequence": "ops-md", "SequenceAt": "ops-md", "SequenceConstruct": "ops-md",
    "SequenceInsert": "ops-md", "ConcatFromSequence": "ops-md", "Optional": "ops-md", "StringNormalizer": "ops-md",
    "BitShift": "ops-md", "MatMulInteger": "ops-md", "ConvInteger": "ops-md", "DynamicQuantizeLinear": "ops-md",
    "Multinomial": "ops-md", "Det": "ops-md", "Compress": "ops-md", "Bernoulli": "ops-md",
}

# Inputs whose *values* decide an output *shape* (op -> input indices). Fed from graph-input values,
# they make a data-dependent shape; fed from Shape()/constants they are ordinary shape tensors.
SHAPE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,), "Range": (0, 1, 2),
    "Slice": (1, 2, 3, 4), "Split": (1,), "Squeeze": (1,), "Unsqueeze": (1,), "TopK": (1,), "Pad": (1,),
    "Resize": (1, 2, 3), "OneHot": (1,), "ReduceMax": (1,), "ReduceMin": (1,), "ReduceMean": (1,),
    "ReduceSum": (1,),
}
# Ops whose output depends on their input's shape only, never its values.
SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})


def _type_name(elem_type: int) -> str:
    return TYPE_NAMES.get(elem_type, TensorProto.DataType.Name(elem_type) if elem_type in
                          TensorProto.DataType.values() else str(elem_type))


def _collect_types(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, int | None]]:
    """name -> element type and name -> rank (None when unknown), after ONNX shape inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 -- inference is a help here, not a requirement
        inferred = model
    g = inferred.graph
    types: dict[str, int] = {}
    ranks: dict[str, int | None] = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        tt = vi.type.tensor_type
        if tt.elem_type:
            types[vi.name] = tt.elem_type
        ranks[vi.name] = len(tt.shape.dim) if tt.HasField("shape") else None
    for init in g.initializer:
        types[init.name] = init.data_type
        ranks[init.name] = len(init.dims)
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
                    ranks[node.output[0]] = len(a.t.dims)
    return types, ranks


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _where(node: onnx.NodeProto) -> str:
    return f"{node.name or '(unnamed)'} ({node.op_type})"


def _value_dependent(model: onnx.ModelProto) -> set[str]:
    """Tensors whose values depend on a graph input's values (not merely on its shape)."""
    tainted = {i.name for i in model.graph.input}
    for node in model.graph.node:  # ONNX nodes are topologically sorted
        if node.op_type in SHAPE_ONLY_OPS:
            continue
        if any(i in tainted for i in node.input if i):
            tainted.update(o for o in node.output if o)
    return tainted


def _check_tensor_scatter(node, ranks, graph_inputs, graph_outputs) -> list[str]:
    out = []
    past, update = node.input[0], node.input[1]
    for label, name in (("past_cache", past), ("update", update)):
        r = ranks.get(name)
        if r is not None and r != 4:
            out.append(f"{_where(node)}: {label} must be 4-D for TensorRT's KV-cache layer, got rank {r}")
    rank = ranks.get(past) or 4
    axis = _attr(node, "axis", -2)
    if axis not in (-2, rank - 2):
        out.append(f"{_where(node)}: axis must be -2 (the sequence axis of (B, nh, S, hs)), got {axis}")
    mode = _attr(node, "mode", b"linear")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "linear":
        out.append(f"{_where(node)}: mode must be 'linear' (TensorRT supports KVCacheMode.LINEAR only), got {mode!r}")
    if past not in graph_inputs:
        out.append(f"{_where(node)}: past_cache {past!r} must be a graph input: TensorRT's KV-cache layer "
                   "updates a network input in place")
    if node.output[0] not in graph_outputs:
        out.append(f"{_where(node)}: its output {node.output[0]!r} must be a graph output bound to the cache's "
                   "address")
    return out


def check_graph_for_tensorrt(model: onnx.ModelProto) -> list[str]:
    """Everything in `model` the TensorRT >= 10.15 ONNX parser/builder would reject; [] means OK.

    Works on a model loaded without its external data (`onnx.load(p, load_external_data=False)`).
    """
    violations: list[str] = []
    lo, hi = OPSET_RANGE
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and not lo <= imp.version <= hi:
            violations.append(f"opset {imp.version}: TensorRT 10.15 parses opsets {lo}..{hi}")

    g = model.graph
    types, ranks = _collect_types(model)
    graph_inputs = {i.name for i in g.input}
    graph_outputs = {o.name for o in g.output}
    constants = {t.name for t in g.initializer} | {n.output[0] for n in g.node if n.op_type == "Constant"}

    io_names = graph_inputs | graph_outputs
    for name, t in sorted(types.items()):
        tn = _type_name(t)
        if tn in TENSOR_TYPES or (tn in IO_ONLY_TYPES and name in io_names):
            continue
        hint = ": export float32 instead" if tn == "DOUBLE" else ""
        violations.append(f"tensor {name!r} has type {tn}, which TensorRT does not support here{hint}")

    dependent = _value_dependent(model)
    for node in g.node:
        where = _where(node)
        if node.domain not in ("", "ai.onnx"):
            violations.append(f"{where}: domain {node.domain!r} is not the standard ONNX domain; "
                              "TensorRT parses standard ops only (or registered plugins)")
            continue
        op = node.op_type
        if op in UNSUPPORTED_OPS:
            violations.append(f"{where}: TensorRT does not support {op} ({SOURCES[UNSUPPORTED_OPS[op]]})")
            continue
        spec = SUPPORTED_OPS.get(op)
        if spec is None:
            violations.append(f"{where}: {op} is not in export/trt_support.py's table of ops checked against "
                              "TensorRT; check onnx-tensorrt's operators.md and add a row")
            continue

        indices = spec.data_inputs if spec.data_inputs else tuple(range(len(node.input)))
        for k in indices:
            if k < len(node.input) and node.input[k] in types:
                tn = _type_name(types[node.input[k]])
                if tn not in spec.types:
                    violations.append(f"{where}: input {k} ({node.input[k]!r}) is {tn}; TensorRT's {op} takes "
                                      f"{', '.join(sorted(spec.types))}")
        if op == "Cast":
            tn = _type_name(_attr(node, "to", 0))
            if tn not in spec.types:
                violations.append(f"{where}: Cast to {tn}; TensorRT casts between {', '.join(sorted(spec.types))}")

        if op == "TensorScatter":
            violations += _check_tensor_scatter(node, ranks, graph_inputs, graph_outputs)
        elif op == "Gelu":
            approx = _attr(node, "approximate", b"none")
            approx = approx.decode() if isinstance(approx, bytes) else approx
            if approx not in ("none", "tanh"):
                violations.append(f"{where}: approximate must be 'none' or 'tanh', got {approx!r}")
        elif op == "Gemm":
            for k in (0, 1):
                r = ranks.get(node.input[k])
                if r is not None and r != 2:
                    violations.append(f"{where}: input {k} is {r}-D; TensorRT's Gemm importer needs 2-D inputs "
                                      "(reshape to (B*K, C) first)")
        elif op == "LayerNormalization":
            if any(o for o in node.output[1:]):
                violations.append(f"{where}: only the first output (Y) is supported by TensorRT")
        elif op.startswith("Reduce") and len(node.input) > 1 and node.input[1]:
            if node.input[1] not in constants:
                violations.append(f"{where}: axes must be an initializer for TensorRT")
        elif op in ("Squeeze", "Unsqueeze") and len(node.input) > 1 and node.input[1]:
            if node.input[1] not in constants:
                violations.append(f"{where}: axes must be resolvable to a constant for TensorRT")
        elif op == "ScatterND" and _attr(node, "reduction", b"none") not in (b"none", "none"):
            violations.append(f"{where}: ScatterND reduction is not supported by TensorRT")
        elif op == "Attention":
            extra = [node.input[k] for k in (4, 5, 6) if k < len(node.input) and node.input[k]]
            if extra or len([o for o in node.output if o]) > 1:
                violations.append(f"{where}: TensorRT's Attention takes no past_key/past_value/nonpad_kv_seqlen "
                                  "and has one output; keep the cache in TensorScatter")

        for k in SHAPE_INPUTS.get(op, ()):
            if k < len(node.input) and node.input[k] in dependent:
                violations.append(
                    f"{where}: input {k} ({node.input[k]!r}) decides an output shape and is computed from a graph "
                    "input's values (a data-dependent shape): TensorRT would need that input as a host shape "
                    "tensor with build-time value ranges. Derive shapes from Shape() of inputs (e.g. attend over "
                    "the fixed cache capacity with a mask) instead")
    return violations


__all__ = ["SUPPORTED_OPS", "UNSUPPORTED_OPS", "SOURCES", "OpSupport", "TRT_MIN_VERSION", "OPSET_RANGE",
           "check_graph_for_tensorrt"]
