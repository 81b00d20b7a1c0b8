"""Pure bookkeeping for the TensorRT backend: profiles, per-step shapes, buffer sizes. Runs on CPU.

The engine has two optimization profiles, in this order (see engine/trt_build.plan_profiles):
  0 prefill: seq 1..max_prompt new tokens, n_logits 1..max_prompt
  1 decode:  seq = 1, n_logits = 1 (the steady state of generation, tuned on its own)
Both cover batch 1..max_batch and one fixed cache capacity: TensorRT's KV-cache layer needs a static
sequence dimension, so an engine serves exactly one capacity.

Shapes are resolved from engine.artifact.io_spec (the graph I/O declared once as data), never from
name literals here.
"""

from __future__ import annotations

import math

import numpy as np

from engine import artifact as io
from engine.config import GPT2Config
from engine.errors import InputError

PREFILL, DECODE = 0, 1
PROFILE_NAMES = ("prefill", "decode")

_ITEMSIZE = {"int64": 8, "float32": 4, "float16": 2}


def choose_profile(seq: int, n_logits: int) -> int:
    """Decode profile for the one-token, one-logit step; prefill for everything else."""
    return DECODE if seq == 1 and n_logits == 1 else PREFILL


def resolve_shape(shape: list, dims: dict[str, int]) -> tuple[int, ...]:
    """io_spec shape (ints and symbolic names) -> concrete shape, e.g. ['batch', 12, 'capacity', 64]."""
    return tuple(int(dims[d]) if isinstance(d, str) else int(d) for d in shape)


def step_shapes(config: GPT2Config, precision: str, batch: int, seq: int, n_logits: int,
                capacity: int) -> dict[str, tuple[int, ...]]:
    """Every graph input's shape for one step: what `set_input_shape` receives, by name."""
    dims = {"batch": batch, "seq": seq, "n_logits": n_logits, "capacity": capacity}
    return {t["name"]: resolve_shape(t["shape"], dims) for t in io.io_spec(config, precision)["inputs"]}


def output_shapes(config: GPT2Config, precision: str, batch: int, n_logits: int,
                  capacity: int) -> dict[str, tuple[int, ...]]:
    dims = {"batch": batch, "n_logits": n_logits, "capacity": capacity}
    return {t["name"]: resolve_shape(t["shape"], dims) for t in io.io_spec(config, precision)["outputs"]}


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * _ITEMSIZE[dtype]


def cache_buffer_nbytes(config: GPT2Config, precision: str, batch: int, capacity: int) -> dict[str, int]:
    """One device buffer per past input (its present output aliases it): name -> bytes."""
    dims = {"batch": batch, "capacity": capacity}
    out = {}
    pasts = {p for p, _ in io.cache_io_pairs(config.n_layer)}
    for t in io.io_spec(config, precision)["inputs"]:
        if t["name"] in pasts:
            out[t["name"]] = _nbytes(resolve_shape(t["shape"], dims), t["dtype"])  # (B, nh, S, hs)
    return out


def input_buffer_nbytes(config: GPT2Config, precision: str, max_batch: int, max_prompt: int) -> dict[str, int]:
    """The per-step inputs (ids, positions, logits indices) at their largest: allocated once."""
    dims = {"batch": max_batch, "seq": max_prompt, "n_logits": max_prompt}
    pasts = {p for p, _ in io.cache_io_pairs(config.n_layer)}
    return {t["name"]: _nbytes(resolve_shape(t["shape"], dims), t["dtype"])
            for t in io.io_spec(config, precision)["inputs"] if t["name"] not in pasts}


def logits_nbytes(config: GPT2Config, batch: int, n_logits: int) -> int:
    """float32 (B, K, V): sized per call, since K = all prompt positions (perplexity) is rare and large."""
    return batch * n_logits * config.vocab_size * _ITEMSIZE["float32"]


def check_step(input_ids: np.ndarray, cache_positions: np.ndarray, logits_indices: np.ndarray, *,
               cache_batch: int, capacity: int, max_batch: int, max_prompt: int) -> tuple[int, int, int]:
    """Validate one forward call against the engine's profiles and the cache; return (B, T, K)."""
    if input_ids.ndim != 2 or cache_positions.ndim != 1 or logits_indices.ndim != 2:
        raise InputError(f"expected input_ids (B, T), cache_positions (B,), logits_indices (B, K); got shapes "
                         f"{input_ids.shape}, {cache_positions.shape}, {logits_indices.shape}")
    B, T = input_ids.shape
    K = logits_indices.shape[1]
    if B != cache_batch or cache_positions.shape[0] != B or logits_indices.shape[0] != B:
        raise InputError(f"batch must match the cache's {cache_batch} rows, got input_ids {input_ids.shape}, "
                         f"cache_positions {cache_positions.shape}, logits_indices {logits_indices.shape}")
    if not 1 <= B <= max_batch:
        raise InputError(f"batch must be in [1, {max_batch}] for this engine, got {B}")
    if not 1 <= T <= max_prompt:
        raise InputError(f"new tokens per call must be in [1, {max_prompt}] for this engine, got {T}")
    if not 1 <= K <= max_prompt:
        raise InputError(f"logits per row must be in [1, {max_prompt}] for this engine, got {K}")
    if B and (cache_positions.min() < 0 or cache_positions.max() + T > capacity):
        raise InputError(f"cache_positions + new tokens must stay within the cache capacity {capacity}, got "
                         f"positions {cache_positions.min()}..{cache_positions.max()} with {T} new tokens")
    if B and (logits_indices.min() < 0 or logits_indices.max() >= T):
        raise InputError(f"logits_indices must be in [0, {T}), got {logits_indices.min()}..{logits_indices.max()}")
    return B, T, K
