"""The physical floor: what this machine's memory bandwidth and matmul rate allow, and what GPT-2 needs.

A decode step of batch 1 is a row vector times every weight matrix: each weight is read once from
DRAM and used for 2 FLOPs, so the step cannot be faster than ``weight bytes / memory bandwidth``.
A prefill of T tokens reuses each weight T times, so it is bound by the matmul rate instead:
``FLOPs / (FLOP/s)``. This module measures the two rates (about a second each) and counts the
bytes and FLOPs, so the harness can print "engine: 1.4x floor" next to every measured number.

Counting (per batch row; n = n_layer, C = n_embd, V = vocab_size, S = keys a token attends to):
  matmul weights       12 * n * C^2 (c_attn 3C^2, attn c_proj C^2, c_fc 4C^2, mlp c_proj 4C^2)
                       + V * C for the LM head (tied to wte)
  FLOPs per token      2 * matmul weights           (one multiply-add per weight)
                       + 4 * n * C * S              (q.k^T and att.v: 2 * C * S each, per layer)
  bytes per decode     every parameter except wpe: matmul weights + LM head, biases and LayerNorms
                       (~0.1% of the total). The embedding lookups gather one row of wte and wpe
                       per token, so the embedding tables are not read as a whole; wte is read
                       whole only in its role as the LM head. Plus the KV cache that attention
                       reads, 2 * n * S * C elements, which is separate (it grows with context).
gpt2 (124M) fp32: 494.6 MB of weights per decode step, ~0.25 GFLOP per decode token.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from engine.config import GPT2Config

# Much larger than any LLC here (32 MB L3 on the 2-core CPU machines), so the pass streams from DRAM.
DEFAULT_BUFFER_MB = 512
# Columns of the bandwidth buffer viewed as a matrix: a 4 KiB row, like a weight matrix of width 1024.
_GEMV_COLS = 1024


@contextmanager
def blas_threads(threads: int) -> Iterator[bool]:
    """Run numpy's BLAS with ``threads`` threads inside the block; yields whether that was possible.

    threadpoolctl sets OpenBLAS/MKL's thread count at run time. Without it the count is fixed when
    numpy loads (OPENBLAS_NUM_THREADS / OMP_NUM_THREADS), so we warn instead of silently measuring
    with a different count than the one reported.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        warnings.warn(
            f"threadpoolctl is not installed: numpy's BLAS runs with its default thread count, "
            f"not {threads}. `pip install threadpoolctl`, or set OPENBLAS_NUM_THREADS={threads} "
            f"before starting Python.",
            stacklevel=3,
        )
        yield False
        return
    with threadpool_limits(limits=threads, user_api="blas"):
        yield True


def _best_time(fn, repeats: int) -> float:
    # Best of N: noise (interrupts, other processes, frequency dips) only ever adds time, so the
    # fastest pass is the closest estimate of what the hardware can do -- which is what a floor is.
    # N is 40-60, not 5: on the shared 2-core VMs best-of-5 measured anywhere from 10 to 25 GB/s with
    # 2 threads (CPU steal); best-of-20 sgemm still read 111 and 176 GFLOP/s in two back-to-back calls,
    # so the window is made longer than such slow phases (~1 s in all).
    fn()  # untimed: faults in pages, spins up BLAS threads
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_memory_bandwidth(threads: int, buffer_mb: float = DEFAULT_BUFFER_MB, repeats: int = 40) -> float:
    """Sustained DRAM read bandwidth in GB/s (1e9 bytes/s), using ``threads`` BLAS threads.

    Access pattern: a float32 GEMV, ``x @ W`` with W a (buffer_mb / 4 KiB, 1024) matrix. That is the
    decode step's own kernel (a row vector times a weight matrix, each weight read once, 2 FLOPs per
    4 bytes), so it streams memory with the same prefetch-friendly sequential reads and the same
    thread split as the engine's MatMuls, and the output (4 KiB) stays in cache. A plain
    ``np.add.reduce`` was tried and rejected: numpy's pairwise summation is compute-bound on one core
    (measured 12.8 GB/s against the GEMV's 22 GB/s), so it under-reports the bandwidth.
    Takes ~0.5 s at the default 512 MB (~2 s when the memory is touched for the first time);
    tests pass a tiny ``buffer_mb``.
    """
    if buffer_mb <= 0:
        raise ValueError(f"buffer_mb must be > 0, got {buffer_mb}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    rows = max(1, int(buffer_mb * 2**20) // (4 * _GEMV_COLS))
    w = np.ones((rows, _GEMV_COLS), dtype=np.float32)  # (rows, 1024): written once, so resident
    x = np.ones(rows, dtype=np.float32)  # (rows,)
    with blas_threads(threads):
        best = _best_time(lambda: x @ w, repeats)  # (1024,)
    return w.nbytes / best / 1e9


def measure_matmul_gflops(
    threads: int, m: int = 512, k: int = 768, n: int = 3072, repeats: int = 60
) -> float:
    """fp32 SGEMM rate in GFLOP/s (1e9 FLOP/s) with ``threads`` BLAS threads.

    The default shape is gpt2's MLP up-projection during a 512-token prefill, (512, 768) x (768, 3072):
    large enough to reach BLAS's peak, and the shape a prefill actually runs. 2*m*k*n FLOPs per call.
    """
    if min(m, k, n) < 1:
        raise ValueError(f"m, k, n must be >= 1, got {(m, k, n)}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)  # (m, k)
    b = rng.standard_normal((k, n), dtype=np.float32)  # (k, n)
    with blas_threads(threads):
        best = _best_time(lambda: a @ b, repeats)  # (m, n)
    return 2.0 * m * k * n / best / 1e9


def decode_floor_s(weight_bytes_per_step: float, bandwidth_Bps: float) -> float:
    """Seconds a decode step needs at least: every byte it must read, at the measured bandwidth."""
    if weight_bytes_per_step < 0:
        raise ValueError(f"weight_bytes_per_step must be >= 0, got {weight_bytes_per_step}")
    if not bandwidth_Bps > 0:
        raise ValueError(f"bandwidth_Bps must be > 0, got {bandwidth_Bps}")
    return weight_bytes_per_step / bandwidth_Bps


def prefill_floor_s(flops: float, flops_per_s: float) -> float:
    """Seconds a compute-bound phase (a prefill) needs at least: its FLOPs at the measured rate."""
    if flops < 0:
        raise ValueError(f"flops must be >= 0, got {flops}")
    if not flops_per_s > 0:
        raise ValueError(f"flops_per_s must be > 0, got {flops_per_s}")
    return flops / flops_per_s


def gpt2_matmul_params(config: GPT2Config) -> int:
    """Weights that take part in matmuls: 12 * n_layer * n_embd^2 in the blocks + the LM head."""
    C = config.n_embd
    return 12 * config.n_layer * C * C + config.vocab_size * C


def gpt2_flops(config: GPT2Config, n_tokens: int, context: float = 0, *, logits_positions: int = 1) -> float:
    """FLOPs for one batch row to process ``n_tokens`` new tokens after ``context`` cached ones.

    Token i (0-based) attends to S_i = context + i + 1 keys (itself included). The LM head runs on
    ``logits_positions`` of the new tokens (capped at n_tokens): 1 for generation, which needs only the last position's
    logits (the floor counts necessary work); ``n_tokens`` to count an implementation that computes
    logits everywhere, as HF does -- the ~130 GFLOP often quoted for a 512-token gpt2 prefill is
    that count, against ~92 GFLOP with one logits position.
    Decode step: ``gpt2_flops(cfg, 1, context)``. Prefill: ``gpt2_flops(cfg, prompt_len)``.
    """
    if n_tokens < 0 or context < 0:
        raise ValueError(f"n_tokens and context must be >= 0, got {n_tokens}, {context}")
    if logits_positions < 0:
        raise ValueError(f"logits_positions must be >= 0, got {logits_positions}")
    C, L = config.n_embd, config.n_layer
    blocks = 2.0 * 12 * L * C * C * n_tokens
    lm_head = 2.0 * config.vocab_size * C * min(logits_positions, n_tokens)
    keys = n_tokens * context + n_tokens * (n_tokens + 1) / 2  # sum of S_i over the new tokens
    attention = 4.0 * L * C * keys
    return blocks + lm_head + attention


def gpt2_weight_bytes(config: GPT2Config, bytes_per_param: float) -> float:
    """Bytes of weights one decode step reads: every parameter but the position table wpe.

    ``bytes_per_param``: 4 for fp32, 2 for fp16, ~1 for int8 weight-only (scales are negligible;
    biases and LayerNorms kept in higher precision are ~0.1% of the parameters and ignored).
    """
    if not bytes_per_param > 0:
        raise ValueError(f"bytes_per_param must be > 0, got {bytes_per_param}")
    return (config.n_params() - config.n_positions * config.n_embd) * bytes_per_param


def gpt2_kv_bytes(config: GPT2Config, context: float, bytes_per_elem: float = 4) -> float:
    """Bytes of KV cache one decode step reads for one row: K and V of ``context`` positions, all layers."""
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    return 2.0 * config.n_layer * context * config.n_embd * bytes_per_elem


def floor_record(
    config: GPT2Config,
    *,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    bytes_per_param: float,
    bandwidth_GBps: float,
    gflops: float,
    kv_bytes_per_elem: float = 4,
) -> dict:
    """The record's ``floor`` field for one configuration, from measured rates (pure arithmetic).

    decode_floor_s is per decode step (so comparable with decode ms/token of a batch-1 run; with a
    batch the step yields ``batch`` tokens): the weights once, the whole batch's KV cache at the mean
    context of the run (prompt_len + new_tokens / 2, exact for the mean since it is linear), and the
    compute bound when that is larger (a roofline: large batches turn decode compute-bound).
    prefill_floor_s is the prompt's FLOPs for the whole batch at the matmul rate.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    bw, fps = bandwidth_GBps * 1e9, gflops * 1e9
    mean_context = prompt_len + new_tokens / 2
    step_bytes = gpt2_weight_bytes(config, bytes_per_param) + batch * gpt2_kv_bytes(
        config, mean_context, kv_bytes_per_elem
    )
    step_flops = batch * gpt2_flops(config, 1, mean_context)
    prefill_flops = batch * gpt2_flops(config, prompt_len)
    return {
        "bandwidth_GBps": bandwidth_GBps,
        "gflops": gflops,
        "bytes_per_param": bytes_per_param,
        "decode_bytes_per_step": step_bytes,
        "decode_floor_s": max(decode_floor_s(step_bytes, bw), prefill_floor_s(step_flops, fps)),
        "prefill_flops": prefill_flops,
        "prefill_floor_s": prefill_floor_s(prefill_flops, fps),
    }
