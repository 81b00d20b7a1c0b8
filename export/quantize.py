"""Weight-only int8 for the CPU: every MatMul weight becomes ONNX Runtime's MatMulNBits (8 bits,
symmetric, per-block scales), computed with int8 kernels (accuracy_level 4). A decode step then reads
~4x fewer weight bytes, which is what bounds it on a CPU (docs/ARCHITECTURE.md, "Known facts": the
byte floor). Activations, LayerNorm, softmax and the KV cache stay fp32."""

from __future__ import annotations

import logging

import onnx

from engine.errors import EngineError

BITS = 8
BLOCK_SIZE = 32         # per-32-weights scales: the accuracy/size trade-off llama.cpp's Q8_0 also makes
ACCURACY_LEVEL = 4      # int8 x int8 compute in MLAS (AVX2 / AVX-512 VNNI / NEON dot kernels)


def quantize_weights_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    except ImportError as e:
        raise EngineError(f"--precision int8 needs onnxruntime's quantization tools ({e}): "
                          "`pip install onnx_ir` (and onnxruntime >= 1.22)") from None
    config = DefaultWeightOnlyQuantConfig(block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=ACCURACY_LEVEL,
                                          bits=BITS, op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(model, bits=BITS, block_size=BLOCK_SIZE, is_symmetric=True,
                                     accuracy_level=ACCURACY_LEVEL, algo_config=config,
                                     op_types_to_quantize=("MatMul",))
    log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = log.level
    log.setLevel(logging.WARNING)  # it logs every node at INFO; the export has its own progress bar
    try:
        quantizer.process()
    finally:
        log.setLevel(level)
    return quantizer.model.model
