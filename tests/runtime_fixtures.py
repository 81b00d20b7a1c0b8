"""Models and helpers shared by the runtime's tests (generate, cache, errors, concurrency, CLI).

Each model is a random checkpoint saved with `save_checkpoint` (what HF's `from_pretrained` reads: the
oracle) and exported from that same directory, so the engine and the oracle see identical weights.
Checkpoints and artifacts are made at most once per test session (memoized by the session's temp
root); loaded Generators and HF models are module-scoped, so memory is bounded per test module.

Init range 0.1 (0.3 for the 2-layer tiny config), not GPT-2's 0.02: with 0.02 a random GPT-2's greedy
output is nearly one token repeated, so token-level parity would prove little (docs/ARCHITECTURE.md,
"Tests: the oracle").

The fixtures (tiny_model, tiny_gen) are registered for every test module by conftest.py's
`pytest_plugins`; helpers and constants are imported by name.
"""

from __future__ import annotations

import os

# Nothing in these tests may reach the network (hub lookups, transformers' own checks).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from engine.config import SIZES, GPT2Config

TINY = GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=50257, n_positions=1024)  # real vocab: real ids
GPT2 = SIZES["gpt2"]                                                                   # 12 x 768, 124M
DIVERSE_INIT = 0.1   # gpt2 config: 20+ distinct greedy tokens in 24
TINY_INIT = 0.3      # the 2-layer tiny config needs a wider init for the same diversity (0.1 gives ~4 in 24)
EOS = 50256
REPO = Path(__file__).resolve().parents[1]

PROMPT_IDS = [[464, 3616, 286, 1204, 318], [15496], [4299, 12900, 7, 77, 2599]]  # "The meaning of life is", ...
PROMPTS = [
    "The meaning of life is",
    "In 1869 the transcontinental railroad was completed, and within a decade the towns along its route",
    "def fib(n):\n    return",
    "Hello",
]


@dataclass(frozen=True)
class Model:
    """A random checkpoint and the artifact exported from it."""
    name: str
    config: GPT2Config
    seed: int
    ckpt: Path   # config.json + model.safetensors (HF format)
    art: Path    # the model directory the engine loads


_MADE: dict[tuple, Model] = {}


def make_model(tmp_path_factory, size: str, seed: int = 0, init: float = DIVERSE_INIT,
               variant: str | None = None, attention: str | None = None) -> Model:
    """Save and export a random checkpoint of `size` ('tiny' or a SIZES key), once per session.

    variant "negative-logits": every logit below zero (measured max -25 on tiny), as in real GPT-2 whose
      logits sit around -100, so that the repetition penalty's multiply branch (x < 0) decides tokens.
      Done through a shared direction: +3 on dimension 0 of every wte row (the tied LM head) and -20 on
      ln_f.bias[0], so each position's logits move by about 3 * (ln_f output[0]) ~ -60 together.
    variant "eos-prone": the same, with <|endoftext|>'s logit raised (wte[50256, 0] 0.7 lower): greedy
      with repetition_penalty=1.3 meets eos after 13-42 tokens on PROMPT_IDS (measured with HF).
    """
    from export.checkpoint import random_weights, save_checkpoint
    from export.exporter import export_model

    root = tmp_path_factory.getbasetemp() / "runtime-models"
    key = (str(root), size, seed, init, variant, attention)
    if key not in _MADE:
        cfg = TINY if size == "tiny" else SIZES[size]
        name = f"{size}-s{seed}-i{init}" + (f"-{variant}" if variant else "") + (f"-{attention}" if attention else "")
        weights = random_weights(cfg, seed, init)
        if variant in ("negative-logits", "eos-prone"):
            weights["wte.weight"][:, 0] += 3.0
            weights["ln_f.bias"][0] -= 20.0
        if variant == "eos-prone":
            weights["wte.weight"][EOS, 0] -= 0.7
        elif variant not in (None, "negative-logits"):
            raise ValueError(f"unknown variant {variant!r}")
        ckpt = save_checkpoint(root / "ckpt" / name, cfg, weights)
        del weights
        art = export_model(str(ckpt), root / "art" / name, show_progress=False, attention=attention)
        _MADE[key] = Model(name, cfg, seed, ckpt, Path(art))
    return _MADE[key]


def load_generator(model: Model, **kwargs):
    from engine.generator import Generator
    return Generator.from_pretrained(model.art, **kwargs)


def hf_model(model: Model):
    """The oracle: GPT2LMHeadModel from the checkpoint directory the artifact was exported from."""
    import torch
    from transformers import GPT2LMHeadModel
    return GPT2LMHeadModel.from_pretrained(str(model.ckpt), dtype=torch.float32,
                                           attn_implementation="eager").eval()


def hf_generate(hf, prompt_ids: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """HF greedy (or whatever kwargs say) continuation of one prompt: the new ids only.

    One torch thread: on this 2-core machine, with other jobs running, torch's 2-thread OpenMP pool
    spins against them (measured 0.55-0.9 s per gpt2 step with 2 threads vs 0.09 s with 1).
    """
    import torch
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                              pad_token_id=EOS, eos_token_id=EOS, **kwargs)
    finally:
        torch.set_num_threads(threads)
    return out[0, len(prompt_ids):].tolist()


def run_cli(*args: str, env: dict | None = None, stdin: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m cli ARGS` in a subprocess, as a user would run it.

    stdout/stderr are decoded as UTF-8 without newline translation: generated text may hold '\\r'.
    """
    full_env = {**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})}
    r = subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, env=full_env, cwd=REPO,
                       input=None if stdin is None else stdin.encode(), timeout=timeout)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode("utf-8"), r.stderr.decode("utf-8"))


def distinct(ids) -> int:
    return len(set(np.asarray(ids).tolist()))


# ---- fixtures (module scope: import them into a test module to use them) ---------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Model:
    return make_model(tmp_path_factory, "tiny", init=TINY_INIT)


@pytest.fixture(scope="module")
def tiny_gen(tiny_model):
    gen = load_generator(tiny_model)
    yield gen
    gen.close()
