"""The peers beside the engine, on the same weights and prompts: HF transformers and CTranslate2.

Each peer implements the bench's runner interface (``Runner``: greedy / run / close), which the
engine's own runner (runners.EngineRunner) implements too, so TTFT, per-step decode and end-to-end
mean the same for all: TTFT is the span defined once in benchmarks/records.py (from the call, token
ids in hand, to the first token of every row on the host; cache allocation, prefill and the first
sample inside); every runner is given token ids, so tokenization is outside every timing; every
runner generates exactly n tokens (no stop at <|endoftext|>), greedy.

``hf_reference`` is the validation reference: HF `generate`, greedy, computed once per model.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np


@dataclass
class RunTiming:
    """One generate call: TTFT (benchmarks/records.py), each decode step, and the whole call (seconds)."""

    ttft_s: float
    step_s: list[float]
    e2e_s: float


class Runner(Protocol):
    def greedy(self, prompt: Sequence[int], n: int) -> list[int]:
        """Exactly n greedy tokens after ``prompt`` (no stop at <|endoftext|>)."""
        ...

    def run(self, prompts: np.ndarray, n: int) -> RunTiming:
        """Generate n greedy tokens for each row of ``prompts`` (B, T), timed."""
        ...

    def close(self) -> None:
        ...

    # Lossy runners (engine int8, CTranslate2 int8) also have `logits(ids) -> (T, V)`: one sequence's
    # logits at every position, for the accuracy figures and the lossy gate (gates.accuracy_figures).
    # For the position sweep, a runner has one of:
    # - `decode_stepper(prompts, steps) -> () -> seconds` (the engine, HF: several prefilled caches at
    #   once), which lets the sweep interleave positions;
    # - `step_times_at(prompts, steps) -> [seconds]` (CTranslate2, whose stream runs in its own thread):
    #   prefill ``prompts`` (B, p) untimed, then the times of ``steps`` single decode steps.


def quiet_transformers() -> None:
    """No per-tensor 'Loading weights' bars or deprecation chatter over the bench's own progress bar."""
    import transformers
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def load_hf_model(checkpoint_dir: Path, threads: int | None):
    """GPT2LMHeadModel in fp32, eval mode, torch limited to `threads`: the reference and the HF peer."""
    import torch
    import transformers
    quiet_transformers()
    if threads:
        torch.set_num_threads(threads)
    return transformers.GPT2LMHeadModel.from_pretrained(str(checkpoint_dir), dtype=torch.float32).eval()


def hf_reference(checkpoint_dir: Path, prompt: Sequence[int], n: int, threads: int | None) -> list[int]:
    """The reference: HF transformers `generate`, greedy, exactly n new tokens."""
    import torch
    model = load_hf_model(checkpoint_dir, threads)
    ids = torch.tensor([list(prompt)], dtype=torch.int64)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=model.config.eos_token_id)
    tokens = out[0, ids.shape[1]:].tolist()
    del model
    gc.collect()
    return tokens


def hf_logits(checkpoint_dir: Path, ids: Sequence[int], threads: int | None) -> np.ndarray:
    """HF transformers' fp32 logits at every position of one sequence: (T, V). The reference that lossy
    runners' accuracy is stated against."""
    import torch
    model = load_hf_model(checkpoint_dir, threads)
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([list(ids)], dtype=torch.int64)).logits[0].numpy()
    del model
    gc.collect()
    return out


class HFRunner:
    """Hugging Face transformers GPT2LMHeadModel (torch CPU), a manual greedy loop over its KV cache.

    The manual loop (prefill forward, then one forward per token with the cache) gives true per-step
    times; it runs what `generate` runs per step, including `logits_to_keep=1` (generate passes it
    too, so the prefill computes logits for the last position only). Validation compares this loop,
    the thing timed, against `generate`'s tokens.
    """

    def __init__(self, checkpoint_dir: Path, threads: int | None):
        import torch
        import transformers
        self.torch = torch
        self.model = load_hf_model(checkpoint_dir, threads)
        import inspect
        params = inspect.signature(self.model.forward).parameters
        # transformers 5.x renamed `past_key_values` to `cache` (the old name warns, then goes away).
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._new_cache = lambda: transformers.DynamicCache(config=self.model.config)

    def _forward(self, ids, cache):
        out = self.model(input_ids=ids, use_cache=True, **{self._cache_kw: cache}, **self._keep)
        return out.logits[:, -1].argmax(-1)                                    # (B,)

    def _loop(self, prompts: np.ndarray, n: int) -> tuple[np.ndarray, RunTiming]:
        """Generate and time the TTFT span (benchmarks/records.py): ids to a tensor, the cache, the
        prefill forward and the first tokens copied to the host."""
        torch = self.torch
        t0 = time.perf_counter()
        ids = torch.from_numpy(np.ascontiguousarray(prompts, dtype=np.int64))   # (B, T)
        out = np.empty((ids.shape[0], n), np.int64)
        with torch.inference_mode():
            cache = self._new_cache()
            tok = self._forward(ids, cache)                                    # (B,)
            out[:, 0] = tok.numpy()
            t_prev = time.perf_counter()
            ttft, step_s = t_prev - t0, []
            for i in range(1, n):
                tok = self._forward(tok[:, None], cache)                       # (B,)
                out[:, i] = tok.numpy()
                now = time.perf_counter()
                step_s.append(now - t_prev)
                t_prev = now
        return out, RunTiming(ttft, step_s, time.perf_counter() - t0)

    def greedy(self, prompt, n):
        return self._loop(np.asarray([prompt]), n)[0][0].tolist()

    def run(self, prompts, n):
        return self._loop(prompts, n)[1]

    def decode_stepper(self, prompts, steps):
        """Prefill (untimed); return a function that runs and times one more decode step."""
        torch = self.torch
        cache = self._new_cache()
        with torch.inference_mode():
            state = {"tok": self._forward(torch.from_numpy(np.ascontiguousarray(prompts, dtype=np.int64)), cache)}

        def step() -> float:
            with torch.inference_mode():
                t0 = time.perf_counter()
                state["tok"] = self._forward(state["tok"][:, None], cache)
                return time.perf_counter() - t0
        return step

    def close(self):
        self.model = None


class CT2Runner:
    """CTranslate2 Generator on the CPU, streamed with `generate_tokens` for per-step times.

    Prompts go in as token strings from the converted model's own vocabulary.json (id -> string), so
    no tokenizer is involved; results come back as ids. `min_length = max_length = n` and no end
    token force the length, as for every runner. The stream hands each step over from CTranslate2's
    worker thread; that hand-off is inside the timings (it is what a streaming user gets).
    """

    def __init__(self, model_dir: Path, threads: int | None, compute_type: str):
        import ctranslate2
        self.vocab = json.loads((Path(model_dir) / "vocabulary.json").read_text())
        self.gen = ctranslate2.Generator(str(model_dir), device="cpu", intra_threads=threads or 0,
                                         compute_type=compute_type)

    def _stream(self, prompts: np.ndarray, n: int):
        toks = [[self.vocab[int(t)] for t in row] for row in prompts]
        return self.gen.generate_tokens(toks, max_length=n, min_length=n, sampling_topk=1, end_token=[])

    def _loop(self, prompts: np.ndarray, n: int) -> tuple[np.ndarray, RunTiming]:
        """Generate and time the TTFT span (benchmarks/records.py): ids to token strings, then the
        stream up to step 0's token of every row. Rows of a step arrive one after another, before
        any row of the next step, so a step is done when its last row arrives."""
        t0 = time.perf_counter()
        out = np.full((len(prompts), n), -1, np.int64)
        step_at: dict[int, float] = {}          # step -> when its last row arrived
        for r in self._stream(prompts, n):
            step_at[r.step] = time.perf_counter()
            if r.step < n:
                out[r.batch_id, r.step] = r.token_id
        end = time.perf_counter()
        marks = [step_at[s] for s in sorted(step_at)]
        if not marks:
            raise RuntimeError("CTranslate2 returned no tokens")
        return out, RunTiming(marks[0] - t0, list(np.diff(marks)), end - t0)

    def greedy(self, prompt, n):
        row = self._loop(np.asarray([prompt]), n)[0][0]
        return [int(t) for t in row if t >= 0]

    def logits(self, ids):
        return np.asarray(self.gen.forward_batch([[self.vocab[int(t)] for t in ids]]))[0]   # (T, V)

    def run(self, prompts, n):
        return self._loop(prompts, n)[1]

    def step_times_at(self, prompts, steps):
        # Step 0 is the prefill; the steps after it decode at positions p, p+1, ...
        return self._loop(prompts, steps + 1)[1].step_s

    def close(self):
        self.gen = None


__all__ = ["RunTiming", "Runner", "HFRunner", "CT2Runner", "hf_logits", "hf_reference", "quiet_transformers"]
