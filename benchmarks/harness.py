"""The `gpt2-engine bench` runner: the engine, its peers and the physical floor, measured in one run.

For every model the runner prepares one set of weights (a Hugging Face checkpoint directory; for
`--init random` it is saved here, so the engine artifact, HF transformers and CTranslate2 all read the
same file), computes the reference once (HF `generate`, greedy), then for each runner (engine backend
or peer), in phases:

  load        artifact / checkpoint on disk -> ready to generate (timed: load_s)
  validate    greedy tokens for a fixed prompt against the reference; a runner that fails is recorded
              as "failed validation: ..." and never timed (parity before speed, STYLE.md 8)
  per config  (batch, prompt length, new tokens): `warmup` untimed runs, then `repeats` timed runs,
              each split into TTFT (prefill + first token), per-step decode times and end-to-end
  positions   decode latency vs context length: prefill p tokens, time a few single steps (median)

and finally places the floor (benchmarks/floor.py: measured bandwidth and GFLOP/s with the same thread
count) beside every CPU record, computes engine/peer ratios, and writes results.jsonl, table.md and
the plots (benchmarks/report.py) -- tables and plots come from the records only.

The engine and the peers (benchmarks/peers.py) implement one runner interface (peers.Runner), so
TTFT, per-step decode and end-to-end mean the same thing for all of them.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np
import psutil

from benchmarks import conditions as cond
from benchmarks import floor as fl
from benchmarks.records import BenchRecord, write_jsonl
from benchmarks.report import make_plots, markdown_table
from benchmarks.peers import CT2Runner, HFRunner, Runner, RunTiming, hf_logits, hf_reference, quiet_transformers
from benchmarks.stats import percentiles, rates, ratio
from engine.artifact import is_current_export
from engine.config import GPT2Config
from engine.errors import InputError

# --- what a run measures ------------------------------------------------------------------------

ENGINE_BACKENDS = ("ort", "ort-int8", "ort-cuda", "trt")
PEERS = ("hf", "ct2", "ct2-int8")
DEFAULT_PEERS = ("hf", "ct2")
DEFAULT_POSITIONS = (16, 128, 256, 512, 900, 1000)
QUICK_POSITIONS = (16, 256, 900)
POSITION_STEPS = 5             # decode steps timed per position; the median is recorded

# The validation prompt: fixed text, so every run and every runner is checked on the same tokens.
VALIDATION_TEXT = "The quick brown fox jumps over the lazy dog. It was a bright cold day in April"
VALIDATION_NEW_TOKENS = 16
# Lossy runners (int8 weights, fp16 on a GPU) compute a different function than the fp32 reference,
# and random init-0.1 networks are chaotic: a greedy token can differ from fp32 by a hair's margin
# (measured: gpt2-medium's engine int8 differs at token 1, CTranslate2 int8 matched 2 tokens by luck),
# so token agreement with the reference is a coin toss for them. Two checks instead, which an honest
# quantization passes and a broken runner fails:
# - weights, layout, positions: teacher-forced argmax agreement with HF fp32 (see ACCURACY_TOKENS) of
#   at least LOSSY_MIN_AGREEMENT; chance is 1 in 50257, measured int8 runners 38-76% on init 0.1;
# - the KV cache: each greedy token (the cache path) must be what the runner's own teacher-forced
#   logits over prompt + generated tokens (the prompt path) pick, up to near ties: its logit within
#   LOSSY_TIE_X_STD logit stds of the best. Measured over 16 tokens: 0 for the engine's int8, 0.02 for
#   CTranslate2 int8 on gpt2-medium; a cache that is ignored or misplaced picks a token several stds
#   below the best (the tests break one to show it).
LOSSY_MIN_AGREEMENT = 0.2
LOSSY_TIE_X_STD = 0.25
# What a lossy runner costs in accuracy, stated beside its timings (the gate only asks for
# LOSSY_MIN_AGREEMENT): its logits against HF fp32 at every position of one fixed random sequence,
# teacher-forced (both read the same tokens).
ACCURACY_TOKENS = 128

BYTES_PER_PARAM = {"fp32": 4, "fp16": 2, "int8": 1}
# CTranslate2 int8 quantizes weights only: the KV cache stays float32.
KV_BYTES = {"fp32": 4, "fp16": 2, "int8": 4}
# GPU backends run the fp16 artifact (DESIGN.md: fp16 is for GPUs; ORT CPU has no fp16 MatMul).
ENGINE_PRECISION = {"ort": "fp32", "ort-int8": "int8", "ort-cuda": "fp16", "trt": "fp16"}

STATUS_FAILED_VALIDATION = "failed validation"


class Skipped(Exception):
    """A runner that cannot run here (no GPU, a peer library missing, a conversion that failed)."""


# --- the validation gate (pure) -----------------------------------------------------------------

def validate_tokens(reference: Sequence[int], candidate: Sequence[int]) -> str | None:
    """None if ``candidate`` is the reference token for token, same length; else why not (what follows
    "failed validation: " in a record). The gate for every exact (fp32) runner."""
    ref = [int(t) for t in reference]
    cand = [int(t) for t in candidate]
    if not ref:
        raise ValueError("reference must hold at least one token")
    matched = matched_prefix(ref, cand)
    if matched == min(len(cand), len(ref)):
        if len(cand) == len(ref):
            return None
        return f"returned {len(cand)} tokens, the reference has {len(ref)}"
    return (f"greedy token {matched} is {cand[matched]}, reference {ref[matched]} "
            f"({matched}/{len(ref)} tokens match; gate: exact)")


def cache_path_gaps(prompt_len: int, generated: Sequence[int], own_logits: np.ndarray) -> np.ndarray:
    """How far below its own best each greedy token is, in logit stds: ``own_logits`` (P + N - 1, V)
    are the runner's teacher-forced logits over prompt + generated[:-1]; row P - 1 + i predicts token i.
    0 where the cache path picked what the prompt path picks. (N,) float64."""
    rows = np.asarray(own_logits, np.float64)[prompt_len - 1:prompt_len - 1 + len(generated)]
    if rows.shape[0] != len(generated):
        raise ValueError(f"own_logits has {len(own_logits)} rows, needs {prompt_len - 1 + len(generated)}")
    chosen = rows[np.arange(len(generated)), np.asarray(generated, np.int64)]
    return (rows.max(-1) - chosen) / float(np.asarray(own_logits, np.float64).std())


def validate_lossy(accuracy: dict, generated: Sequence[int], gaps: np.ndarray) -> str | None:
    """None if a lossy runner passes both checks described at LOSSY_MIN_AGREEMENT, else why not."""
    if "error" in accuracy:
        return f"its accuracy could not be measured ({accuracy['error']})"
    agree = accuracy["argmax_agreement"]
    if agree < LOSSY_MIN_AGREEMENT:
        return (f"teacher-forced argmax agreement with HF fp32 is {agree:.1%} (gate: at least "
                f"{LOSSY_MIN_AGREEMENT:.0%}; chance is ~0): wrong weights, layout or positions")
    worst = int(np.argmax(gaps))
    if gaps[worst] > LOSSY_TIE_X_STD:
        return (f"greedy token {worst} ({int(generated[worst])}) is {gaps[worst]:.2f} x logit std below the best "
                f"of the runner's own teacher-forced logits (gate: {LOSSY_TIE_X_STD}): its cache path "
                "disagrees with its prompt path")
    return None


def matched_prefix(reference: Sequence[int], candidate: Sequence[int]) -> int:
    n = 0
    for r, c in zip(reference, candidate):
        if int(r) != int(c):
            break
        n += 1
    return n


# --- the engine as a runner (the peers are in benchmarks/peers.py) ------------------------------

class EngineRunner:
    """The engine's own loop (engine.loop) over any Backend: what `Generator.generate` runs."""

    def __init__(self, backend, config: GPT2Config, tokenizer):
        self.backend, self.config, self.tokenizer = backend, config, tokenizer

    def _rows(self, prompts, n: int):
        from engine.loop import new_row
        from engine.sampling import SamplingParams
        params = SamplingParams.greedy(n, stop_at_eos=False)  # forced length, as the peers
        return [new_row([int(t) for t in p], params, self.tokenizer) for p in prompts]

    def _loop(self, prompts, n: int) -> tuple[list, RunTiming]:
        from engine.loop import LoopTimings, run_loop
        rows = self._rows(prompts, n)
        capacity = max(len(r.prompt_ids) for r in rows) + n
        t0 = time.perf_counter()
        steps = run_loop(self.backend, rows, capacity, self.config.eos_token_id, LoopTimings())
        next(steps)                              # cache allocation + prefill + first token
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
        from engine.loop import sequence_logits
        return sequence_logits(self.backend, np.asarray(ids, np.int64))        # (T, V)

    def run(self, prompts, n):
        return self._loop(prompts, n)[1]

    def decode_stepper(self, prompts, steps):
        """Prefill ``prompts`` (untimed); return a function that runs and times one more decode step
        (up to ``steps`` calls): what lets the position sweep interleave positions."""
        from engine.loop import decode_step, prefill
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

    def step_times_at(self, prompts, steps):
        step = self.decode_stepper(prompts, steps)
        return [step() for _ in range(steps)]

    def close(self):
        self.backend.close()


# --- memory -------------------------------------------------------------------------------------

class PeakRss:
    """Peak resident memory of THIS PROCESS over a phase, MB (1e6 bytes).

    RSS is process-wide: it includes the interpreter, every imported library (torch alone is a few
    hundred MB once the reference has been computed) and whatever an earlier runner left behind.
    Runners are closed and garbage-collected before the next loads, and each record also stores the
    RSS just before its runner loaded (``extra.rss_baseline_mb``), so peak - baseline approximates
    the runner's own footprint. On Linux the kernel's high-water mark (VmHWM) is reset at each phase
    (/proc/self/clear_refs, "5"), so transient peaks between samples are caught; elsewhere the peak
    is the max of psutil samples taken between runs. The reset also resets what getrusage (and so
    `/usr/bin/time -v`) reports for the process: after a bench, those show the last phase's peak.
    """

    def __init__(self):
        self.proc = psutil.Process()
        self._hwm_ok = False
        self._samples: list[int] = []

    @staticmethod
    def _vmhwm() -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def rss_mb(self) -> float:
        return self.proc.memory_info().rss / 1e6

    def reset(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._hwm_ok = self._vmhwm() is not None
        except OSError:
            self._hwm_ok = False
        self._samples = [self.proc.memory_info().rss]

    def sample(self) -> None:
        self._samples.append(self.proc.memory_info().rss)

    def peak_mb(self) -> float:
        self.sample()
        peak = max(self._samples)
        if self._hwm_ok:
            peak = max(peak, self._vmhwm() or 0)
        return peak / 1e6


def gpu_memory_mb() -> float | None:
    """GPU memory this process holds (nvidia-smi, all GPUs), MB; None without a GPU."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    import subprocess
    try:
        out = subprocess.run([exe, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    total = 0.0
    for line in out.strip().splitlines():
        pid, _, mib = (s.strip() for s in line.partition(","))
        if pid == str(os.getpid()) and mib.replace(".", "", 1).isdigit():
            total += float(mib) * 2**20 / 1e6
    return total


# --- models: one set of weights, every runner's format made from it -----------------------------

@dataclass(frozen=True)
class ModelSpec:
    """What to benchmark. ``init='random'``: random weights of ``config`` (saved once under the work
    dir); ``init='checkpoint'``: ``source`` is a checkpoint directory or a model name (hub cache)."""

    name: str
    init: str = "random"
    config: GPT2Config | None = None
    source: str | None = None
    seed: int = 0
    init_range: float = 0.1

    def __post_init__(self):
        if self.init not in ("random", "checkpoint"):
            raise InputError(f"init must be 'random' or 'checkpoint', got {self.init!r}")
        if self.init == "random" and self.config is None:
            raise InputError(f"random init of {self.name!r} needs a config")


@dataclass
class PreparedModel:
    name: str
    config: GPT2Config
    checkpoint_dir: Path
    weights: str                                  # "random" | "real" (BenchRecord.weights)
    work_dir: Path
    spec: ModelSpec
    setup_s: dict = field(default_factory=dict)   # seconds per setup phase (a reused one takes ~0 s)
    _artifacts: dict = field(default_factory=dict)
    _ct2: dict = field(default_factory=dict)

    def artifact(self, precision: str) -> Path:
        """The engine's model directory for this checkpoint (exported once, then reused)."""
        if precision in self._artifacts:
            return self._artifacts[precision]
        t0 = time.perf_counter()
        if self.weights == "real":
            from engine.generator import resolve_model_dir
            # Real checkpoints resolve as `gpt2-engine generate` does: shared with the engine's cache.
            path = resolve_model_dir(self.spec.source or str(self.checkpoint_dir), precision, show_progress=False)
        else:
            from export.exporter import export_model
            path = self.work_dir / f"engine-{precision}"
            if not is_current_export(path):  # absent, or made by an older exporter: export again
                export_model(str(self.checkpoint_dir), path, precision=precision, force=True, show_progress=False)
        self.setup_s[f"export_{precision}"] = round(time.perf_counter() - t0, 2)
        self._artifacts[precision] = path
        return path

    def ct2_dir(self, quantization: str | None) -> Path:
        """This checkpoint converted by CTranslate2's TransformersConverter (once, then reused)."""
        key = quantization or "float32"
        if key in self._ct2:
            if isinstance(self._ct2[key], Exception):
                raise self._ct2[key]
            return self._ct2[key]
        t0 = time.perf_counter()
        out = self.work_dir / f"ct2-{key}"
        try:
            import ctranslate2
        except ImportError as e:
            self._ct2[key] = Skipped(f"ctranslate2 not installed ({e}): `pip install ctranslate2`")
            raise self._ct2[key] from None
        if not (out / "model.bin").is_file():
            tmp = self.work_dir / f".ct2-{key}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                quiet_transformers()  # the converter loads the checkpoint through transformers
                ctranslate2.converters.TransformersConverter(str(self._ct2_source())).convert(
                    str(tmp), quantization=quantization, force=True)
            except Exception as e:  # noqa: BLE001 -- converter/transformers incompatibilities come in many types
                shutil.rmtree(tmp, ignore_errors=True)
                self._ct2[key] = Skipped(f"CTranslate2 conversion failed ({type(e).__name__}: {str(e)[:200]})")
                raise self._ct2[key] from None
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
        self.setup_s[f"convert_ct2_{key}"] = round(time.perf_counter() - t0, 2)
        self._ct2[key] = out
        return out

    def _ct2_source(self) -> Path:
        """The checkpoint as the converter wants it: it reads the vocabulary from the checkpoint's
        tokenizer, which a bare config.json + model.safetensors directory lacks. Then links to the
        user's files plus GPT-2's tokenizer, in the work dir (the user's directory is not touched)."""
        ckpt = self.checkpoint_dir
        if any((ckpt / f).is_file() for f in ("tokenizer.json", "vocab.json")):
            return ckpt
        src = self.work_dir / "ct2-source"
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        for f in ckpt.iterdir():
            if f.is_file():
                (src / f.name).symlink_to(f.resolve())
        _write_tokenizer_files(src)
        return src


def _write_tokenizer_files(directory: Path) -> None:
    """GPT-2's tokenizer beside the weights: CTranslate2's converter builds its vocabulary from the
    checkpoint's tokenizer (AutoTokenizer), and the exporter copies tokenizer.json from there too."""
    from export.tokenizer import SHIPPED_TOKENIZER
    shutil.copy(SHIPPED_TOKENIZER, directory / "tokenizer.json")
    eos = "<|endoftext|>"
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2TokenizerFast", "model_max_length": 1024,
         "bos_token": eos, "eos_token": eos, "unk_token": eos}, indent=2))


def prepare_model(spec: ModelSpec, work_root: Path) -> PreparedModel:
    """The checkpoint directory every runner reads; random weights are saved once and reused."""
    from export.checkpoint import config_from_hf
    if spec.init == "random":
        from export.checkpoint import random_weights, save_checkpoint
        work = Path(work_root) / f"{spec.name}-random-seed{spec.seed}-init{spec.init_range:g}"
        ckpt = work / "checkpoint"
        t0 = time.perf_counter()
        done = ckpt / "complete"
        if not (done.is_file() and config_from_hf(ckpt / "config.json") == spec.config):
            # A different config under the same name (or a half-written directory): start over.
            shutil.rmtree(work, ignore_errors=True)
            tmp = work / ".checkpoint.partial"
            save_checkpoint(tmp, spec.config, random_weights(spec.config, spec.seed, spec.init_range))
            _write_tokenizer_files(tmp)
            (tmp / "complete").write_text("")
            tmp.rename(ckpt)
        prepared = PreparedModel(spec.name, spec.config, ckpt, "random", work, spec)
        prepared.setup_s["save_checkpoint"] = round(time.perf_counter() - t0, 2)
        return prepared
    from engine.config import HUB_IDS, canonical_size_name
    from export.checkpoint import find_in_hub_cache, resolve_checkpoint
    src = Path(spec.source or spec.name).expanduser()
    if (src / "manifest.json").is_file():
        raise InputError(f"{src} is an exported model directory; bench needs the checkpoint it came from "
                         "(config.json + model.safetensors), because the reference and the peers load it")
    if src.is_dir():
        ckpt = src
    else:
        size = canonical_size_name(str(spec.source or spec.name))
        found = find_in_hub_cache(HUB_IDS[size]) if size else None
        ckpt = found or resolve_checkpoint(str(spec.source or spec.name)).directory  # downloads if needed
    import hashlib
    work = Path(work_root) / f"ckpt-{hashlib.sha256(str(ckpt.resolve()).encode()).hexdigest()[:12]}"
    work.mkdir(parents=True, exist_ok=True)
    return PreparedModel(spec.name, config_from_hf(ckpt / "config.json"), ckpt, "real", work, spec)


# --- the plan and the per-runner path -----------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    batches: tuple[int, ...] = (1,)
    prompt_lens: tuple[int, ...] = (32,)
    new_tokens: tuple[int, ...] = (128,)
    backends: tuple[str, ...] = ("ort",)
    peers: tuple[str, ...] = DEFAULT_PEERS
    threads: int | None = None
    repeats: int = 5
    warmup: int = 1
    positions: tuple[int, ...] = DEFAULT_POSITIONS   # () = no position sweep
    position_steps: int = POSITION_STEPS
    peer_max_batch: int | None = None   # peers skip larger batches (they take minutes there); None = all
    kernel_ceiling: bool = True         # batch > 1 with backend "ort": also time ORT's kernels alone (kernel_scaling)

    def __post_init__(self):
        for name in ("batches", "prompt_lens", "new_tokens"):
            v = getattr(self, name)
            if not v or min(v) < 1:
                raise InputError(f"{name} must be one or more integers >= 1, got {v}")
        if self.repeats < 1:
            raise InputError(f"repeats must be >= 1, got {self.repeats}")
        if self.warmup < 0:
            raise InputError(f"warmup must be >= 0, got {self.warmup}")
        bad = [b for b in self.backends if b not in ENGINE_BACKENDS] + [p for p in self.peers if p not in PEERS]
        if bad:
            raise InputError(f"unknown backend/peer {bad[0]!r}: backends are {', '.join(ENGINE_BACKENDS)}, "
                             f"peers {', '.join(PEERS)}")
        if self.positions and min(self.positions) < 1:
            raise InputError(f"positions must be >= 1, got {self.positions}")
        if self.peer_max_batch is not None and self.peer_max_batch < 1:
            raise InputError(f"peer_max_batch must be >= 1, got {self.peer_max_batch}")

    @property
    def configs(self) -> list[tuple[int, int, int]]:
        return [(b, p, n) for b in self.batches for p in self.prompt_lens for n in self.new_tokens]


@dataclass
class RunnerSpec:
    """One runner to measure: its record name, precision, device and how to load it."""

    backend: str                        # record name: engine-ort, engine-trt, hf, ct2, ...
    precision: str
    device: str
    load: Callable[[], Runner]          # timed (load_s); may raise Skipped (cannot run here) or fail
    prepare: Callable[[], None] | None = None  # untimed, before load: export / conversion, availability
    lossy: bool = False                 # validated by the lossy gate (see LOSSY_MIN_AGREEMENT)
    threads: int | None = None
    peer: str | None = None             # "hf" | "ct2" | "ct2-int8" for peers; None for the engine


def prompt_ids(batch: int, length: int, vocab: int, eos: int) -> np.ndarray:
    """The timed prompts: fixed per (batch, length), shared by every runner. (B, T) int64."""
    rng = np.random.default_rng([batch, length])
    return rng.integers(0, min(vocab, eos) if eos > 0 else vocab, size=(batch, length), dtype=np.int64)


def _short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:300]}" if msg else type(e).__name__


def accuracy_ids(config: GPT2Config) -> np.ndarray:
    """The fixed sequence lossy runners' accuracy is measured on: (ACCURACY_TOKENS,) int64."""
    return prompt_ids(1, ACCURACY_TOKENS, config.vocab_size, config.eos_token_id)[0]


def accuracy_figures(got: np.ndarray, ref: np.ndarray) -> dict:
    """Teacher-forced accuracy of logits `got` against the reference `ref`, both (T, V)."""
    err = np.abs(got.astype(np.float64) - ref)
    spread = float(ref.std())
    return {"argmax_agreement": round(float((got.argmax(-1) == ref.argmax(-1)).mean()), 4),
            "max_abs_err": round(float(err.max()), 4), "max_abs_err_x_std": round(float(err.max()) / spread, 4),
            "mean_abs_err_x_std": round(float(err.mean()) / spread, 5), "positions": int(ref.shape[0]),
            "against": "HF fp32 logits, teacher-forced"}


def measure_runner(spec: RunnerSpec, model: PreparedModel, plan: Plan, reference: list[int] | None,
                   validation_prompt: Sequence[int], *, conditions: dict | None = None, log: Callable[[str], None] = lambda s: None,
                   progress: Callable[[str], None] = lambda s: None,
                   accuracy_ref: np.ndarray | None = None) -> list[BenchRecord]:
    """Load, validate, time every configuration of ``plan`` and the position sweep for one runner.

    Always returns one record per configuration: timed ("ok"), or with the status that says why not
    ("skipped: ...", "failed: ...", "failed validation: ..."). ``progress`` is called once per
    configuration (whatever its fate), ``log`` with human-readable notes. For a lossy runner,
    ``accuracy_ref`` (HF fp32 logits over ``accuracy_ids``) adds its accuracy figures to every record.
    """
    cfg = model.config
    base = dict(backend=spec.backend, model=model.name, precision=spec.precision, weights=model.weights,
                threads=spec.threads, device=spec.device, conditions=conditions)
    common_extra = {"setup_s": dict(model.setup_s)}
    if model.weights == "random":
        common_extra.update(seed=model.spec.seed, init_range=model.spec.init_range)

    def untimed(status: str, extra: dict | None = None) -> list[BenchRecord]:
        out = []
        for b, p, n in plan.configs:
            out.append(BenchRecord(batch=b, prompt_len=p, new_tokens=n, status=status,
                                   extra={**common_extra, **(extra or {})}, **base))
            progress(f"{model.name} {spec.backend} {spec.precision}")
        return out

    if reference is None:
        return untimed("skipped: no reference to validate against (HF transformers + torch are needed: "
                       "`pip install 'gpt2-engine[bench]'`)")

    rss = PeakRss()
    phase = "prepare"
    try:
        if spec.prepare is not None:
            spec.prepare()                   # untimed: availability, export, conversion
        phase = "load"
        release_memory()
        baseline = rss.rss_mb()
        rss.reset()
        t0 = time.perf_counter()
        runner = spec.load()
    except Skipped as e:
        log(f"{spec.backend} {spec.precision}: skipped: {e}")
        return untimed(f"skipped: {e}")
    except Exception as e:  # noqa: BLE001 -- a runner that cannot load is a result, not a crash
        log(f"{spec.backend} {spec.precision}: failed to {phase}: {_short_error(e)}")
        return untimed(f"failed: {phase}: {_short_error(e)}")
    load_s = time.perf_counter() - t0
    load_peak = rss.peak_mb()
    common_extra.update(rss_baseline_mb=round(baseline, 1), load_peak_rss_mb=round(load_peak, 1))
    common_extra["setup_s"] = dict(model.setup_s)  # the export / conversion prepare may have added
    try:
        # --- validate: parity before speed ----------------------------------------------------
        try:
            got = runner.greedy(validation_prompt, len(reference))
        except Exception as e:  # noqa: BLE001
            log(f"{spec.backend} {spec.precision}: failed during validation: {_short_error(e)}")
            return untimed(f"failed: validation run: {_short_error(e)}", {"load_s": load_s})
        agree = matched_prefix(reference, got)
        if spec.lossy:
            reason, verdict, acc = _validate_lossy_runner(runner, cfg, validation_prompt, got, accuracy_ref)
            if acc is not None:
                common_extra["accuracy"] = acc
            if acc and "error" not in acc:
                log(f"{spec.backend} {spec.precision}: accuracy vs HF fp32 over {acc['positions']} teacher-forced "
                    f"positions: argmax agreement {acc['argmax_agreement']:.1%}, max |logit error| "
                    f"{acc['max_abs_err_x_std']:.3f} x logit std")
        else:
            reason, verdict = validate_tokens(reference, got), {"gate": "exact"}
        common_extra["validation"] = {"matched_prefix": agree, "of": len(reference), **verdict}
        if reason is not None:
            log(f"{spec.backend} {spec.precision}: FAILED validation, not timed: {reason}")
            return untimed(f"{STATUS_FAILED_VALIDATION}: {reason}")
        log(f"{spec.backend} {spec.precision}: {agree}/{len(reference)} greedy tokens match the reference"
            + ("" if not spec.lossy else f" (lossy gate: teacher-forced agreement and cache path, max gap "
               f"{verdict['max_gap_x_std']:.3f} x std)")
            + f"; loaded in {load_s:.2f} s")

        # --- configurations ---------------------------------------------------------------------
        records: list[BenchRecord] = []
        for b, p, n in plan.configs:
            rec = BenchRecord(batch=b, prompt_len=p, new_tokens=n, warmup=plan.warmup, **base,
                              extra=dict(common_extra))
            if p + n > cfg.n_positions:
                rec.status = f"skipped: prompt {p} + new tokens {n} > context {cfg.n_positions}"
            elif spec.peer and plan.peer_max_batch is not None and b > plan.peer_max_batch:
                rec.status = f"skipped: peers run up to batch {plan.peer_max_batch} (--peer-max-batch)"
            else:
                prompts = prompt_ids(b, p, cfg.vocab_size, cfg.eos_token_id)
                try:
                    _time_config(rec, runner, prompts, n, plan, rss)
                except Exception as e:  # noqa: BLE001 -- one failing configuration does not end the run
                    log(f"{spec.backend} b{b} p{p} n{n}: failed: {_short_error(e)}")
                    log(traceback.format_exc(limit=3))
                    rec = BenchRecord(batch=b, prompt_len=p, new_tokens=n, **base, extra=dict(common_extra),
                                      status=f"failed: {_short_error(e)}")
            if rec.ok:
                rec.load_s = load_s  # one load serves every configuration of this runner
            records.append(rec)
            progress(f"{model.name} {spec.backend} {spec.precision} b{b} p{p} n{n}")

        # --- decode latency vs context position -----------------------------------------------
        ok = [r for r in records if r.ok]
        if plan.positions and ok:
            b = min(r.batch for r in ok)
            try:
                per_pos, peak = _position_sweep(runner, cfg, b, plan, rss)
            except Exception as e:  # noqa: BLE001
                log(f"{spec.backend}: position sweep failed: {_short_error(e)}")
            else:
                # Attached once (to the first record of the smallest batch) so each runner draws one line.
                first = next(r for r in ok if r.batch == b)
                first.per_position = per_pos
                first.extra.update(per_position_batch=b, per_position_steps=plan.position_steps,
                                   per_position_peak_rss_mb=round(peak, 1))
        return records
    finally:
        runner.close()
        del runner
        release_memory()


def _validate_lossy_runner(runner: Runner, cfg: GPT2Config, prompt: Sequence[int], got: list[int],
                           accuracy_ref: np.ndarray | None) -> tuple[str | None, dict, dict | None]:
    """The lossy gate (see LOSSY_MIN_AGREEMENT) on a loaded runner: (why it fails or None, the gate's
    record, the accuracy figures or None when they could not be asked for)."""
    verdict: dict = {"gate": f"lossy: agreement >= {LOSSY_MIN_AGREEMENT}, cache-path gap <= {LOSSY_TIE_X_STD} x std"}
    if accuracy_ref is None or not hasattr(runner, "logits"):
        return ("a lossy runner needs teacher-forced logits (a `logits` method) and HF fp32 logits to be checked",
                verdict, None)
    acc = None
    try:
        acc = accuracy_figures(runner.logits(accuracy_ids(cfg)), accuracy_ref)
        gaps = cache_path_gaps(len(prompt), got, runner.logits(list(prompt) + got[:-1]))
    except Exception as e:  # noqa: BLE001 -- recorded as the reason it was not timed
        return f"teacher-forced logits failed: {_short_error(e)}", verdict, acc or {"error": _short_error(e)}
    verdict["max_gap_x_std"] = round(float(gaps.max()), 4)
    return validate_lossy(acc, got, gaps), verdict, acc


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so the next runner's RSS baseline is not
    inflated by the previous one's freed-but-kept pages (measured: ~400 MB left behind by a closed
    ORT session without malloc_trim)."""
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim with
        pass


def _time_config(rec: BenchRecord, runner: Runner, prompts: np.ndarray, n: int, plan: Plan, rss: PeakRss) -> None:
    """Warm up, then time ``plan.repeats`` runs into ``rec`` (percentiles over the runs)."""
    b = prompts.shape[0]
    rss.reset()
    for _ in range(plan.warmup):
        runner.run(prompts, n)
    runs: list[RunTiming] = []
    for _ in range(plan.repeats):
        runs.append(runner.run(prompts, n))
        rss.sample()
    rec.ttft = percentiles(r.ttft_s for r in runs)
    if n > 1:
        bad = [len(r.step_s) for r in runs if len(r.step_s) != n - 1]
        if bad:
            raise RuntimeError(f"a run made {bad[0] + 1} tokens, expected {n}")
        rec.decode_per_token = percentiles(float(np.mean(r.step_s)) for r in runs)
        # Per-run means hide a slow step; the pooled steps show the per-token tail.
        rec.extra["decode_step_all"] = percentiles(s for r in runs for s in r.step_s)
    rec.e2e = percentiles(r.e2e_s for r in runs)
    rec.tokens_per_s = percentiles(rates(b * n, (r.e2e_s for r in runs)))
    rec.peak_rss_mb = round(rss.peak_mb(), 1)
    if rec.device != "cpu":
        rec.gpu_mem_mb = gpu_memory_mb()


def _position_sweep(runner: Runner, cfg: GPT2Config, batch: int, plan: Plan, rss: PeakRss):
    """Median decode-step time at each of ``plan.positions``: [[position, seconds], ...], and peak RSS.

    Runners with a ``decode_stepper`` (the engine, HF) are interleaved: every position is prefilled
    once, then the sweep takes one step at each position per round, 2 x position_steps rounds,
    alternating direction. Bursts of load on a shared machine then land on every position alike
    (a block-per-position sweep read 1.35x for 1000 vs 16 in one run where an interleaved loop read
    1.15x). Others (CTranslate2, whose token stream runs ahead in its own thread) get blocks of steps
    per position, up then down, each position's median over both passes.
    """
    rss.reset()
    steps = plan.position_steps
    rounds = 2 * steps
    order = [p for p in sorted(set(plan.positions)) if p + rounds <= cfg.n_positions]  # room for the steps
    times: dict[int, list[float]] = {p: [] for p in order}
    if hasattr(runner, "decode_stepper"):
        steppers = {p: runner.decode_stepper(prompt_ids(batch, p, cfg.vocab_size, cfg.eos_token_id), rounds)
                    for p in order}
        rss.sample()
        for r in range(rounds):
            for pos in (order if r % 2 == 0 else order[::-1]):
                times[pos].append(steppers[pos]())
        rss.sample()
    else:
        for pos in order + order[::-1]:
            prompts = prompt_ids(batch, pos, cfg.vocab_size, cfg.eos_token_id)
            times[pos] += runner.step_times_at(prompts, steps)
            rss.sample()
    return [[p, float(np.median(times[p]))] for p in order], rss.peak_mb()


# --- runner specs for a model ---------------------------------------------------------------------

def _ort_cuda_available() -> str | None:
    """None if ORT can run on a CUDA GPU here, else why not."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "no GPU/CUDA: onnxruntime has no CUDAExecutionProvider (`pip install onnxruntime-gpu`)"
    if cond._gpus() is None:
        return "no GPU (nvidia-smi finds none)"
    return None


def _trt_available() -> str | None:
    if cond._gpus() is None:
        return "no GPU/TensorRT (nvidia-smi finds no GPU)"
    try:
        from engine.trt_build import import_tensorrt
        import_tensorrt()
    except Exception as e:  # noqa: BLE001 -- ImportError or BackendUnavailable: either way not here
        return f"no TensorRT ({_short_error(e)})"
    return None


def engine_spec(backend: str, model: PreparedModel, threads: int | None) -> RunnerSpec:
    precision = ENGINE_PRECISION[backend]
    device = "cpu" if backend in ("ort", "ort-int8") else "cuda"

    def prepare() -> None:
        why = _ort_cuda_available() if backend == "ort-cuda" else _trt_available() if backend == "trt" else None
        if why:
            raise Skipped(why)
        model.artifact(precision)

    def load() -> Runner:
        from engine.artifact import load_artifact
        from tokenizers import Tokenizer
        path = model.artifact(precision)
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


# --- ratios, outputs ------------------------------------------------------------------------------

KERNEL_CEILING_REPEATS = 10  # interleaved rounds; ~10 s for gpt2, ~30 s for gpt2-medium at prompt 32


def kernel_ceilings(cfg: GPT2Config, plan: Plan, say: Callable[[str], None]) -> dict[tuple, dict]:
    """benchmarks/kernel_scaling.py for this run's batch > 1 configurations at its shortest prompt (the
    throughput configuration; a long prompt's prefill would make the probe take minutes): the
    end-to-end tokens/s scaling a graph made of nothing but ORT's kernels would reach. Keyed like the
    records, (batch, prompt_len, new_tokens)."""
    from benchmarks import kernel_scaling as ks
    batches = tuple(b for b in plan.batches if b > 1)
    p = min(plan.prompt_lens)
    out = {}
    for n in plan.new_tokens:
        try:
            results = ks.measure(cfg, batches, p, n, plan.threads or 1, KERNEL_CEILING_REPEATS, progress=lambda _: None)
        except Exception as e:  # a probe beside the run: its failure is reported, never ends the run
            say(f"kernel ceiling not measured for prompt {p} + {n} new tokens: {_short_error(e)}")
            continue
        for r in results:
            out[(r.batch, p, n)] = {
                "tokens_scaling": round(r.tokens_scaling, 3), "step_scaling": round(r.step_scaling, 3),
                "position": r.position, "repeats": KERNEL_CEILING_REPEATS,
                **{f"{part}_ms": {str(b): round(t * 1e3, 3) for b, t in getattr(r, f"{part}_s").items()}
                   for part in ("linear", "attention", "prefill")}}
    return out


def attach_kernel_ceiling(records: list[BenchRecord], model: str, ceilings: dict[tuple, dict]) -> None:
    """On the fp32 ORT engine's records (whose graph is made of those kernels)."""
    for r in records:
        if r.model == model and r.backend == "engine-ort" and (r.batch, r.prompt_len, r.new_tokens) in ceilings:
            r.extra["kernel_ceiling"] = ceilings[(r.batch, r.prompt_len, r.new_tokens)]


def _key(r: BenchRecord) -> tuple:
    return (r.model, r.batch, r.prompt_len, r.new_tokens)


def add_ratios(records: list[BenchRecord]) -> None:
    """Engine vs floor and vs each peer, on p50s (< 1 vs a peer: the engine is faster)."""
    peers: dict[tuple, dict[str, BenchRecord]] = {}
    by_batch_one = {(r.backend, r.precision, r.model, r.prompt_len, r.new_tokens): r
                    for r in records if r.ok and r.batch == 1}
    for r in records:
        if r.ok and not r.backend.startswith("engine-"):
            name = r.backend if r.precision == "fp32" else f"{r.backend}-{r.precision}"
            peers.setdefault(_key(r), {})[name] = r
    for r in records:
        if not r.ok:
            continue
        if r.floor and r.decode_per_token:
            r.ratios["x_floor"] = ratio(r.decode_per_token["p50"], r.floor["decode_floor_s"])
        if r.floor and r.ttft:
            r.ratios["ttft_x_prefill_floor"] = ratio(r.ttft["p50"], r.floor["prefill_floor_s"])
        if not r.backend.startswith("engine-"):
            continue
        one = by_batch_one.get((r.backend, r.precision, r.model, r.prompt_len, r.new_tokens))
        if r.batch > 1 and one is not None and r.tokens_per_s and one.tokens_per_s:
            r.ratios["tokens_scaling"] = ratio(r.tokens_per_s["p50"], one.tokens_per_s["p50"])
            ceiling = (r.extra or {}).get("kernel_ceiling")
            if ceiling:
                r.ratios["of_kernel_ceiling"] = ratio(r.ratios["tokens_scaling"], ceiling["tokens_scaling"])
        for name, p in peers.get(_key(r), {}).items():
            if r.decode_per_token and p.decode_per_token:
                r.ratios[f"decode_vs_{name}"] = ratio(r.decode_per_token["p50"], p.decode_per_token["p50"])
            if r.ttft and p.ttft:
                r.ratios[f"ttft_vs_{name}"] = ratio(r.ttft["p50"], p.ttft["p50"])


def ratios_table(records: list[BenchRecord]) -> str:
    """Engine / peer on p50 decode ms/token and TTFT, and the engine's multiple of the floor."""
    engine = [r for r in records if r.ok and r.backend.startswith("engine-")]
    names = sorted({k[len("decode_vs_"):] for r in engine for k in r.ratios if k.startswith("decode_vs_")}
                   | {k[len("ttft_vs_"):] for r in engine for k in r.ratios if k.startswith("ttft_vs_")})
    if not engine:
        return "(no engine record was timed: no ratios)"
    cols = ["backend", "model", "batch", "prompt", "new", "decode ms p50", "x floor"]
    cols += [f"decode / {n}" for n in names] + [f"TTFT / {n}" for n in names]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def x(v):
        return "-" if v is None else f"{v:.2f}x"
    for r in engine:
        row = [r.backend, r.model, str(r.batch), str(r.prompt_len), str(r.new_tokens),
               f"{r.decode_per_token['p50'] * 1e3:.1f}" if r.decode_per_token else "-", x(r.ratios.get("x_floor"))]
        row += [x(r.ratios.get(f"decode_vs_{n}")) for n in names] + [x(r.ratios.get(f"ttft_vs_{n}")) for n in names]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def scaling_table(records: list[BenchRecord]) -> str | None:
    """The engine's tokens/s at batch B over batch 1, beside what ORT's kernels alone allow."""
    rows = [r for r in records if r.ok and "tokens_scaling" in r.ratios]
    if not rows:
        return None
    lines = ["| backend | model | batch | prompt | new | tokens/s x batch 1 | kernel ceiling | of the ceiling "
             "| kernels: linear / attention per step, x batch 1 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = (r.extra or {}).get("kernel_ceiling")
        if c:
            b = str(r.batch)
            kern = (f"{c['tokens_scaling']:.2f}x", f"{r.ratios['of_kernel_ceiling']:.0%}",
                    f"{c['linear_ms'][b]:.2f} ms ({c['linear_ms'][b] / c['linear_ms']['1']:.2f}x) / "
                    f"{c['attention_ms'][b]:.2f} ms ({c['attention_ms'][b] / c['attention_ms']['1']:.2f}x)")
        else:
            kern = ("-", "-", "-")
        lines.append(f"| {r.backend} | {r.model} | {r.batch} | {r.prompt_len} | {r.new_tokens} | "
                     f"{r.ratios['tokens_scaling']:.2f}x | " + " | ".join(kern) + " |")
    return "\n".join(lines)


def accuracy_table(records: list[BenchRecord]) -> str | None:
    """One row per lossy runner and model: its accuracy figures (the same on every configuration)."""
    seen: dict[tuple, dict] = {}
    for r in records:
        acc = (r.extra or {}).get("accuracy")
        if acc:
            seen.setdefault((r.backend, r.model, r.precision), acc)
    if not seen:
        return None
    lines = ["| backend | model | precision | argmax agreement | max abs logit error | (x logit std) | mean (x std) |",
             "|---|---|---|---|---|---|---|"]
    for (backend, model, precision), a in seen.items():
        if "error" in a:
            lines.append(f"| {backend} | {model} | {precision} | not measured: {a['error']} | | | |")
        else:
            lines.append(f"| {backend} | {model} | {precision} | {a['argmax_agreement']:.1%} | {a['max_abs_err']:.3f} "
                         f"| {a['max_abs_err_x_std']:.3f} | {a['mean_abs_err_x_std']:.4f} |")
    return "\n".join(lines)


@dataclass
class BenchResult:
    records: list[BenchRecord]
    out_dir: Path
    header: str
    table: str
    ratios: str
    plots: list[Path]
    scaling: str | None = None


def write_outputs(records: list[BenchRecord], out_dir: Path, header: str) -> BenchResult:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "results.jsonl", records)
    table = markdown_table(records)
    rtable = ratios_table(records)
    plots = make_plots(records, out_dir)
    md = ["# gpt2-engine bench", "", "```", header, "```", "", table, "",
          "## Engine vs peers and floor (p50; below 1x against a peer, the engine is faster)", "", rtable]
    stable = scaling_table(records)
    if stable:
        md += ["", "## Batch scaling (tokens/s p50 over batch 1's) vs ONNX Runtime's kernels alone "
               "(`gpt2-engine bench-kernels`: the end-to-end scaling of a graph made only of its linear "
               "and attention kernels, best of interleaved rounds)", "", stable]
    atable = accuracy_table(records)
    if atable:
        md += ["", f"## Lossy runners' accuracy (vs HF fp32 logits, teacher-forced on {ACCURACY_TOKENS} fixed "
               f"random tokens; the lossy gate asks for >= {LOSSY_MIN_AGREEMENT:.0%} agreement)", "", atable]
    if plots:
        md += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    (out_dir / "table.md").write_text("\n".join(md) + "\n")
    return BenchResult(records, out_dir, header, table, rtable, plots, stable)


def run_bench(models: Sequence[ModelSpec], plan: Plan, out_dir: Path, *, work_root: Path,
              floor_rates: tuple[float, float] | None = None, show_progress: bool = True,
              log: Callable[[str], None] | None = None) -> BenchResult:
    """Measure every model x runner x configuration of ``plan``; write and return the results.

    ``floor_rates`` (bandwidth GB/s, GFLOP/s) skips the floor measurement (tests); by default both
    are measured once here with ``plan.threads`` threads.
    """
    from tqdm import tqdm

    t_start = time.perf_counter()
    conditions = cond.collect_conditions()
    runners_per_model = len(plan.backends) + len(plan.peers)
    bar = tqdm(total=len(models) * runners_per_model * len(plan.configs), desc="bench", unit="config",
               disable=not show_progress, file=sys.stderr, dynamic_ncols=True)
    say = log or (lambda s: bar.write(s, file=sys.stderr))

    def step(label: str) -> None:
        bar.set_postfix_str(label, refresh=False)
        bar.update(1)

    threads = plan.threads
    if floor_rates is None:
        bar.set_postfix_str(f"floor: bandwidth and GFLOP/s, {threads} threads")
        floor_rates = (fl.measure_memory_bandwidth(threads or 1), fl.measure_matmul_gflops(threads or 1))
    bw, gflops = floor_rates
    busy = _busy_warning(conditions)
    if busy:
        say(f"warning: {busy}")
    say(f"floor: {bw:.1f} GB/s memory bandwidth, {gflops:.0f} GFLOP/s fp32 matmul ({threads} threads)")

    records: list[BenchRecord] = []
    try:
        for mspec in models:
            bar.set_postfix_str(f"{mspec.name}: preparing weights")
            model = prepare_model(mspec, work_root)
            tok = _tokenizer()
            vprompt = tok.encode(VALIDATION_TEXT, add_special_tokens=False).ids
            reference = None
            bar.set_postfix_str(f"{mspec.name}: HF reference")
            try:
                t0 = time.perf_counter()
                reference = hf_reference(model.checkpoint_dir, vprompt, VALIDATION_NEW_TOKENS, threads)
                release_memory()
                model.setup_s["reference"] = round(time.perf_counter() - t0, 2)
                say(f"{model.name}: reference = HF generate, greedy, {len(reference)} tokens after a "
                    f"{len(vprompt)}-token prompt ({len(set(reference))} distinct)")
            except ImportError as e:
                say(f"{model.name}: no reference (transformers/torch not installed: {e}); nothing is timed")
            specs = [engine_spec(b, model, threads) for b in plan.backends]
            specs += [peer_spec(p, model, threads) for p in plan.peers]
            acc_ref = None
            if reference is not None and any(s.lossy for s in specs):
                acc_ref = hf_logits(model.checkpoint_dir, accuracy_ids(model.config), threads)
                release_memory()
            for spec in specs:
                bar.set_postfix_str(f"{model.name} {spec.backend} {spec.precision}: load + validate")
                recs = measure_runner(spec, model, plan, reference, vprompt, conditions=conditions,
                                      log=say, progress=step, accuracy_ref=acc_ref)
                for r in recs:
                    if r.ok and r.device == "cpu":  # the floor is this CPU's; a GPU run has its own
                        r.floor = fl.floor_record(
                            model.config, batch=r.batch, prompt_len=r.prompt_len, new_tokens=r.new_tokens,
                            bytes_per_param=BYTES_PER_PARAM[r.precision], bandwidth_GBps=bw, gflops=gflops,
                            kv_bytes_per_elem=KV_BYTES[r.precision])
                records.extend(recs)
            if plan.kernel_ceiling and "ort" in plan.backends and max(plan.batches) > 1:
                bar.set_postfix_str(f"{model.name}: ONNX Runtime's kernels alone (batch scaling ceiling)")
                attach_kernel_ceiling(records, model.name, kernel_ceilings(model.config, plan, say))
    except KeyboardInterrupt:
        say("interrupted: writing the records measured so far")
    finally:
        bar.close()
    add_ratios(records)
    wall = time.perf_counter() - t_start
    extra = {
        "threads": threads,
        "repeats / warmup": f"{plan.repeats} / {plan.warmup}",
        "floor": f"{bw:.1f} GB/s read bandwidth, {gflops:.0f} GFLOP/s fp32 matmul ({threads} threads)",
        "weights": "; ".join(_weights_label(m) for m in models),
        "validation": f"greedy {VALIDATION_NEW_TOKENS} tokens vs HF generate (exact); lossy precisions: "
                      f"teacher-forced argmax agreement with HF fp32 >= {LOSSY_MIN_AGREEMENT:.0%} and greedy "
                      f"tokens within {LOSSY_TIE_X_STD} x logit std of their own teacher-forced best",
        "memory": "peak RSS is process-wide (see extra.rss_baseline_mb per record)",
        "load avg 1m at end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        **({"warning": busy} if busy else {}),
        "wall": f"{wall:.0f} s",
    }
    header = cond.format_header(conditions, extra)
    return write_outputs(records, out_dir, header)


def _busy_warning(conditions: dict) -> str | None:
    """Other work on the machine at the start: every number below is then noisy, say so up front."""
    load, cores = conditions.get("load_avg_1m"), conditions.get("physical_cores") or 1
    if load is None or load < 0.5:
        return None
    return (f"the machine was busy before this run (load avg {load} on {cores} cores): other processes "
            "compete for the cores, so timings are noisy and slower than on an idle machine; torch (HF) "
            "suffers most (measured on a busy 2-core machine: ~4x slower per token at 2 threads than at 1)")


def _weights_label(m: ModelSpec) -> str:
    if m.init == "random":
        return f"{m.name}: random (seed {m.seed}, init range {m.init_range:g})"
    return f"{m.name}: checkpoint {m.source or m.name}"


def _tokenizer():
    from export.tokenizer import load_shipped_tokenizer
    return load_shipped_tokenizer()


__all__ = [
    "ENGINE_BACKENDS", "PEERS", "DEFAULT_PEERS", "DEFAULT_POSITIONS", "QUICK_POSITIONS", "LOSSY_MIN_AGREEMENT", "LOSSY_TIE_X_STD",
    "Skipped", "validate_tokens", "RunTiming", "EngineRunner", "HFRunner", "CT2Runner", "PeakRss",
    "ModelSpec", "PreparedModel", "prepare_model", "hf_reference", "Plan", "RunnerSpec", "measure_runner",
    "engine_spec", "peer_spec", "add_ratios", "ratios_table", "write_outputs", "run_bench", "BenchResult",
]
