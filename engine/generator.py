"""The public API for services that embed the engine.

    gen = Generator.from_pretrained("artifacts/gpt2")            # ONNX Runtime on the CPU
    out = gen.generate("Hello", SamplingParams(max_new_tokens=32, seed=0))
    for delta in gen.stream("Hello", SamplingParams.greedy(16)): print(delta, end="")

Thread safety: one Generator may be used from many threads at once. The loaded model is shared and
read-only; every call gets its own KV cache, RNGs and detokenizers (one cache per request), so calls
never wait on each other in Python (backends that cannot run concurrently lock inside `forward`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from engine.artifact import Artifact, load_artifact
from engine.errors import ArtifactError, InputError
from engine.loop import LoopTimings, RowState, new_row, run_loop, sequence_logits
from engine.sampling import SamplingParams

TRUNCATE_MODES = ("error", "left")


@dataclass(frozen=True)
class Timings:
    load_s: float          # backend load (shared by every call of this Generator)
    prefill_s: float       # time to first token: prefill forward + first sample
    decode_s: float        # all decode steps
    decode_steps: int
    total_s: float

    @property
    def decode_per_token_s(self) -> float:
        return self.decode_s / self.decode_steps if self.decode_steps else float("nan")


@dataclass(frozen=True)
class GenerationOutput:
    text: str                       # generated text only (the prompt is not repeated)
    token_ids: list[int]            # generated ids (an <|endoftext|> that stopped generation is not included)
    prompt_token_ids: list[int]     # after truncation, if any
    finish_reason: str              # "eos" | "length" | "stop" | "context"
    timings: Timings


class Generator:
    def __init__(self, artifact: Artifact, backend, tokenizer, load_s: float = 0.0):
        self.artifact = artifact
        self.backend = backend
        self.tokenizer = tokenizer
        self.config = artifact.config
        self.load_s = load_s
        # A TensorRT engine's cache length is fixed at build time and may be below the model's context.
        self.max_context = min(self.config.n_positions, artifact.max_capacity,
                               backend.fixed_capacity or artifact.max_capacity)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, backend: str = "ort", device: str = "cpu",
                        threads: int | None = None, **backend_options) -> Generator:
        """Load a model directory made by `gpt2-engine export`. backend: 'ort' (CPU/CUDA) or 'trt'."""
        from tokenizers import Tokenizer

        t0 = time.perf_counter()
        art = load_artifact(path)
        try:
            tokenizer = Tokenizer.from_file(str(art.tokenizer_path))
        except Exception as e:  # the Rust side raises plain Exceptions for malformed JSON
            raise ArtifactError(f"{art.tokenizer_path} is corrupt ({e}): re-run `gpt2-engine export`") from None
        if backend == "ort":
            from engine.backends.ort import OrtBackend
            be = OrtBackend(art, device=device, threads=threads, **backend_options)
        elif backend == "trt":
            from engine.backends.trt import TrtBackend
            be = TrtBackend(art, **backend_options)
        else:
            raise InputError(f"backend must be 'ort' or 'trt', got {backend!r}")
        return cls(art, be, tokenizer, time.perf_counter() - t0)

    # --- tokens ---------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def _prepare(self, prompt: str | Sequence[int], params: SamplingParams, truncate: str) -> RowState:
        if truncate not in TRUNCATE_MODES:
            raise InputError(f"truncate must be one of {TRUNCATE_MODES}, got {truncate!r}")
        if not isinstance(params, SamplingParams):
            raise InputError(f"params must be a SamplingParams, got {type(params).__name__}")
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise InputError("prompt is empty: give at least one token of text "
                             "(e.g. '<|endoftext|>' to generate unconditionally)")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        ctx, n_new = self.max_context, params.max_new_tokens
        if n_new >= ctx:
            raise InputError(f"max_new_tokens must be < the context ({ctx}) so the prompt keeps a token, got {n_new}")
        if len(ids) + n_new > ctx:
            if truncate == "left":
                ids = ids[len(ids) + n_new - ctx:]  # keep the most recent tokens
            else:
                raise InputError(f"prompt ({len(ids)} tokens) + max_new_tokens ({n_new}) exceeds the context "
                                 f"({ctx} tokens): shorten the prompt, lower max_new_tokens to at most "
                                 f"{max(ctx - len(ids), 0)}, or truncate from the left (truncate='left', "
                                 "CLI --truncate left)")
        return new_row(ids, params, self.tokenizer)

    def _rows(self, prompts, params, truncate) -> list[RowState]:
        if isinstance(params, SamplingParams) or params is None:
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise InputError(f"got {len(params)} SamplingParams for {len(prompts)} prompts: give one, or one per prompt")
        if not prompts:
            raise InputError("no prompts given")
        return [self._prepare(p, sp, truncate) for p, sp in zip(prompts, params)]

    # --- generation -----------------------------------------------------------------------------

    def _outputs(self, rows: list[RowState], timings: LoopTimings, t0: float) -> list[GenerationOutput]:
        t = Timings(self.load_s, timings.prefill_s, timings.decode_s, len(timings.decode_step_s),
                    time.perf_counter() - t0)
        return [GenerationOutput(r.text, list(r.generated), list(r.prompt_ids), r.finish_reason, t) for r in rows]

    def generate(self, prompts: str | Sequence[int] | list, params: SamplingParams | list[SamplingParams] | None = None,
                 truncate: str = "error"):
        """Generate for one prompt (returns a GenerationOutput) or a list of prompts (returns a list).

        A prompt is text or a list of token ids. `params` is one SamplingParams for all rows or one per row.
        """
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], (int, np.integer)))
        batch = [prompts] if single else list(prompts)
        t0 = time.perf_counter()
        rows = self._rows(batch, params, truncate)
        timings = LoopTimings()
        for _ in run_loop(self.backend, rows, _capacity(rows), self.config.eos_token_id, timings):
            pass
        outs = self._outputs(rows, timings, t0)
        return outs[0] if single else outs

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               truncate: str = "error") -> Iterator[str]:
        """Yield text deltas as tokens are produced; their concatenation equals generate()'s text.

        Text that could be the start of a stop string is held back until it is known not to be one.
        """
        rows = self._rows([prompt], params, truncate)
        row = rows[0]
        hold = max((len(s) - 1 for s in row.params.stop), default=0)
        for _ in run_loop(self.backend, rows, _capacity(rows), self.config.eos_token_id, LoopTimings()):
            safe = len(row.text) if row.done else max(len(row.text) - hold, row.emitted)
            if safe > row.emitted:
                yield row.text[row.emitted:safe]
                row.emitted = safe

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits at every position of one sequence (e.g. for perplexity): float32 (T, V)."""
        T = len(token_ids)
        if not 0 < T <= self.max_context:
            raise InputError(f"sequence length must be in [1, {self.max_context}], got {T}")
        return sequence_logits(self.backend, np.asarray(list(token_ids), np.int64))         # (T, V)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _capacity(rows: list[RowState]) -> int:
    """Cache slots a request needs: its longest prompt + new tokens (<= the context, checked earlier)."""
    return max(len(r.prompt_ids) + r.params.max_new_tokens for r in rows)
