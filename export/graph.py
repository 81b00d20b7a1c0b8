"""Build the GPT-2 decoder as an ONNX graph, directly from the checkpoint's arrays (no torch).

The graph reads top-down like the model: embeddings, blocks, final norm, LM head. Every weight keeps
its checkpoint name as the initializer name, and nodes are named by scope (`/h.3/attn/c_attn/MatMul`),
so an error from ONNX Runtime or TensorRT points at the line that made the node.

KV cache: each layer's past key/value is a fixed-capacity buffer (B, nh, S, hs). `TensorScatter`
(opset 24) writes this call's keys/values at each row's slot `cache_positions[b]`; the runtime binds
past and present to one buffer so the write happens in place. Attention masks by absolute position
(key slot <= query position), so rows of a batch may hold different lengths (right padding: a row's
padded tail is written but masked, and overwritten by its next real token). Three forms: ONNX
Runtime's `GroupQueryAttention` (com.microsoft; the CPU default: it also does the cache write and
reads only each row's filled slots), ONNX `Attention` bounded per row by `nonpad_kv_seqlen` (standard
ops, ONNX Runtime CUDA), or elementary ops over the whole capacity (TensorRT, which needs shapes that
do not depend on input values).

Precision: fp32 everywhere, or fp16 for TensorRT (strongly typed): fp16 weights, matmuls and cache,
with an fp32 residual stream, fp32 LayerNorm, fp32 GELU and fp32 softmax, cast explicitly.

Shape alphabet: B batch, T new tokens, S cache capacity, L attended slots, K logits per row,
C n_embd, nh heads, hs head size, V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engine import artifact as io
from engine.config import GPT2Config
from export.quantize import ACCURACY_LEVEL, BITS, block_size_for, quantize_blocks, quantize_columns

FLOAT, FLOAT16, INT32, INT64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT32, TensorProto.INT64
# Large negative additive mask: finite so a fully masked row (never produced here) cannot yield NaN.
MASK_VALUE = -1e30
# The tied LM head's own initializer over wte's bytes (fp32 with external data): a scoped name, since
# it is no checkpoint tensor.
HEAD_ALIAS = "/lm_head/wte.weight"


class ExternalData:
    """Streams weights into one external-data file (model.onnx.data) as the graph is built: a model of
    any size never exists twice in memory while exporting, and ONNX Runtime memory-maps the file when
    it loads, so the weights are file-backed pages (shared with the page cache, no heap copy) and a
    weight that a kernel pre-packs is unmapped again once packed."""

    ALIGN = 4096  # page-aligned offsets let ONNX Runtime memory-map each weight

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = open(self.path, "wb")

    def tensor(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        return self.raw(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape,
                        np.ascontiguousarray(array).tobytes())

    def raw(self, name: str, data_type: int, dims, data: bytes) -> onnx.TensorProto:
        offset = -self._file.tell() % self.ALIGN + self._file.tell()
        self._file.seek(offset)
        self._file.write(data)
        t = onnx.TensorProto(name=name, data_type=data_type, dims=list(dims))
        t.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", self.path.name), ("offset", str(offset)), ("length", str(len(data)))):
            t.external_data.add(key=k, value=v)
        return t

    @staticmethod
    def alias(name: str, tensor: onnx.TensorProto) -> onnx.TensorProto:
        """A second initializer over the same bytes of the file: no second copy on disk. ONNX Runtime
        maps each initializer on its own, so a kernel that pre-packs one (the LM head's Gemm) releases
        its mapping, while another (the embedding's Gather) keeps only the pages it reads."""
        t = onnx.TensorProto()
        t.CopyFrom(tensor)
        t.name = name
        return t

    def close(self) -> None:
        self._file.close()


class _Graph:
    """Accumulates nodes and initializers; `op` names each node by the current scope."""

    def __init__(self, compute_dtype: int, external: ExternalData | None = None):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.scope = ""
        self.compute = compute_dtype  # dtype of matmul weights, activations and cache
        self.external = external
        self.gemm_out_shape: str | None = None  # set: linear layers are 2-D Gemms reshaped to this
        self.skip_norm = False  # residual Add + LayerNorm as one SkipLayerNormalization (the ORT CPU graphs)
        self.int8 = False       # weight matmuls as MatMulNBits, quantized while the graph is built
        self.flat = False       # the token stream is (N, C): both segments' tokens, one row each (gqa)
        self._counts: dict[str, int] = {}
        self._consts: dict[str, np.ndarray] = {}

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, name: str | None = None,
           out: str | None = None, outs: list[str | None] | None = None, **attrs) -> str | list[str]:
        """Add a node; `out` names its (single) output when it is a graph output, `outs` names some of
        several (None: an internal name; "": omitted)."""
        base = f"{self.scope}/{name or op_type}"
        k = self._counts.get(base, 0)
        self._counts[base] = k + 1
        node_name = base if k == 0 else f"{base}_{k}"
        outputs = [out] if out else [f"{node_name}_output_{j}" for j in range(n_out)]
        if outs:
            outputs = [d if o is None else o for o, d in zip(outs, outputs)]  # "": an omitted optional output
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=node_name, **attrs))
        return outputs[0] if n_out == 1 else outputs

    def const(self, name: str, value: np.ndarray) -> str:
        """A small constant, named in the current scope; asked for again there, the same one."""
        full = f"{self.scope}/{name}" if self.scope else name
        value = np.asarray(value)
        if full in self._consts:
            assert np.array_equal(self._consts[full], value) and self._consts[full].dtype == value.dtype, full
            return full
        self._consts[full] = value
        self.initializers.append(numpy_helper.from_array(value, full))
        return full

    def weight(self, key: str, array: np.ndarray, dtype: int) -> str:
        return self.initializer(key, np.ascontiguousarray(array, dtype=np.float16 if dtype == FLOAT16 else np.float32))

    def initializer(self, key: str, array: np.ndarray) -> str:
        """An initializer of this exact array (to the external data when there is one and it is >= 1 KB)."""
        if self.external is not None and array.nbytes >= 1024:
            self.initializers.append(self.external.tensor(key, array))
        else:
            self.initializers.append(numpy_helper.from_array(array, key))
        return key

    def cast(self, x: str, to: int) -> str:
        return self.op("Cast", [x], to=to)


def _matmul_int8(g: _Graph, x: str, key: str, weight: np.ndarray, role: str) -> str:
    """x @ W as MatMulNBits (com.microsoft): W (K, N) quantized here, block size by role
    (export/quantize.py), its operands streamed to the external data like every other weight.
    With g.int8_kernel == "qgemm": MLAS's int8 GEMM instead (export/quantize.py says when each wins)."""
    if getattr(g, "int8_kernel", "matmulnbits") == "qgemm":
        return _matmul_qgemm(g, x, key, weight)
    k, n = weight.shape
    block = block_size_for(role, k)
    packed, scales = quantize_blocks(weight, block)
    B = g.initializer(f"{key}_Q8", packed)
    S = g.initializer(f"{key}_scales", scales)
    return g.op("MatMulNBits", [x, B, S], domain="com.microsoft", K=k, N=n, bits=BITS, block_size=block,
                accuracy_level=ACCURACY_LEVEL)


def _matmul_qgemm(g: _Graph, x: str, key: str, weight: np.ndarray) -> str:
    """x @ W on MLAS's U8S8 GEMM (VNNI): W int8 per output column; each row of x quantized on the fly
    to uint8 around 128 with its own scale (absmax), so a row's result never depends on the others in
    the batch. The 1/127 of both scales is folded into W's column scales; an all-zero row gets scale 0
    and a zero product (its quantized bytes are then arbitrary)."""
    q, col_scale = quantize_columns(weight)                                         # (K, N) int8, (N,)
    Wq = g.initializer(f"{key}_S8", q)
    S = g.initializer(f"{key}_col_scales", col_scale / np.float32(127))
    zp = g.const("zp128", np.array(128, np.uint8))
    amax = g.op("ReduceMax", [g.op("Abs", [x]), g.const("last", np.array([-1], np.int64))], keepdims=1)  # (.., 1)
    xq = g.op("QuantizeLinear", [g.op("Div", [x, amax]), g.const("q127", np.array(1 / 127, np.float32)), zp])  # (.., K) u8
    return g.op("MatMulIntegerToFloat", [xq, Wq, amax, S, zp], domain="com.microsoft")  # (.., N) fp32


def _linear(g: _Graph, x: str, prefix: str, w: dict[str, np.ndarray]) -> str:
    """Conv1D: x @ W + b with W stored (in, out), exactly what MatMul consumes."""
    b = g.weight(f"{prefix}.bias", w[f"{prefix}.bias"], g.compute)
    if g.int8:
        # MatMulNBits then Add: ONNX Runtime folds the bias into the MatMulNBits node when it loads.
        return g.op("Add", [_matmul_int8(g, x, f"{prefix}.weight", w[f"{prefix}.weight"], prefix.split(".", 2)[2]), b])
    W = g.weight(f"{prefix}.weight", w[f"{prefix}.weight"], g.compute)
    if g.flat and g.compute == FLOAT:
        return g.op("Gemm", [x, W, b])                                              # (N, out): rows already 2-D
    if g.gemm_out_shape:
        # fp32: one Gemm over the (B*T, in) rows adds the bias inside the GEMM, where MatMul + Add makes a
        # second pass over the output (prefill 512 measured ~3% faster). int8 keeps MatMul + Add, the
        # pattern the weight-only quantizer rewrites; fp16 keeps the graph TensorRT has been checked on.
        flat = g.op("Reshape", [x, g.const("rows", np.array([-1, w[f"{prefix}.weight"].shape[0]], np.int64))])  # (B*T, in)
        return g.op("Reshape", [g.op("Gemm", [flat, W, b]), g.gemm_out_shape])     # (B, T, out)
    return g.op("Add", [g.op("MatMul", [x, W]), b])


def _layer_norm(g: _Graph, x32: str, prefix: str, w: dict[str, np.ndarray], eps: float) -> str:
    """LayerNorm on the fp32 residual stream (statistics in fp32 in both precisions)."""
    scale = g.weight(f"{prefix}.weight", w[f"{prefix}.weight"], FLOAT)
    bias = g.weight(f"{prefix}.bias", w[f"{prefix}.bias"], FLOAT)
    return g.op("LayerNormalization", [x32, scale, bias], axis=-1, epsilon=eps)


def _residual_norm(g: _Graph, x: str, y: str, prefix: str, w: dict[str, np.ndarray], eps: float) -> tuple[str, str]:
    """The residual sum x + y (fp32) and its LayerNorm. In the ONNX Runtime CPU graphs (g.skip_norm) one
    SkipLayerNormalization (com.microsoft) does both and returns the sum as its 4th output: ORT's own
    fusion skips this pattern because the sum also feeds the next residual. Measured (gpt2, 2 threads,
    batch 1, interleaved): int8 decode 0.94-0.975x, fp32 0.985x; fp32 logits within 1.5e-4."""
    if not g.skip_norm:
        x = g.op("Add", [x, y])
        return x, _layer_norm(g, x, prefix, w, eps)
    scale = g.weight(f"{prefix}.weight", w[f"{prefix}.weight"], FLOAT)
    bias = g.weight(f"{prefix}.bias", w[f"{prefix}.bias"], FLOAT)
    normed, _, _, total = g.op("SkipLayerNormalization", [x, y, scale, bias], n_out=4, domain="com.microsoft",
                               outs=[None, "", "", None], epsilon=eps)
    return total, normed


def _gelu_tanh(g: _Graph, x: str) -> str:
    """GPT-2's gelu_new: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), one ONNX Gelu (opset 20)
    node in fp32; ONNX Runtime and TensorRT (kGELU_TANH) each run it as one kernel."""
    return g.op("Gelu", [x], approximate="tanh")


def _attention(g: _Graph, h: str, i: int, cfg: GPT2Config, w: dict[str, np.ndarray], ctx: dict[str, str]) -> str:
    C, nh, hs = cfg.n_embd, cfg.n_head, cfg.head_dim
    p = f"h.{i}.attn"
    g.scope = f"/{p}/c_attn"
    qkv = _linear(g, h, f"{p}.c_attn", w)                                          # (B, T, 3C)
    g.scope = f"/{p}"
    if ctx["variant"] == "gqa":
        y = _attention_segments(g, qkv, i, cfg, ctx)                                # (N, C)
        g.scope = f"/{p}/c_proj"
        return _linear(g, y, f"{p}.c_proj", w)                                      # (N, C)
    q, k, v = g.op("Split", [qkv, g.const("split", np.array([C, C, C], np.int64))], n_out=3, axis=-1)
    heads = g.const("heads_shape", np.array([0, 0, nh, hs], np.int64))
    q, k, v = (g.op("Transpose", [g.op("Reshape", [t, heads])], perm=[0, 2, 1, 3]) for t in (q, k, v))  # (B, nh, T, hs)

    # In-place cache write at each row's slot; the runtime aliases past and present.
    past_k, past_v = io.past_key(i), io.past_value(i)
    present_k = g.op("TensorScatter", [past_k, k, io.CACHE_POSITIONS], name="key_cache/TensorScatter",
                     out=io.present_key(i), axis=-2)                               # (B, nh, S, hs)
    present_v = g.op("TensorScatter", [past_v, v, io.CACHE_POSITIONS], name="value_cache/TensorScatter",
                     out=io.present_value(i), axis=-2)                             # (B, nh, S, hs)

    if ctx["variant"] == "fused":
        # ONNX Attention reads the whole cache in place: nonpad_kv_seqlen = cache_positions + T bounds
        # each row's keys, and is_causal's bottom-right alignment (offset = nonpad - T = the row's
        # position) is exactly our causal mask. No slice copy, no mask tensor.
        y = g.op("Attention", [q, present_k, present_v, "", "", "", ctx["kv_len"]], is_causal=1)  # (B, nh, T, hs)
        y = g.op("Transpose", [y], perm=[0, 2, 1, 3])                              # (B, T, nh, hs)
    else:
        y = _attention_ops(g, q, present_k, present_v, hs, ctx)                     # (B, T, nh, hs)
    y = g.op("Reshape", [y, g.const("merge_shape", np.array([0, 0, C], np.int64))])  # (B, T, C)
    g.scope = f"/{p}/c_proj"
    return _linear(g, y, f"{p}.c_proj", w)                                          # (B, T, C)


def _attention_segments(g: _Graph, qkv: str, i: int, cfg: GPT2Config, ctx: dict[str, str]) -> str:
    """The two segments' attention over their own views of the slot pool: the first segment's rows
    (decode steps; or a prompt when nothing decodes) in GroupQueryAttention, the chunk segment's rows
    (prompt chunks at any positions) in elementary ops. Returns (N, C): first segment's tokens first."""
    C = cfg.n_embd
    qkv_a, qkv_b = g.op("Split", [qkv, ctx["split_tokens"]], n_out=2, axis=0)    # (N_a, 3C), (N_b, 3C)
    y_a = _attention_gqa(g, g.op("Reshape", [qkv_a, ctx["qkv_shape"]]), i, cfg, ctx)  # (B, T, C)
    y_a = g.op("Reshape", [y_a, g.const("rows_c", np.array([-1, C], np.int64))])  # (N_a, C)
    y_b = _attention_chunk(g, qkv_b, i, cfg, ctx)                                   # (N_b, C)
    return g.op("Concat", [y_a, y_b], axis=0)                                       # (N, C)


def _attention_gqa(g: _Graph, qkv: str, i: int, cfg: GPT2Config, ctx: dict[str, str]) -> str:
    """ONNX Runtime's GroupQueryAttention (com.microsoft) with as many KV heads as query heads: it reads
    c_attn's packed (B, T, 3C) output as is (no Split/Transpose), writes the new keys/values into the
    shared past/present buffer at each row's slot and attends over each row's own filled length only
    (seqlens_k), where ONNX Attention scans the whole capacity. Limits (ORT's): T > 1 on top of a
    filled cache needs batch 1 (the chunk segment takes such rows), and no empty batch (ORT 1.32
    crashes on one: the engine puts its rows in this segment whenever a step has any)."""
    y, _, _ = g.op("GroupQueryAttention", [qkv, "", "", io.past_key(i), io.past_value(i),
                                           ctx["seqlens_k"], ctx["total_len"]], n_out=3,
                   outs=[None, io.present_key(i), io.present_value(i)], domain="com.microsoft",
                   num_heads=cfg.n_head, kv_num_heads=cfg.n_head)
    return y


def _attention_chunk(g: _Graph, qkv: str, i: int, cfg: GPT2Config, ctx: dict[str, str]) -> str:
    """The chunk segment: rows of T new tokens each at any positions (right-padded), which no ORT CPU
    attention kernel takes at batch > 1 on a filled cache. TensorScatter writes the new keys/values in
    place (the runtime binds chunk past and present to one view of the pool); scores cover the slots
    [0, L), L = the longest row's filled length after this call, under the per-row causal mask. Every
    op here accepts an empty batch, so a step without chunk rows pays only a few empty kernels."""
    C, hs = cfg.n_embd, cfg.head_dim
    g.scope = f"/h.{i}/attn/chunk"
    qkv = g.op("Reshape", [qkv, ctx["chunk_heads_shape"]])                         # (Bc, Tc, 3 nh, hs)
    qkv = g.op("Transpose", [qkv], perm=[0, 2, 1, 3])                               # (Bc, 3 nh, Tc, hs)
    q, k, v = g.op("Split", [qkv], n_out=3, axis=1, num_outputs=3)                  # (Bc, nh, Tc, hs) each
    chunk_pos = io.chunk_name(io.CACHE_POSITIONS)
    present_k = g.op("TensorScatter", [io.chunk_name(io.past_key(i)), k, chunk_pos], name="key_cache/TensorScatter",
                     out=io.chunk_name(io.present_key(i)), axis=-2)                 # (Bc, nh, S, hs)
    present_v = g.op("TensorScatter", [io.chunk_name(io.past_value(i)), v, chunk_pos], name="value_cache/TensorScatter",
                     out=io.chunk_name(io.present_value(i)), axis=-2)               # (Bc, nh, S, hs)
    zero, axis2 = g.const("zero1", np.array([0], np.int64)), g.const("axis2", np.array([2], np.int64))
    keys = g.op("Slice", [present_k, zero, ctx["chunk_L"], axis2])                  # (Bc, nh, L, hs)
    values = g.op("Slice", [present_v, zero, ctx["chunk_L"], axis2])                # (Bc, nh, L, hs)
    q = g.op("Mul", [q, g.const("scale", np.float32(1.0 / math.sqrt(hs)))])
    scores = g.op("MatMul", [q, g.op("Transpose", [keys], perm=[0, 1, 3, 2])])     # (Bc, nh, Tc, L)
    probs = g.op("Softmax", [g.op("Add", [scores, ctx["chunk_mask"]])], axis=-1)    # (Bc, nh, Tc, L)
    y = g.op("Transpose", [g.op("MatMul", [probs, values])], perm=[0, 2, 1, 3])    # (Bc, Tc, nh, hs)
    return g.op("Reshape", [y, g.const("rows_c", np.array([-1, C], np.int64))])    # (N_b, C)


def _attention_ops(g: _Graph, q: str, present_k: str, present_v: str, hs: int, ctx: dict[str, str]) -> str:
    """Attention from elementary ops, for parsers without ONNX Attention over a cache (TensorRT): every
    slot of the fixed-capacity cache under an additive causal mask. Attended length = the cache's
    static capacity, never a value computed from an input, which TensorRT would need as a shape tensor."""
    scores = g.op("MatMul", [q, g.op("Transpose", [present_k], perm=[0, 1, 3, 2])])  # (B, nh, T, S)
    scores = g.op("Mul", [_to_residual(g, scores), g.const("scale", np.float32(1.0 / math.sqrt(hs)))])
    probs = g.op("Softmax", [g.op("Add", [scores, ctx["mask"]])], axis=-1)          # (B, nh, T, S) fp32
    probs = _to_compute(g, probs)
    return g.op("Transpose", [g.op("MatMul", [probs, present_v])], perm=[0, 2, 1, 3])  # (B, T, nh, hs)


def _mlp(g: _Graph, h: str, i: int, w: dict[str, np.ndarray]) -> str:
    p = f"h.{i}.mlp"
    g.scope = f"/{p}/c_fc"
    a = _linear(g, h, f"{p}.c_fc", w)                                               # (B, T, 4C)
    g.scope = f"/{p}/gelu"
    a = _to_compute(g, _gelu_tanh(g, _to_residual(g, a)))                       # GELU in fp32
    g.scope = f"/{p}/c_proj"
    return _linear(g, a, f"{p}.c_proj", w)                                          # (B, T, C)


def _to_residual(g: _Graph, x: str) -> str:
    """To fp32 (the residual stream, softmax, GELU); a no-op in the fp32 graph."""
    return g.cast(x, FLOAT) if g.compute != FLOAT else x


def _to_compute(g: _Graph, x: str) -> str:
    return g.cast(x, g.compute) if g.compute != FLOAT else x


def _positions_and_mask(g: _Graph, cfg: GPT2Config, attention: str) -> dict[str, str]:
    """Shared per-call values: absolute positions, each row's key count and (for the elementary-ops
    attention) the attended length L and the additive causal mask."""
    g.scope = "/positions"
    T1 = g.op("Slice", [g.op("Shape", [io.INPUT_IDS]), g.const("one1", np.array([1], np.int64)),
                        g.const("two1", np.array([2], np.int64))])                  # (1,) = T
    T = g.op("Squeeze", [T1])                                                       # () = T
    steps = g.op("Range", [g.const("zero", np.int64(0)), T, g.const("one", np.int64(1))])  # (T,)
    positions = g.op("Add", [g.op("Unsqueeze", [io.CACHE_POSITIONS, g.const("axis1", np.array([1], np.int64))]),
                             g.op("Unsqueeze", [steps, g.const("axis0", np.array([0], np.int64))])])  # (B, T)
    if attention == "fused":
        return {"variant": "fused", "positions": positions,
                "kv_len": g.op("Add", [io.CACHE_POSITIONS, T1])}                    # (B,) keys per row
    if attention == "gqa":
        return _segments(g, cfg, positions, T1)
    g.scope = "/mask"
    S = g.op("Gather", [g.op("Shape", [io.past_key(0)]), g.const("seq_axis", np.int64(2))])  # () = S, static per engine
    key_pos = g.op("Range", [g.const("zero", np.int64(0)), S, g.const("one", np.int64(1))])  # (S,)
    allowed = g.op("LessOrEqual", [
        g.op("Unsqueeze", [key_pos, g.const("axes01", np.array([0, 1], np.int64))]),           # (1, 1, S)
        g.op("Unsqueeze", [positions, g.const("axis2", np.array([2], np.int64))])])            # (B, T, 1) -> (B, T, S)
    mask = g.op("Where", [allowed, g.const("zero_f", np.float32(0.0)), g.const("neg", np.float32(MASK_VALUE))])
    mask = g.op("Unsqueeze", [mask, g.const("axis1", np.array([1], np.int64))])    # (B, 1, T, S) fp32
    return {"variant": "ops", "positions": positions, "mask": mask}


def _segments(g: _Graph, cfg: GPT2Config, positions: str, T1: str) -> dict[str, str]:
    """The GroupQueryAttention graphs' two segments: the first (B, T) rows and the chunk segment's
    (Bc, Tc) rows, flattened into one token stream (N, C) = (B*T + Bc*Tc, C) that every matmul reads
    once; attention splits it again (_attention_segments). Per-call values for both segments."""
    one = g.const("one1", np.array([1], np.int64))
    flat = g.const("flat", np.array([-1], np.int64))
    kv_len = g.op("Add", [io.CACHE_POSITIONS, T1])                                  # (B,) keys per row
    ctx = {"variant": "gqa",
           "seqlens_k": g.cast(g.op("Sub", [kv_len, one]), INT32),                  # (B,) int32
           "total_len": g.cast(g.op("ReduceMax", [kv_len], keepdims=0), INT32)}     # () int32
    shape = g.op("Shape", [io.INPUT_IDS])                                           # (2,) = [B, T]
    ctx["qkv_shape"] = g.op("Concat", [shape, g.const("qkv_width", np.array([-1], np.int64))], axis=0)  # [B, T, -1]

    g.scope = "/chunk_positions"
    c_ids, c_pos = io.chunk_name(io.INPUT_IDS), io.chunk_name(io.CACHE_POSITIONS)
    c_shape = g.op("Shape", [c_ids])                                                # (2,) = [Bc, Tc]
    c_T1 = g.op("Slice", [c_shape, one, g.const("two1", np.array([2], np.int64))])  # (1,) = Tc
    c_steps = g.op("Range", [g.const("zero", np.int64(0)), g.op("Squeeze", [c_T1]), g.const("one", np.int64(1))])  # (Tc,)
    c_positions = g.op("Add", [g.op("Unsqueeze", [c_pos, g.const("axis1", np.array([1], np.int64))]),
                               g.op("Unsqueeze", [c_steps, g.const("axis0", np.array([0], np.int64))])])  # (Bc, Tc)
    # L: the slots any chunk row attends (at least 1, so an empty segment's shapes stay valid).
    L = g.op("Max", [g.op("ReduceMax", [g.op("Add", [c_pos, c_T1])], keepdims=1), one])  # (1,)
    key_pos = g.op("Range", [g.const("zero", np.int64(0)), g.op("Squeeze", [L]), g.const("one", np.int64(1))])  # (L,)
    allowed = g.op("LessOrEqual", [
        g.op("Unsqueeze", [key_pos, g.const("axes01", np.array([0, 1], np.int64))]),           # (1, 1, L)
        g.op("Unsqueeze", [c_positions, g.const("axis2", np.array([2], np.int64))])])          # (Bc, Tc, 1) -> (Bc, Tc, L)
    mask = g.op("Where", [allowed, g.const("zero_f", np.float32(0.0)), g.const("neg", np.float32(MASK_VALUE))])
    ctx["chunk_mask"] = g.op("Unsqueeze", [mask, g.const("axis1", np.array([1], np.int64))])  # (Bc, 1, Tc, L)
    ctx["chunk_L"] = L
    ctx["chunk_heads_shape"] = g.op("Concat", [c_shape, g.const("heads", np.array([3 * cfg.n_head, cfg.head_dim], np.int64))],
                                    axis=0)                                         # (4,) = [Bc, Tc, 3 nh, hs]

    g.scope = "/tokens"
    n_a = g.op("ReduceProd", [shape], keepdims=1)                                   # (1,) = B*T
    n_b = g.op("ReduceProd", [c_shape], keepdims=1)                                 # (1,) = Bc*Tc
    ctx["split_tokens"] = g.op("Concat", [n_a, n_b], axis=0)                       # (2,)
    ctx["ids"] = g.op("Concat", [g.op("Reshape", [io.INPUT_IDS, flat]), g.op("Reshape", [c_ids, flat])], axis=0)  # (N,)
    ctx["positions"] = g.op("Concat", [g.op("Reshape", [positions, flat]), g.op("Reshape", [c_positions, flat])],
                            axis=0)                                                 # (N,)
    # Logits rows: each segment's (row, index) -> its token's row in the flat stream.
    g.scope = "/logits_rows"
    rows = []
    for ids_shape, indices, offset in ((shape, io.LOGITS_INDICES, None), (c_shape, io.chunk_name(io.LOGITS_INDICES), n_a)):
        B = g.op("Squeeze", [g.op("Slice", [ids_shape, g.const("zero1", np.array([0], np.int64)), one])])  # ()
        T = g.op("Slice", [ids_shape, one, g.const("two1", np.array([2], np.int64))])                      # (1,)
        starts = g.op("Mul", [g.op("Range", [g.const("zero", np.int64(0)), B, g.const("one", np.int64(1))]), T])  # (B,)
        if offset is not None:
            starts = g.op("Add", [starts, offset])
        r = g.op("Add", [indices, g.op("Unsqueeze", [starts, g.const("axis1", np.array([1], np.int64))])])  # (B, K)
        rows.append(g.op("Reshape", [r, flat]))                                     # (B*K,)
    ctx["logits_rows"] = g.op("Concat", rows, axis=0)                               # (K_a + K_b,)
    ctx["split_logits"] = g.op("Concat", [g.op("Reshape", [g.op("Size", [t]), one])
                                          for t in (io.LOGITS_INDICES, io.chunk_name(io.LOGITS_INDICES))], axis=0)  # (2,)
    return ctx


ATTENTION_VARIANTS = ("fused", "ops", "gqa")


def default_attention(precision: str) -> str:
    """GroupQueryAttention for the ONNX Runtime CPU graphs (fp32, int8): it attends over each row's
    filled length where ONNX Attention scans the whole capacity (gpt2 batch 8, capacity 1024, measured
    33 vs 81 ms per step); elementary ops for the fp16 graph that TensorRT parses."""
    return "ops" if precision == "fp16" else "gqa"


def resolve_attention(precision: str, attention: str | None) -> str:
    """The attention variant to build: the precision's default, or `attention` if it fits; ValueError
    (a message for users) otherwise."""
    attention = attention or default_attention(precision)
    if attention not in ATTENTION_VARIANTS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_VARIANTS)}, got {attention!r}")
    if attention == "gqa" and precision == "fp16":
        raise ValueError("attention 'gqa' (ONNX Runtime's CPU GroupQueryAttention) is for the fp32/int8 graphs; "
                         "the fp16 graph is for TensorRT: use attention 'ops' (its default) or 'fused'")
    return attention


def build_decoder_graph(cfg: GPT2Config, weights: dict[str, np.ndarray], precision: str = "fp32",
                        attention: str | None = None,
                        progress: Callable[[int], None] | None = None,
                        external_data: str | Path | None = None) -> onnx.ModelProto:
    """The whole decoder. `weights` uses hub names without the `transformer.` prefix.

    attention: "gqa" (ORT GroupQueryAttention), "fused" (one ONNX Attention node per layer) or "ops"
    (MatMul/Softmax); default by precision.
    `progress(n)` is called once per block built (for a progress bar).
    external_data: a file beside the future model.onnx to stream the weights into (past 2 GB).
    """
    if precision not in io.PRECISIONS:
        raise ValueError(f"precision must be one of {io.PRECISIONS}, got {precision!r}")
    attention = resolve_attention(precision, attention)
    external = ExternalData(external_data) if external_data else None
    try:
        return _build(cfg, weights, precision, attention, progress, _Graph(FLOAT16 if precision == "fp16" else FLOAT, external))
    finally:
        if external:
            external.close()


def _build(cfg: GPT2Config, weights: dict[str, np.ndarray], precision: str, attention: str,
           progress: Callable[[int], None] | None, g: _Graph) -> onnx.ModelProto:
    ctx = _positions_and_mask(g, cfg, attention)
    g.int8 = precision == "int8"
    g.flat = attention == "gqa"  # two segments, one (N, C) token stream
    if precision == "fp32" and not g.flat:
        g.gemm_out_shape = g.op("Concat", [g.op("Shape", [io.INPUT_IDS]), g.const("last_dim", np.array([-1], np.int64))],
                                axis=0)                                             # (3,) = [B, T, -1]

    # Embeddings: token + learned position, summed into the fp32 residual stream.
    g.scope = "/embeddings"
    wte = g.weight("wte.weight", weights["wte.weight"], g.compute)                 # (V, C)
    wpe = g.weight("wpe.weight", weights["wpe.weight"], g.compute)                 # (n_positions, C)
    eps = cfg.layer_norm_epsilon
    g.skip_norm = attention == "gqa"  # com.microsoft is imported anyway; TensorRT / CUDA graphs keep ONNX ops
    # Each residual sum is made together with the LayerNorm that reads it (_residual_norm); the last
    # block's MLP sum goes to the LM head's row gather first.
    ids = ctx.get("ids", io.INPUT_IDS)                                              # (B, T), or (N,) flat
    x, y = _to_residual(g, g.op("Gather", [wte, ids])), _to_residual(g, g.op("Gather", [wpe, ctx["positions"]]))
    for i in range(cfg.n_layer):
        g.scope = f"/h.{i}/ln_1"
        x, h = _residual_norm(g, x, y, f"h.{i}.ln_1", weights, eps)              # (B, T, C) fp32: embeddings / previous MLP
        a = _attention(g, _to_compute(g, h), i, cfg, weights, ctx)
        g.scope = f"/h.{i}/ln_2"
        x, h = _residual_norm(g, x, _to_residual(g, a), f"h.{i}.ln_2", weights, eps)  # (B, T, C) fp32: + attention
        y = _to_residual(g, _mlp(g, _to_compute(g, h), i, weights))
        if progress:
            progress(1)
    g.scope = f"/h.{cfg.n_layer - 1}"
    x = g.op("Add", [x, y], name="mlp_residual/Add")                               # (B, T, C) fp32

    # Only the requested positions go through the final norm and the LM head.
    g.scope = "/logits"
    if g.flat:
        x = g.op("Gather", [x, ctx["logits_rows"]], axis=0)                         # (K_a + K_b, C)
    else:
        idx = g.op("Unsqueeze", [io.LOGITS_INDICES, g.const("last", np.array([-1], np.int64))])  # (B, K, 1)
        x = g.op("GatherND", [x, idx], batch_dims=1)                                # (B, K, C)
    g.scope = "/ln_f"
    x = _to_compute(g, _layer_norm(g, x, "ln_f", weights, cfg.layer_norm_epsilon))
    g.scope = "/lm_head"
    head_key = "lm_head.weight" if "lm_head.weight" in weights else "wte.weight"  # fine-tunes may untie it
    flat = g.op("Reshape", [x, g.const("flat", np.array([-1, cfg.n_embd], np.int64))])  # (B*K, C)
    if precision == "int8":
        # The head (a third of the bytes a decode step reads) in int8 too, quantized from its (C, V)
        # transpose; the embedding Gather keeps fp32 wte.
        logits = _matmul_int8(g, flat, f"{head_key}.T", weights[head_key].T, "lm_head")  # (B*K, V)
    else:
        head = head_key if head_key == "wte.weight" else g.weight(head_key, weights[head_key], g.compute)
        wte_tensor = next(t for t in g.initializers if t.name == wte)
        if precision == "fp32" and head == wte and wte_tensor.data_location == onnx.TensorProto.EXTERNAL:
            # The tied head reads wte through an initializer of its own over the same bytes of
            # model.onnx.data: ONNX Runtime pre-packs the head's Gemm weight and unmaps its source,
            # while the embedding Gather's mapping keeps only the rows it reads. With one shared
            # initializer all of wte stays resident beside its packed copy (gpt2: +147 MB, 0.3x the weights).
            g.initializers.append(ExternalData.alias(HEAD_ALIAS, wte_tensor))
            head = HEAD_ALIAS
        logits = g.op("Gemm", [flat, head], transB=1)                               # (B*K, V)
    vocab = g.const("vocab", np.array([cfg.vocab_size], np.int64))
    if g.flat:  # each segment's rows back to its (B, K, V)
        parts = g.op("Split", [logits, ctx["split_logits"]], n_out=2, axis=0)      # (K_a, V), (K_b, V)
        for part, indices, name in ((parts[0], io.LOGITS_INDICES, io.LOGITS),
                                    (parts[1], io.chunk_name(io.LOGITS_INDICES), io.chunk_name(io.LOGITS))):
            g.op("Reshape", [part, g.op("Concat", [g.op("Shape", [indices]), vocab], axis=0)], out=name)  # (B, K, V)
    else:
        out_shape = g.op("Concat", [g.op("Shape", [io.LOGITS_INDICES]), vocab], axis=0)
        logits = g.op("Reshape", [logits, out_shape])                               # (B, K, V)
        if g.compute != FLOAT:
            logits = g.op("Cast", [logits], out=io.LOGITS, to=FLOAT)                 # (B, K, V) fp32
        else:
            g.nodes[-1].output[0] = io.LOGITS  # rename the Reshape's output: no extra node in fp32

    spec = io.io_spec(cfg, precision, chunk_segment=g.flat)
    dtype_of = {"int64": INT64, "float32": FLOAT, "float16": FLOAT16}
    inputs = [helper.make_tensor_value_info(t["name"], dtype_of[t["dtype"]], t["shape"]) for t in spec["inputs"]]
    outputs = [helper.make_tensor_value_info(t["name"], dtype_of[t["dtype"]], t["shape"]) for t in spec["outputs"]]
    graph = helper.make_graph(g.nodes, "gpt2_decoder", inputs, outputs, g.initializers)
    opsets = [helper.make_opsetid("", io.OPSET)]
    if attention == "gqa":
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets,
                              producer_name="gpt2-engine")
    model.ir_version = 10  # the newest IR that ONNX Runtime 1.2x and TensorRT 10.x both read
    return model
