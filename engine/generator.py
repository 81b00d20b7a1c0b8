"""The public API for services that embed the engine.

    gen = Generator.from_pretrained("artifacts/gpt2")            # ONNX Runtime on the CPU
    out = gen.generate("Hello", SamplingParams(max_new_tokens=32, seed=0))
    for delta in gen.stream("Hello", SamplingParams.greedy(16)): print(delta, end="")

    out = await gen.agenerate("Hello")                           # asyncio, for servers
    async for delta in gen.astream("Hello"): ...

Every call, from any thread or event loop, goes through one engine loop (engine/core.py): requests
share batched forward steps over one pool of KV-cache slots (in-flight batching), so threads calling
`generate` at once get batch throughput without changing their code. A list of prompts is admitted
together (a static batch). Each request keeps its own RNG, penalties and stop strings: its tokens do
not depend on what else shares the batch.
"""

from __future__ import annotations

import asyncio
import os
import queue
import time
import warnings
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.artifact import MANIFEST, Artifact, load_artifact
from engine.core import Delta, EngineCore, EngineStats, Request, TokenLogprob
from engine.errors import ArtifactError, BackendUnavailable, EngineClosed, InputError, RandomWeightsWarning
from engine.loop import RowState, new_row, sequence_logits
from engine.sampling import SamplingParams
from engine.speculative import draft_cost as speculation_cost

TRUNCATE_MODES = ("error", "left")


@dataclass(frozen=True)
class Timings:
    """One request's timings. TTFT, the one definition the bench uses too: from the call (submission)
    to its first generated token on the host; it includes the wait for a slot (queue_s), the KV-cache
    allocation on first use, the prefill forward(s) and the first sample."""

    load_s: float          # backend load (shared by every call of this Generator)
    queue_s: float         # submission -> admitted into a slot
    ttft_s: float          # submission -> first token
    itl_s: tuple[float, ...]  # inter-token latencies: the gap before each token after the first
    total_s: float         # submission -> finished
    drafts_proposed: int = 0  # speculative decoding: draft tokens proposed / accepted by the target
    drafts_accepted: int = 0
    cached_tokens: int = 0    # prompt tokens served from the prefix cache (not computed); at most prompt - 1

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / proposed draft tokens (None without a draft model or when nothing was proposed)."""
        return self.drafts_accepted / self.drafts_proposed if self.drafts_proposed else None

    @property
    def prefill_s(self) -> float:
        """Admission -> first token: the prefill forward(s) and the first sample."""
        return self.ttft_s - self.queue_s

    @property
    def decode_s(self) -> float:
        return float(sum(self.itl_s))

    @property
    def decode_steps(self) -> int:
        return len(self.itl_s)

    @property
    def decode_per_token_s(self) -> float:
        return self.decode_s / self.decode_steps if self.decode_steps else float("nan")


@dataclass(frozen=True)
class GenerationOutput:
    text: str                       # generated text only (the prompt is not repeated)
    token_ids: list[int]            # generated ids (an <|endoftext|> that stopped generation is not included)
    prompt_token_ids: list[int]     # after truncation, if any
    finish_reason: str              # "eos" | "length" | "stop" | "context" | "deadline" | "abort"
    timings: Timings
    logprobs: list[TokenLogprob] | None = None  # one per generated token when params.logprobs is set
    # One per prompt token when params.prompt_logprobs is set, from the prefill forward; None for the first
    # token (nothing predicts it)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    random_weights: bool = False    # the model's weights are random (`export --init random`): the text is not language


class Generator:
    def __init__(self, artifact: Artifact, backend, tokenizer, load_s: float = 0.0, max_batch: int = 8,
                 max_queue: int = 256, prefill_chunk: int | None = None, draft=None, draft_k: int = 4,
                 draft_cost: float = 0.35, speculate: str = "auto", prefix_caching: bool = True):
        self.artifact = artifact
        self.backend = backend
        self.tokenizer = tokenizer
        self.config = artifact.config
        self.load_s = load_s
        # A TensorRT engine's cache length is fixed at build time and may be below the model's context.
        self.max_context = min(self.config.n_positions, artifact.max_capacity,
                               backend.fixed_capacity or artifact.max_capacity)
        # One loop and one slot pool for every caller (engine/core.py).
        self.draft = draft  # a second backend (speculative decoding), checked by from_pretrained
        self.core = EngineCore(backend, self.config.eos_token_id, self.max_context, max_batch=max_batch,
                               max_queue=max_queue, prefill_chunk=prefill_chunk, draft=draft, draft_k=draft_k,
                               draft_cost=draft_cost, speculate=speculate, prefix_caching=prefix_caching)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, backend: str = "ort", device: str = "cpu",
                        threads: int | None = None, max_batch: int = 8, max_queue: int = 256,
                        prefill_chunk: int | None = None, draft: str | os.PathLike | None = None,
                        draft_k: int = 4, speculate: str = "auto", init: str | None = None,
                        precision: str = "fp32", prefix_caching: bool = True, **backend_options) -> Generator:
        """Load a model directory made by `gpt2-engine export`, or a model by name as `gpt2-engine generate
        NAME` does: a size name (gpt2 .. gpt2-xl, distilgpt2; init='random' for random weights), a Hugging
        Face repo id of a GPT-2 model (`sshleifer/tiny-gpt2`; the local hub cache, else a download) or a
        checkpoint directory, exported in `precision` once into the model cache (~/.cache/gpt2-engine, or
        $GPT2_ENGINE_CACHE) and loaded from there after that. backend: 'ort' (CPU/CUDA) or 'trt'.

        max_batch: KV-cache slots (requests decoding at once); max_queue: requests that may wait for a
        slot before submissions fail with EngineOverloaded; prefill_chunk: prompt tokens per loop
        iteration while other requests decode (None: adaptive, about 3/4 of a decode step's time;
        0: never split a prompt). draft: a model directory with the same tokenizer and vocabulary (e.g.
        the target's own int8 export) for speculative decoding when one request decodes alone: up to
        `draft_k` tokens proposed per round, as many as pay given the request's acceptance so far and
        the draft's cost priced by the two models' weight bytes (none when drafting would be slower than
        decoding plainly; engine/speculative.py's SpeculationPolicy); speculate='always': `draft_k` every round
        (to measure the rule). Greedy output is the target's own, sampling follows its distribution
        exactly, and a seeded request reproduces. prefix_caching (on by default): a prompt that starts like
        one whose keys and values a slot still holds (a finished request's, or one running) skips that
        prefix (`Timings.cached_tokens`); the tokens are those of a cold engine.
        """
        from tokenizers import Tokenizer

        path = _model_directory(path, init, precision)
        t0 = time.perf_counter()
        art = load_artifact(path)
        if art.is_random:
            warnings.warn(f"{art.path}: {art.label}", RandomWeightsWarning, stacklevel=2)
        try:
            tokenizer = Tokenizer.from_file(str(art.tokenizer_path))
        except Exception as e:  # the Rust side raises plain Exceptions for malformed JSON
            raise ArtifactError(f"{art.tokenizer_path} is corrupt ({e}): re-run `gpt2-engine export`") from None
        draft_art = None
        if draft is not None:
            draft_art = load_artifact(draft)
            _check_draft(art, draft_art)
            if backend == "ort":  # target and draft take turns on the same cores: no spinning between runs
                backend_options = {"spin_after_run": False, **backend_options}
        speculation = {}
        if draft_art is None:
            be = _load_backend(art, backend, device, threads, backend_options)
        else:
            be, speculation["draft"] = _load_pair(art, draft_art, backend, device, threads, backend_options)
            speculation["draft_cost"] = speculation_cost(art.config, art.precision, draft_art.config, draft_art.precision)
        return cls(art, be, tokenizer, time.perf_counter() - t0, max_batch=max_batch, max_queue=max_queue,
                   prefill_chunk=prefill_chunk, draft_k=draft_k, speculate=speculate, prefix_caching=prefix_caching,
                   **speculation)

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
                left = (f"or truncate from the left (truncate='left', CLI --truncate left: keeps the prompt's last "
                        f"{ctx - n_new} tokens)")
                if len(ids) >= ctx:  # no max_new_tokens fits: the prompt alone fills the context
                    raise InputError(f"prompt ({len(ids)} tokens) + max_new_tokens ({n_new}) exceeds the context "
                                     f"({ctx} tokens), and the prompt alone fills it: shorten the prompt to at most "
                                     f"{ctx - n_new} tokens, {left}")
                raise InputError(f"prompt ({len(ids)} tokens) + max_new_tokens ({n_new}) exceeds the context "
                                 f"({ctx} tokens): lower max_new_tokens to at most {ctx - len(ids)}, shorten the "
                                 f"prompt to at most {ctx - n_new} tokens, {left}")
        return new_row(ids, params.for_model(self.config.eos_token_id, self.config.vocab_size), self.tokenizer)

    def _rows(self, prompts, params, truncate) -> list[RowState]:
        if isinstance(params, SamplingParams) or params is None:
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise InputError(f"got {len(params)} SamplingParams for {len(prompts)} prompts: give one, or one per prompt")
        if not prompts:
            raise InputError("no prompts given")
        return [self._prepare(p, sp, truncate) for p, sp in zip(prompts, params)]

    # --- generation -----------------------------------------------------------------------------

    def _output(self, r: Request) -> GenerationOutput:
        row, t = r.row, r.token_times
        admitted = r.admitted if r.admitted is not None else r.finished
        timings = Timings(self.load_s, admitted - r.submitted, (t[0] if t else r.finished) - r.submitted,
                          tuple(float(b - a) for a, b in zip(t, t[1:])), r.finished - r.submitted,
                          r.drafts_proposed, r.drafts_accepted, r.cached_tokens)
        prompt_lp = r.prompt_logprobs   # set by the core's prefill when params.prompt_logprobs is
        return GenerationOutput(row.text, list(row.generated), list(row.prompt_ids), row.finish_reason, timings,
                                r.logprobs, None if prompt_lp is None else list(prompt_lp),
                                random_weights=self.artifact.is_random)

    def _submit(self, rows: list[RowState], sink, deadline_s: float | None) -> list[Request]:
        if deadline_s is not None and not (isinstance(deadline_s, (int, float)) and deadline_s > 0):
            raise InputError(f"deadline_s must be a number of seconds > 0, or None, got {deadline_s!r}")
        reqs = [Request(row, sink, deadline_s) for row in rows]
        self.core.submit(reqs)
        return reqs

    def _deltas(self, rows: list[RowState], deadline_s: float | None) -> Iterator[Delta]:
        """Deltas of these rows' requests as the loop sends them; leaving early aborts the rest."""
        q: queue.SimpleQueue[Delta] = queue.SimpleQueue()
        reqs = self._submit(rows, q.put, deadline_s)
        open_ = len(reqs)
        try:
            while open_:
                try:
                    d = q.get(timeout=1.0)
                except queue.Empty:
                    if not self.core.alive:
                        raise EngineClosed("the engine loop is not running (closed)") from None
                    continue
                if d.request is not None:
                    open_ -= 1
                    if d.error is not None:
                        raise d.error
                yield d
        finally:
            for r in reqs:
                if not r.done:
                    self.core.abort(r)

    def generate(self, prompts: str | Sequence[int] | list, params: SamplingParams | list[SamplingParams] | None = None,
                 truncate: str = "error", deadline_s: float | None = None):
        """Generate for one prompt (returns a GenerationOutput) or a list of prompts (returns a list,
        admitted together). A prompt is text or a list of token ids. `params` is one SamplingParams for
        all rows or one per row. deadline_s: seconds after which a request ends (finish reason 'deadline').
        """
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], (int, np.integer)))
        batch = [prompts] if single else list(prompts)
        rows = self._rows(batch, params, truncate)
        finals = {}
        for d in self._deltas(rows, deadline_s):
            if d.request is not None:
                finals[id(d.request.row)] = self._output(d.request)
        outs = [finals[id(r)] for r in rows]
        return outs[0] if single else outs

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               truncate: str = "error", deadline_s: float | None = None) -> Iterator[str]:
        """Yield text deltas as tokens are produced; their concatenation equals generate()'s text.

        Text that could be the start of a stop string is held back until it is known not to be one.
        Closing the iterator early (break, or garbage collection) aborts the request and frees its slot.
        """
        for d in self._deltas(self._rows([prompt], params, truncate), deadline_s):
            if d.text:
                yield d.text

    # --- asyncio --------------------------------------------------------------------------------

    async def astream_deltas(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                             truncate: str = "error", deadline_s: float | None = None) -> AsyncIterator[Delta]:
        """Deltas (text, token ids, logprobs, finish reason; the last one carries `.output`) for an
        asyncio caller. Leaving the iteration early, or the task being cancelled, aborts the request."""
        rows = self._rows([prompt], params, truncate)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Delta] = asyncio.Queue()
        (req,) = self._submit(rows, lambda d: loop.call_soon_threadsafe(q.put_nowait, d), deadline_s)
        getter: asyncio.Future | None = None
        try:
            while True:
                # asyncio.wait, not wait_for: on Python < 3.12 wait_for can swallow a cancellation that
                # arrives as the delta does, and a cancelled task (a client gone) must abort its request.
                getter = getter or asyncio.ensure_future(q.get())
                done, _ = await asyncio.wait({getter}, timeout=1.0)
                if not done:
                    if not self.core.alive:
                        raise EngineClosed("the engine loop is not running (closed)")
                    continue
                d, getter = getter.result(), None
                if d.error is not None:
                    raise d.error
                if d.request is not None:
                    d.output = self._output(d.request)
                yield d
                if d.request is not None:
                    return
        finally:
            if getter is not None:
                getter.cancel()
            if not req.done:
                self.core.abort(req)

    async def astream(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                      truncate: str = "error", deadline_s: float | None = None) -> AsyncIterator[str]:
        """Text deltas for an asyncio caller (`async for`); see `stream`."""
        async for d in self.astream_deltas(prompt, params, truncate, deadline_s):
            if d.text:
                yield d.text

    async def agenerate(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                        truncate: str = "error", deadline_s: float | None = None) -> GenerationOutput:
        """`generate` for one prompt, awaitable; cancelling the task aborts the request."""
        async for d in self.astream_deltas(prompt, params, truncate, deadline_s):
            if d.output is not None:
                return d.output
        raise EngineClosed("the request ended without an output")

    def abort_all(self) -> None:
        """Abort every request in flight (e.g. a server shutting down past its drain bound)."""
        self.core.abort_all()

    def warm_up(self) -> None:
        """Commit the slot pool's memory now (EngineCore.warm_up): what a server does before it takes
        requests, so that the first forwards under load do not fault in fresh rows. Memory: the whole
        pool, (max_batch + 1) x max_context slots a layer (gpt2 fp32 at 8 rows: ~0.7 GB)."""
        self.core.warm_up()

    def stats(self) -> EngineStats:
        """Running and waiting requests, free slots, forward calls so far."""
        return self.core.stats()

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits at every position of one sequence (e.g. for perplexity): float32 (T, V)."""
        T = len(token_ids)
        if not 0 < T <= self.max_context:
            raise InputError(f"sequence length must be in [1, {self.max_context}], got {T}")
        return sequence_logits(self.backend, np.asarray(list(token_ids), np.int64))         # (T, V)

    def close(self) -> None:
        """Stop the engine loop (waiting and running requests end with EngineClosed), then the backend."""
        self.core.close()
        self.backend.close()
        if self.draft is not None:
            self.draft.close()

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _load_backend(art: Artifact, backend: str, device: str, threads: int | None, options: dict):
    if backend == "ort":
        from engine.backends.ort import OrtBackend
        return OrtBackend(art, device=device, threads=threads, **options)
    if backend == "trt":
        from engine.backends.trt import TrtBackend
        try:
            return TrtBackend(art, **options)
        except BackendUnavailable as e:
            raise BackendUnavailable(f"{e}; without a GPU use backend='ort' (CLI: --backend ort)") from None
    raise InputError(f"backend must be 'ort' or 'trt', got {backend!r}")


def _model_directory(model: str | os.PathLike, init: str | None, precision: str) -> str | os.PathLike:
    """`model` itself when it is a model directory or a path that is not a model name; else the model
    cache's directory for it (export/model_cache.py: exported there once, on first use)."""
    p = Path(model).expanduser()
    if (p / MANIFEST).is_file():
        return model
    if not (p / "config.json").is_file() and (p.exists() or p.is_absolute() or str(model).startswith((".", "~"))):
        return model  # a path, not a checkpoint: load_artifact says what is wrong with it
    # The one import of export/ in the runtime (docs/ARCHITECTURE.md, "The parts"; tests/test_layering.py):
    # a name has to be exported before it runs, as the CLI does. Lazy, so that `import engine` and loading
    # a model directory never load the exporter.
    from export.model_cache import resolve_model_dir
    return resolve_model_dir(str(model), precision=precision, init=init)


def _load_pair(target: Artifact, draft: Artifact, backend: str, device: str, threads: int | None, options: dict):
    """Target and draft backends, loaded at once: ONNX Runtime packs each session's weights on one
    thread, so two loads overlap (gpt2-large fp32 + its int8 export, 2 cores: 7.4 s one after the other,
    4.3 s together). If either fails, the other is closed and the first error raised."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2, thread_name_prefix="gpt2-engine-load") as pool:
        futures = [pool.submit(_load_backend, a, backend, device, threads, options) for a in (target, draft)]
    errors = [f.exception() for f in futures]
    if any(errors):
        for f, e in zip(futures, errors):
            if e is None:
                f.result().close()
        raise next(e for e in errors if e is not None)
    return futures[0].result(), futures[1].result()


def _check_draft(target: Artifact, draft: Artifact) -> None:
    """A draft must speak the target's tokens: same vocabulary size and the same tokenizer file."""
    import hashlib

    if draft.config.vocab_size != target.config.vocab_size:
        raise InputError(f"the draft {draft.path} has a vocabulary of {draft.config.vocab_size} tokens, the target "
                         f"{target.path} {target.config.vocab_size}: a draft must share the target's vocabulary "
                         "(e.g. the target's own int8 export: `gpt2-engine export MODEL --precision int8`)")
    digests = [hashlib.sha256(a.tokenizer_path.read_bytes()).hexdigest() for a in (target, draft)]
    if digests[0] != digests[1]:
        raise InputError(f"the draft {draft.path} has another tokenizer than the target {target.path} "
                         "(tokenizer.json differs): a draft must tokenize exactly as the target does")
    if draft.max_capacity < target.max_capacity:
        raise InputError(f"the draft {draft.path} holds {draft.max_capacity} positions, fewer than the target's "
                         f"{target.max_capacity}: use a draft with at least the target's context")
