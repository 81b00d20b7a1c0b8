"""The runners of a bench run: the engine as a runner (its own loop over any Backend), and how each
runner is found, prepared and loaded (RunnerSpec, made by engine_spec and peer_spec). The peers
themselves are in benchmarks/peers.py; all implement peers.Runner, so TTFT (benchmarks/records.py),
per-step decode and end-to-end mean the same for all of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from benchmarks.conditions import gpus
from benchmarks.models import PreparedModel
from benchmarks.peers import CT2Runner, HFRunner, Runner, RunTiming
from benchmarks.records import Skipped, short_error
from engine.config import GPT2Config
from engine.loop import LoopTimings, decode_step, new_row, prefill, run_loop, sequence_logits
from engine.sampling import SamplingParams

ENGINE_BACKENDS = ("ort", "ort-int8", "ort-spec", "ort-cuda", "trt")
PEERS = ("hf", "ct2", "ct2-int8")
DEFAULT_PEERS = ("hf", "ct2")
# GPU backends run the fp16 artifact (docs/ARCHITECTURE.md, "Known facts": fp16 is for GPUs; ORT CPU
# has no fp16 MatMul).
ENGINE_PRECISION = {"ort": "fp32", "ort-int8": "int8", "ort-spec": "fp32", "ort-cuda": "fp16", "trt": "fp16"}
# ort-spec: the fp32 model with its own int8 export as the draft (speculative decoding, engine/speculative.py).
DRAFT_PRECISION = {"ort-spec": "int8"}


class EngineRunner:
    """The engine's own loop (engine.loop) over any Backend: what `Generator.generate` runs."""

    def __init__(self, backend, config: GPT2Config, tokenizer):
        self.backend, self.config, self.tokenizer = backend, config, tokenizer

    def _rows(self, prompts, n: int):
        params = SamplingParams.greedy(n, stop_at_eos=False)  # forced length, as the peers
        return [new_row([int(t) for t in p], params, self.tokenizer) for p in prompts]

    def _loop(self, prompts, n: int) -> tuple[list, RunTiming]:
        """Generate and time the TTFT span (benchmarks/records.py) from outside the loop: rows made,
        then cache allocation, prefill and the first token of every row (sampled and detokenized, as
        the engine's generate does), up to the first yield."""
        t0 = time.perf_counter()
        rows = self._rows(prompts, n)
        capacity = max(len(r.prompt_ids) for r in rows) + n
        steps = run_loop(self.backend, rows, capacity, self.config.eos_token_id, LoopTimings())
        next(steps)                              # cache allocation + prefill + first token of every row
        t_prev = time.perf_counter()
        ttft, step_s = t_prev - t0, []
        for _ in steps:
            now = time.perf_counter()
            step_s.append(now - t_prev)
            t_prev = now
        return rows, RunTiming(ttft, step_s, time.perf_counter() - t0)

    def greedy(self, prompt, n):
        rows, _ = self._loop([prompt], n)
        return list(rows[0].generated)

    def logits(self, ids):
        return sequence_logits(self.backend, np.asarray(ids, np.int64))        # (T, V)

    def run(self, prompts, n):
        return self._loop(prompts, n)[1]

    def decode_stepper(self, prompts, steps):
        """Prefill ``prompts`` (untimed); return a function that runs and times one more decode step
        (up to ``steps`` calls): what lets the position sweep interleave positions."""
        rows = self._rows(prompts, 1)
        p = prompts.shape[1]
        cache = self.backend.new_cache(len(rows), p + steps)
        state = {"tokens": prefill(self.backend, cache, rows, pad_id=self.config.eos_token_id).argmax(-1), "i": 0}

        def step() -> float:
            t0 = time.perf_counter()
            logits = decode_step(self.backend, cache, state["tokens"].astype(np.int64),
                                 np.full(len(rows), p + state["i"], np.int64))
            state["tokens"], state["i"] = logits.argmax(-1), state["i"] + 1                         # (B,)
            return time.perf_counter() - t0
        return step

    def close(self):
        self.backend.close()


class SpeculativeRunner:
    """The Generator (the in-flight engine loop) with a draft model: speculative decoding at batch 1.

    A round emits several tokens at once, so a run's decode steps are its mean time per token (each
    step entry is that mean; p50 over runs is then ms/token), and each run's draft acceptance rate is
    kept for the record (`acceptance`).
    """

    def __init__(self, gen):
        self.gen = gen
        self.rates: list[float] = []

    def _generate(self, prompts, n: int):
        params = SamplingParams.greedy(n, stop_at_eos=False)  # forced length, as the peers
        return self.gen.generate([[int(t) for t in p] for p in prompts], params)

    def greedy(self, prompt, n):
        return self._generate([prompt], n)[0].token_ids

    def logits(self, ids):
        return self.gen.logits([int(t) for t in ids])                        # (T, V)

    def run(self, prompts, n):
        t0 = time.perf_counter()
        outs = self._generate(prompts, n)
        e2e = time.perf_counter() - t0
        per_token = float(np.mean([o.timings.decode_per_token_s for o in outs])) if n > 1 else 0.0
        rates = [o.timings.acceptance_rate for o in outs if o.timings.acceptance_rate is not None]
        self.rates += rates
        # TTFT: the engine's own figure (engine/generator.py Timings: the same span, from submission).
        return RunTiming(max(o.timings.ttft_s for o in outs), [per_token] * (n - 1), e2e)

    def step_times_at(self, prompts, steps):
        return self.run(prompts, steps + 1).step_s

    def acceptance(self) -> float | None:
        """Mean draft acceptance rate over the runs since the last call."""
        rates, self.rates = self.rates, []
        return round(float(np.mean(rates)), 3) if rates else None

    def close(self):
        self.gen.close()


@dataclass
class RunnerSpec:
    """One runner to measure: its record name, precision, device and how to load it."""

    backend: str                        # record name: engine-ort, engine-trt, hf, ct2, ...
    precision: str
    device: str
    load: Callable[[], Runner]          # timed (load_s); may raise Skipped (cannot run here) or fail
    prepare: Callable[[], None] | None = None  # untimed, before load: export / conversion, availability
    lossy: bool = False                 # validated by the lossy gate (gates.LOSSY_MIN_AGREEMENT)
    threads: int | None = None
    peer: str | None = None             # "hf" | "ct2" | "ct2-int8" for peers; None for the engine


def ort_cuda_unavailable() -> str | None:
    """None if ORT can run on a CUDA GPU here, else why not."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "no GPU/CUDA: onnxruntime has no CUDAExecutionProvider (`pip install onnxruntime-gpu`)"
    if gpus() is None:
        return "no GPU (nvidia-smi finds none)"
    return None


def trt_unavailable() -> str | None:
    """None if TensorRT can run on a GPU here, else why not."""
    if gpus() is None:
        return "no GPU/TensorRT (nvidia-smi finds no GPU)"
    try:
        from engine.backends.trt_plan import import_tensorrt
        import_tensorrt()
    except Exception as e:  # noqa: BLE001 -- ImportError or BackendUnavailable: either way not here
        return f"no TensorRT ({short_error(e)})"
    return None


def engine_spec(backend: str, model: PreparedModel, threads: int | None) -> RunnerSpec:
    """The engine on ``backend``, loading the artifact of its precision (exported untimed, in prepare)."""
    precision = ENGINE_PRECISION[backend]
    device = "cpu" if backend in ("ort", "ort-int8", "ort-spec") else "cuda"

    def prepare() -> None:
        why = ort_cuda_unavailable() if backend == "ort-cuda" else trt_unavailable() if backend == "trt" else None
        if why:
            raise Skipped(why)
        model.artifact(precision)
        if backend in DRAFT_PRECISION:
            model.artifact(DRAFT_PRECISION[backend])

    def load() -> Runner:
        from tokenizers import Tokenizer

        from engine.artifact import load_artifact
        path = model.artifact(precision)
        if backend in DRAFT_PRECISION:
            from engine.generator import Generator
            return SpeculativeRunner(Generator.from_pretrained(path, threads=threads, max_batch=16,
                                                               draft=model.artifact(DRAFT_PRECISION[backend])))
        art = load_artifact(path)
        tok = Tokenizer.from_file(str(art.tokenizer_path))
        if backend == "trt":
            from engine.backends.trt import TrtBackend
            be = TrtBackend(art)
        else:
            from engine.backends.ort import OrtBackend
            be = OrtBackend(art, device=device, threads=threads if device == "cpu" else None)
        return EngineRunner(be, art.config, tok)

    return RunnerSpec(f"engine-{backend}", precision, device, load, prepare, lossy=precision != "fp32",
                      threads=threads if device == "cpu" else None)


def peer_spec(peer: str, model: PreparedModel, threads: int | None) -> RunnerSpec:
    """HF transformers or CTranslate2 (fp32, or int8 weights) on the same checkpoint."""
    if peer == "hf":
        def load() -> Runner:
            try:
                import torch  # noqa: F401
                import transformers  # noqa: F401
            except ImportError as e:
                raise Skipped(f"transformers/torch not installed ({e})") from None
            return HFRunner(model.checkpoint_dir, threads)
        return RunnerSpec("hf", "fp32", "cpu", load, threads=threads, peer=peer)
    quant = "int8" if peer == "ct2-int8" else None

    def load_ct2() -> Runner:
        return CT2Runner(model.ct2_dir(quant), threads, "int8" if quant else "float32")
    # The conversion (prepare) raises Skipped when it fails: a peer we cannot build is not our failure.
    return RunnerSpec("ct2", "int8" if quant else "fp32", "cpu", load_ct2, lambda: model.ct2_dir(quant),
                      lossy=quant is not None,
                      threads=threads, peer=peer)
