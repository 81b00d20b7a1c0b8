"""Weight-only int8 for the CPU: every MatMul weight becomes ONNX Runtime's MatMulNBits (8 bits,
symmetric, per-block scales), computed with int8 kernels (accuracy_level 4). A decode step then reads
~4x fewer weight bytes, which is what bounds it on a CPU (docs/ARCHITECTURE.md, "Known facts": the
byte floor). Activations, LayerNorm, softmax and the KV cache stay fp32.

Block size by role (BLOCK_SIZES): one fp32 scale per block of K weights of a column. What a block
costs at run time (ONNX Runtime 1.32, MLAS, int8 compute): the prepacked weight carries a scale and a
block sum per block, so a decode step reads 1 + 8/block bytes per weight (1.25 at block 32, 1.06 at
128), and the kernel's per-block float work shrinks with it; MLAS also quantizes the activations in
blocks of the same size, so a larger block is also coarser activation quantization. Measured on gpt2
(AVX-512 VNNI Xeon, 2 threads, batch 1; the numbers are in tests/test_int8.py and the commit message):

  - the MLP (c_fc, c_proj) and the LM head at 128: ~3/4 of the weights. Harness runs at load ~1.3
    (floor 30-31 GB/s): decode 5.74 ms/token = 1.35x the int8 byte floor, where block 32 everywhere
    measured 6.29 ms = 1.53x in the run before it; a later run 5.27 ms = 1.24x. Interleaved decode
    steps, CPU time per step (what a busy machine cannot distort): 0.80-0.93x of block 32's. Cost:
    ~20% more logit error at init 0.02 (tests/test_int8.py), none in the harness's figures;
  - attention (c_attn, attn c_proj) stays at 32: its inputs are the most sensitive (block 64 there
    raised the mean logit error ~8% on chaotic init-0.1 weights) and it is under a quarter of the bytes.

Rejected, measured the same way: block 128 everywhere (about as fast, 0.79-0.85x; the bench's gpt2
agreement 71.9% and max error 1.12 x std against 75.0% / 0.93 at block 32); block 64 (0.83-0.92x, worse too);
accuracy_level 1/3 for 8 bits (MLAS has no such 8-bit kernel: ~20x slower); DynamicQuantizeLinear +
MatMulInteger (fast, but one activation scale per row: argmax agreement 53-62% vs 75% on the bench's
init-0.1 gpt2); an fp32 LM head (+115 MB per step, 1.9x slower); 4-bit MatMulNBits (0.70x the time,
but 19% / 56% argmax agreement on init 0.1 / 0.02 weights: below the bench's lossy gate).

The "qgemm" kernel (graph.py's _matmul_qgemm; issue 22), for a graph that runs batched steps and
prefill: weights int8 per output column, activations quantized per row at run time (uint8 around 128,
absmax scale) and multiplied on MLAS's U8S8 GEMM (AVX-512 VNNI) by MatMulIntegerToFloat. Which kernel
wins depends on M (rows per matmul): measured on gpt2 (2-core AMD EPYC, avx512_vnni, no AMX; one process
per model, interleaved rounds, three runs at load 2-3.8; docs/bench/README.md "Batched step (issue 22)"),
qgemm against MatMulNBits: decode batch 1 1.02-1.29x (slower: the GEMV path and the per-row
quantization's 3 small ops per matmul), batch 8 0.84-0.94x, batch 16 0.84-0.89x, prefill of 512 tokens
0.65-0.80x (0.44-0.58x fp32's). Accuracy, same gates (tests/test_int8.py): argmax agreement 93.2% and
max logit error 0.171 x std against MatMulNBits' 95.9% / 0.134 (per-row activation scales are coarser
than MatMulNBits' per-block ones; the weights alone per column cost almost nothing: 95.6% / 0.118).
MatMulNBits stays the default; a second graph for batched steps costs the packed qgemm weights
again (gpt2: +139 MB RSS per process beside the 158 MB of the MatMulNBits session). On init-0.1 weights
(128 teacher-forced tokens against the fp32 export, seed 0): 68.8% / 1.20 x std, MatMulNBits 73.4% / 0.93.
"""

from __future__ import annotations

import numpy as np

from engine.errors import EngineError

BITS = 8
ACCURACY_LEVEL = 4      # int8 x int8 compute in MLAS (AVX2 / AVX-512 VNNI / NEON dot kernels)
MIN_BLOCK = 16          # MatMulNBits' smallest block
DEFAULT_BLOCK = 32      # a weight MatMul of no known role (none in today's graph)
# Preferred block per role; a block that does not divide K is halved until it does (no padded blocks:
# gpt2-xl's K=1600 gets 64, the tests' tiny K=64 gets 64).
BLOCK_SIZES = {"attn.c_attn": 32, "attn.c_proj": 32, "mlp.c_fc": 128, "mlp.c_proj": 128, "lm_head": 128}


def matmul_role(node_name: str) -> str | None:
    """The BLOCK_SIZES role of a weight matmul from its node scope (/h.3.attn/c_attn/MatMulNBits, /lm_head/MatMulNBits)."""
    scope = node_name.replace("/", ".")
    return next((role for role in BLOCK_SIZES if f".{role}." in scope), None)


def block_size_for(role: str | None, k: int) -> int:
    block = BLOCK_SIZES.get(role, DEFAULT_BLOCK)
    while block > MIN_BLOCK and k % block:
        block //= 2
    return block


def quantization_info(kernel: str = "matmulnbits") -> dict:
    """What the int8 export did, for the manifest."""
    if kernel == "qgemm":
        return {"op": "com.microsoft.MatMulIntegerToFloat", "bits": BITS, "symmetric": True,
                "weights": "int8 per output column", "activations": "uint8 per row (zero point 128), dynamic"}
    return {"op": "com.microsoft.MatMulNBits", "bits": BITS, "symmetric": True, "accuracy_level": ACCURACY_LEVEL,
            "block_size": dict(BLOCK_SIZES), "block_size_rule": "halved until it divides K"}


def quantize_blocks(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """One (K, N) fp32 weight as MatMulNBits' 8-bit symmetric operands: B (N, K/block, block) uint8 and
    scales (N, K/block) fp32, made by ONNX Runtime's own kernel (what its MatMulNBitsQuantizer calls;
    tests/test_int8.py checks the two agree byte for byte). One weight at a time, so the exporter streams
    int8 weights to model.onnx.data as it builds the graph: quantizing a whole in-memory model (the
    quantizer) took over 24 GB for gpt2-xl and was killed."""
    try:
        from onnxruntime.capi._pybind_state import quantize_matmul_8bits
    except ImportError as e:
        raise EngineError(f"--precision int8 needs onnxruntime's quantize_matmul_8bits ({e}): "
                          "`pip install 'onnxruntime>=1.22'`") from None
    k, n = weight.shape
    if k % block:
        raise ValueError(f"block {block} does not divide K={k}")  # block_size_for never picks one
    packed = np.zeros((n, k // block, block), np.uint8)
    scales = np.zeros((n, k // block), np.float32)
    zero_points = np.zeros((n, k // block), np.uint8)  # written by the kernel, not used: symmetric
    quantize_matmul_8bits(packed, np.ascontiguousarray(weight, np.float32), scales, zero_points, block, n, k, True)
    return packed, scales


def quantize_columns(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One (K, N) fp32 weight as the "qgemm" kernel's operands: int8 (K, N), symmetric, one scale per
    output column ((N,) fp32, absmax / 127). MLAS packs it for its U8S8 GEMM when the session loads."""
    w = np.asarray(weight, np.float32)
    scale = np.maximum(np.abs(w).max(axis=0), np.finfo(np.float32).tiny) / 127                  # (N,)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)                                   # (K, N)
    return q, scale.astype(np.float32)
