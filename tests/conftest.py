"""Shared fixtures for the exporter's tests: checkpoints saved once, artifacts exported once, and the
Hugging Face oracle loaded once per checkpoint, all per test session.

The oracle is `transformers.GPT2LMHeadModel.from_pretrained(ckpt_dir)`: the SAME directory the exporter
reads, written by `save_checkpoint`, so every parity test also exercises the real-weights loading path.

Inits (docs/ARCHITECTURE.md, "Tests: the oracle"):
  PARITY_INIT = 0.02  the default init; the logits tolerance 1e-4 is stated for it.
  DIVERSE_INIT = 0.1  greedy *generation* is diverse (top-2 margin ~1.7): for token-level parity.
Argmaxes over random-token prompts are diverse at 0.02 already (gpt2: 70 distinct in 320 positions),
which is what the fp16 agreement check uses; at 0.1 fp16 itself is less accurate (test_export_parity).
"""

from __future__ import annotations

import gc
import os
import shutil

# Nothing in the test session may reach the network (hub lookups, transformers' own checks).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from engine.config import SIZES, GPT2Config

# Shared runtime fixtures (tiny_model, tiny_gen): registered once here, not imported by each test module.
pytest_plugins = ["tests.runtime_fixtures"]

TINY = GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=50257, n_positions=1024)  # real vocab: real ids
PARITY_INIT = 0.02
DIVERSE_INIT = 0.1
PARITY_TOL = 1e-4  # max |ORT fp32 - HF fp32| logits, at PARITY_INIT


@dataclass(frozen=True)
class Case:
    """One random checkpoint: a size name ('tiny' or a SIZES key), a seed and an init range; and the
    attention variant its graphs are exported with (None: the exporter's default for the precision)."""
    size: str
    seed: int = 0
    init: float = PARITY_INIT
    attention: str | None = None

    @property
    def weights_key(self) -> tuple:
        return self.size, self.seed, self.init

    @property
    def config(self) -> GPT2Config:
        return TINY if self.size == "tiny" else SIZES[self.size]

    @property
    def id(self) -> str:
        return f"{self.size}-s{self.seed}-i{self.init}" + (f"-{self.attention}" if self.attention else "")


class Zoo:
    """Lazily saved checkpoints, exported artifacts, ORT backends and HF models, each made once."""

    def __init__(self, root: Path):
        self.root = root
        self._ckpt: dict[tuple, Path] = {}
        self._art: dict[tuple[Case, str], Path] = {}
        self._backend: dict[tuple[Case, str], object] = {}

    def checkpoint(self, case: Case) -> Path:
        key = case.weights_key
        if key not in self._ckpt:
            from export.checkpoint import random_weights, save_checkpoint
            weights = random_weights(case.config, case.seed, case.init)
            self._ckpt[key] = save_checkpoint(self.root / "ckpt" / "-".join(map(str, key)), case.config, weights)
            del weights
        return self._ckpt[key]

    def artifact(self, case: Case, precision: str = "fp32") -> Path:
        key = (case, precision)
        if key not in self._art:
            from export.exporter import export_model
            extra = {"attention": case.attention} if case.attention else {}
            self._art[key] = export_model(str(self.checkpoint(case)), self.root / "art" / f"{case.id}-{precision}",
                                          precision=precision, show_progress=False, **extra)
        return self._art[key]

    def backend(self, case: Case, precision: str = "fp32"):
        key = (case, precision)
        if key not in self._backend:
            from engine.artifact import load_artifact
            from engine.backends.ort import OrtBackend
            self._backend[key] = OrtBackend(load_artifact(self.artifact(case, precision)))
        return self._backend[key]

    def release(self, case: Case, precision: str = "fp32") -> None:
        """Close one ORT session (the artifact stays on disk for later tests)."""
        be = self._backend.pop((case, precision), None)
        if be is not None:
            be.close()
            gc.collect()


# ---- the oracle -------------------------------------------------------------------------------------

_HF_MODELS: dict[str, object] = {}
_HF_LOGITS: dict[tuple[str, bytes, tuple], np.ndarray] = {}


def hf_model(ckpt_dir: str | Path):
    """GPT2LMHeadModel from `ckpt_dir` (fp32, eager attention: the plain math), cached per directory."""
    key = str(Path(ckpt_dir).resolve())
    if key not in _HF_MODELS:
        import torch
        from transformers import GPT2LMHeadModel
        _HF_MODELS[key] = GPT2LMHeadModel.from_pretrained(key, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    return _HF_MODELS[key]


def hf_logits(ckpt_dir: str | Path, ids) -> np.ndarray:
    """HF logits at every position of `ids` (T,) -> (T, V) or (B, T) -> (B, T, V), float32, memoized."""
    import torch
    ids = np.asarray(ids, dtype=np.int64)
    key = (str(Path(ckpt_dir).resolve()), ids.tobytes(), ids.shape)
    if key not in _HF_LOGITS:
        batch = ids if ids.ndim == 2 else ids[None]
        with torch.no_grad():
            out = hf_model(ckpt_dir)(torch.from_numpy(batch)).logits.float().numpy()  # (B, T, V)
        _HF_LOGITS[key] = out if ids.ndim == 2 else out[0]
    return _HF_LOGITS[key]


def free_hf(ckpt_dir: str | Path | None = None) -> None:
    """Drop cached HF models (all, or one directory's) and their logits, to bound memory."""
    keys = list(_HF_MODELS) if ckpt_dir is None else [str(Path(ckpt_dir).resolve())]
    for k in keys:
        _HF_MODELS.pop(k, None)
    for k in [k for k in _HF_LOGITS if k[0] in keys]:
        del _HF_LOGITS[k]
    gc.collect()


# ---- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    z = Zoo(tmp_path_factory.mktemp("zoo"))
    yield z
    # pytest keeps the last 3 sessions' temp dirs; the zoo is ~5 GB with gpt2 and gpt2-medium in it.
    z._backend.clear()
    free_hf()
    shutil.rmtree(z.root, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_checkpoint(zoo) -> Path:
    """A tiny checkpoint directory (config.json + model.safetensors) at the default init."""
    return zoo.checkpoint(Case("tiny", 0))


@pytest.fixture(scope="session")
def tiny_weights() -> dict[str, np.ndarray]:
    from export.checkpoint import random_weights
    return random_weights(TINY, 0, PARITY_INIT)


@pytest.fixture(scope="session", name="hf_logits")
def hf_logits_fixture():
    return hf_logits
