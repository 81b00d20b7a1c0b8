"""`gpt2-engine bench-serve`: the engine as a service sees it, many clients at once.
(~630 lines, one job: the serving workload, its four modes and the two load generators share one
request/result type and are read together; records, tables and plots are in serve_report.py.)

One fixed, seeded workload (prompts of mixed lengths, mixed new-token counts, greedy) is sent in
the same order to every mode:

  inflight            one Generator (engine/core.py: one loop, a pool of slots) shared by every client
  thread-per-request  the old thread-safe Generator: each client thread runs its own batch-1
                      engine.loop.run_loop with its own cache, on the same loaded backend
  static              the same requests as one batched run_loop call per group of C (the ceiling:
                      every row starts together, nobody arrives mid-flight)
  http                the same requests to an OpenAI-compatible /v1/completions endpoint (streaming),
                      e.g. `gpt2-engine serve` started separately (--http URL)

Loads: closed loop (C clients, each sends its next request when its last one ends) and open loop
(Poisson arrivals at R requests/s, seeded). Both stop by themselves: after N requests, or when the
point's wall-time limit has passed (no request starts after it; those in flight run to their end).
Static runs closed-loop points only (a static batch needs its C prompts up front).

Per request (vllm bench serve's vocabulary): queue time, TTFT, each inter-token latency (ITL), TPOT
(its mean ITL: decode time per output token) and end-to-end latency. TTFT is benchmarks/records.py's
definition, from the call with the prompt ids in hand to the first generated token on the host. The
inflight mode's spans come from GenerationOutput.timings; the loop modes time the same spans around
run_loop (the call, cache allocation inside, to the first yield; then each yield that adds a token to
the row); http times the call to each streamed chunk with text.

Every mode is validated before it is timed (a mode that fails is reported, not timed): the greedy
tokens of a few requests, run in the mode's own concurrent shape, must equal the same prompts run
alone through the Generator (http: the same text, as the server returns text).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.gates import validate_tokens
from benchmarks.records import STATUS_OK, short_error
from benchmarks.stats import percentiles
from engine.loop import LoopTimings, new_row, run_loop
from engine.sampling import SamplingParams

LOCAL_MODES = ("inflight", "thread-per-request", "static")
MODES = (*LOCAL_MODES, "http")
DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16)
QUICK_CONCURRENCY = (1, 8)
DEFAULT_PROMPT_LENS = (16, 512)
DEFAULT_NEW_TOKENS = (32, 128)
DEFAULT_TIME_LIMIT_S = 300.0
QUICK_TIME_LIMIT_S = 60.0
OPEN_LOOP_REQUESTS = 32
HTTP_INSTALL = "pip install httpx"


def default_requests(concurrency: int | None, quick: bool = False) -> int:
    """Requests per point when --requests is not given: enough for every client to send several."""
    if concurrency is None:                                    # open loop
        return 16 if quick else OPEN_LOOP_REQUESTS
    return max(8, 2 * concurrency) if quick else max(32, 4 * concurrency)


# ---- the workload ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    """Request i is (prompts[i], new_tokens[i]); every mode and every point sends them in this order."""

    prompts: list[list[int]]
    new_tokens: list[int]
    seed: int
    prompt_lens: tuple[int, int]
    new_range: tuple[int, int]

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.prompts[i], self.new_tokens[i]

    def describe(self) -> str:
        lo, hi = self.prompt_lens
        return (f"prompts {lo}..{hi} tokens (log-uniform, random ids, seed {self.seed}), new tokens "
                f"{self.new_range[0]}..{self.new_range[1]} (uniform), greedy, no eos stop")


def make_workload(n: int, vocab: int, eos: int, seed: int = 0, prompt_lens: tuple[int, int] = DEFAULT_PROMPT_LENS,
                  new_tokens: tuple[int, int] = DEFAULT_NEW_TOKENS) -> Workload:
    """n requests: prompt lengths log-uniform in prompt_lens (as many short as long ones), token ids
    uniform below eos, new-token counts uniform in new_tokens; a fixed function of its arguments."""
    (plo, phi), (nlo, nhi) = prompt_lens, new_tokens
    if not (1 <= plo <= phi and 1 <= nlo <= nhi):
        raise ValueError(f"ranges must be 1 <= min <= max, got prompt_lens {prompt_lens}, new_tokens {new_tokens}")
    rng = np.random.default_rng([seed, plo, phi, nlo, nhi])
    lens = np.round(np.exp(rng.uniform(np.log(plo), np.log(phi + 1), size=n))).astype(int).clip(plo, phi)
    news = rng.integers(nlo, nhi + 1, size=n)
    high = min(vocab, eos) if eos > 0 else vocab
    prompts = [rng.integers(0, high, size=int(k)).tolist() for k in lens]
    return Workload(prompts, [int(k) for k in news], seed, (plo, phi), (nlo, nhi))


def validation_cases(workload: Workload, k: int, new_tokens: int) -> list[tuple[list[int], int]]:
    """k requests of the workload for the gate, its shortest and longest prompts among them (a long
    prompt beside short ones is what chunked prefill and padding get wrong); new tokens capped."""
    order = sorted(range(len(workload)), key=lambda i: len(workload.prompts[i]))
    if k >= len(order):
        picks = order
    else:
        picks = [order[round(j * (len(order) - 1) / max(k - 1, 1))] for j in range(k)]
    return [(workload.prompts[i], min(workload.new_tokens[i], new_tokens)) for i in picks]


# ---- one request's outcome ---------------------------------------------------------------------

@dataclass
class RequestResult:
    """One request's spans (seconds) and output. error: why it failed (then the spans are not read)."""

    prompt_tokens: int
    output_tokens: int = 0
    queue_s: float = 0.0
    ttft_s: float = 0.0
    itl_s: tuple[float, ...] = ()
    total_s: float = 0.0
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    error: str | None = None
    end: float = 0.0                 # time.perf_counter() when the client had it all (set by the drivers)

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (vllm's TPOT): the mean of this request's ITLs."""
        return float(np.mean(self.itl_s)) if self.itl_s else None


def greedy(n: int) -> SamplingParams:
    """The workload's parameters: greedy, exactly n tokens (no eos stop), as the bench's runners."""
    return SamplingParams.greedy(n, stop_at_eos=False)


# ---- the modes ---------------------------------------------------------------------------------

class InflightMode:
    """Every client calls one shared Generator; timings from GenerationOutput.timings."""

    name = "inflight"
    static = False

    def __init__(self, gen):
        self.gen = gen

    def request(self, prompt: Sequence[int], n: int) -> RequestResult:
        out = self.gen.generate(list(prompt), greedy(n))
        t = out.timings
        return RequestResult(len(out.prompt_token_ids), len(out.token_ids), t.queue_s, t.ttft_s, tuple(t.itl_s),
                             t.total_s, list(out.token_ids), out.text)


def loop_batch(backend, eos_id: int, tokenizer, prompts: Sequence[Sequence[int]], ns: Sequence[int]
               ) -> tuple[list[RequestResult], list[float]]:
    """One engine.loop.run_loop call over these rows, what the old Generator.generate ran: its cache
    is its own (capacity: longest prompt + new tokens). Returns each row's spans, from the call, and
    the batch's decode step times (from one yield to the next)."""
    t0 = time.perf_counter()
    rows = [new_row([int(t) for t in p], greedy(n), tokenizer) for p, n in zip(prompts, ns)]
    capacity = max(len(r.prompt_ids) + r.params.max_new_tokens for r in rows)
    times: list[list[float]] = [[] for _ in rows]      # per row: when each of its tokens was on the host
    done_at: list[float | None] = [None] * len(rows)
    steps: list[float] = []
    prev = None
    for _ in run_loop(backend, rows, capacity, eos_id, LoopTimings()):
        now = time.perf_counter()
        if prev is not None:
            steps.append(now - prev)
        prev = now
        for b, r in enumerate(rows):
            if len(r.generated) > len(times[b]) or (r.done and done_at[b] is None and not times[b]):
                times[b].append(now)
            if r.done and done_at[b] is None:
                done_at[b] = now
    out = []
    for b, r in enumerate(rows):
        t = times[b]
        out.append(RequestResult(len(r.prompt_ids), len(r.generated), 0.0, (t[0] if t else done_at[b]) - t0,
                                 tuple(y - x for x, y in zip(t, t[1:])), done_at[b] - t0, list(r.generated), r.text))
    return out, steps


class ThreadPerRequestMode:
    """Each client thread runs its own batch-1 loop with its own cache on the shared backend: the old
    thread-safe Generator (before the in-flight core), kept as the baseline."""

    name = "thread-per-request"
    static = False

    def __init__(self, backend, eos_id: int, tokenizer):
        self.backend, self.eos_id, self.tokenizer = backend, eos_id, tokenizer

    def request(self, prompt: Sequence[int], n: int) -> RequestResult:
        return loop_batch(self.backend, self.eos_id, self.tokenizer, [prompt], [n])[0][0]


class StaticMode:
    """A group of requests as one batched run_loop call: the static batch (the ceiling)."""

    name = "static"
    static = True

    def __init__(self, backend, eos_id: int, tokenizer):
        self.backend, self.eos_id, self.tokenizer = backend, eos_id, tokenizer

    def batch(self, prompts: Sequence[Sequence[int]], ns: Sequence[int]) -> tuple[list[RequestResult], list[float]]:
        return loop_batch(self.backend, self.eos_id, self.tokenizer, prompts, ns)


def completions_url(url: str) -> str:
    """The /v1/completions endpoint of a server given as its base URL, .../v1, or the endpoint itself."""
    u = url.rstrip("/")
    if u.endswith("/v1/completions"):
        return u
    return u + ("/completions" if u.endswith("/v1") else "/v1/completions")


def check_http(url: str, transport=None) -> None:
    """httpx is installed and the server answers (any HTTP status): one line (InputError) if not."""
    from benchmarks.extras import importable
    from engine.errors import BackendUnavailable, InputError
    if not importable("httpx"):
        raise BackendUnavailable(f"bench-serve --http needs httpx: {HTTP_INSTALL}")
    import httpx
    models = completions_url(url)[:-len("/completions")] + "/models"
    try:
        with httpx.Client(timeout=10, transport=transport) as c:
            c.get(models)
    except httpx.HTTPError as e:
        raise InputError(f"--http {url}: cannot reach {models} ({type(e).__name__}: {e}); start the server "
                         "first (e.g. `gpt2-engine serve MODEL_DIR`) or fix the URL") from None


class HttpMode:
    """The same requests to an OpenAI-compatible /v1/completions endpoint, streamed (SSE).

    Prompt as token ids, temperature 0 (greedy), max_tokens n. The server's eos stop cannot be turned
    off through the OpenAI API, so a request may end early; output tokens are the server's usage
    count (stream_options.include_usage), else the chunks with text. TTFT: the call to the first chunk
    with text; ITL: the gaps between such chunks (a chunk that holds several tokens counts once).
    """

    name = "http"
    static = False
    stops_at_eos = True

    def __init__(self, url: str, model: str | None = None, timeout_s: float = 600.0, transport=None):
        import httpx
        self._httpx, self.url, self.model, self.timeout_s, self.transport = httpx, completions_url(url), model, \
            timeout_s, transport
        self._local = threading.local()

    def _client(self):
        c = getattr(self._local, "client", None)
        if c is None:
            c = self._local.client = self._httpx.Client(timeout=self.timeout_s, transport=self.transport)
        return c

    def request(self, prompt: Sequence[int], n: int) -> RequestResult:
        body = {"prompt": [int(t) for t in prompt], "max_tokens": int(n), "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}}
        if self.model:
            body["model"] = self.model
        t0 = time.perf_counter()
        times, parts, usage = [], [], None
        with self._client().stream("POST", self.url, json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {resp.read().decode('utf-8', 'replace')[:300]}")
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if obj.get("error"):
                    raise RuntimeError(f"server error: {obj['error']}")
                usage = obj.get("usage") or usage
                for ch in obj.get("choices") or []:
                    if ch.get("text"):
                        times.append(time.perf_counter())
                        parts.append(ch["text"])
        end = time.perf_counter()
        if not times:
            raise RuntimeError("the stream ended without any text")
        out = int(usage["completion_tokens"]) if usage and "completion_tokens" in usage else len(times)
        return RequestResult(len(prompt), out, 0.0, times[0] - t0, tuple(b - a for a, b in zip(times, times[1:])),
                             end - t0, [], "".join(parts))


# ---- the loads ---------------------------------------------------------------------------------

@dataclass
class PointRun:
    """What one (mode, load) point produced; the results in request order (None: never sent)."""

    results: list[RequestResult]
    wall_s: float
    stopped_by: str                                          # "count" | "time"
    decode_steps: list[float] = field(default_factory=list)  # static: every full batch's step times


def _call(send: Callable[[Sequence[int], int], RequestResult], prompt, n) -> RequestResult:
    try:
        r = send(prompt, n)
    except Exception as e:  # noqa: BLE001 -- a failed request is counted, never ends the point
        r = RequestResult(len(prompt), error=short_error(e))
    r.end = time.perf_counter()
    return r


def closed_loop(send, workload: Workload, concurrency: int, n_requests: int, time_limit_s: float) -> PointRun:
    """C clients; each sends request i (the next unsent one, in workload order) when its last one ends,
    until n_requests were sent or time_limit_s has passed since the start."""
    if n_requests > len(workload):
        raise ValueError(f"{n_requests} requests asked, the workload holds {len(workload)}")
    lock = threading.Lock()
    state = {"next": 0, "stopped_by": "count"}
    results: list[RequestResult | None] = [None] * n_requests
    start = time.perf_counter()
    deadline = start + time_limit_s

    def client() -> None:
        while True:
            with lock:
                i = state["next"]
                if i >= n_requests:
                    return
                if time.perf_counter() >= deadline:
                    state["stopped_by"] = "time"
                    return
                state["next"] = i + 1
            results[i] = _call(send, *workload[i])

    threads = [threading.Thread(target=client, name=f"bench-client-{c}", daemon=True) for c in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sent = [r for r in results if r is not None]
    wall = max((r.end for r in sent), default=start) - start
    return PointRun(sent, wall, state["stopped_by"])


def poisson_arrivals(rate: float, n: int, seed: int) -> np.ndarray:
    """n arrival times (s from the start, the first at 0): exponential gaps of mean 1/rate, seeded."""
    gaps = np.random.default_rng([seed, n]).exponential(1.0 / rate, size=n)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])]) if n else np.zeros(0)


def open_loop(send, workload: Workload, rate: float, n_requests: int, time_limit_s: float, seed: int = 0) -> PointRun:
    """Request i is sent at its Poisson arrival time on a thread of its own, whatever is in flight,
    until n_requests were sent or the next arrival lies past time_limit_s."""
    if n_requests > len(workload):
        raise ValueError(f"{n_requests} requests asked, the workload holds {len(workload)}")
    arrivals = poisson_arrivals(rate, n_requests, seed)
    results: list[RequestResult | None] = [None] * n_requests
    threads, stopped_by = [], "count"
    start = time.perf_counter()

    def one(i: int) -> None:
        results[i] = _call(send, *workload[i])

    for i, at in enumerate(arrivals):
        if at >= time_limit_s:
            stopped_by = "time"
            break
        wait = start + at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        t = threading.Thread(target=one, args=(i,), name=f"bench-arrival-{i}", daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    sent = [r for r in results if r is not None]
    wall = max((r.end for r in sent), default=start) - start
    return PointRun(sent, wall, stopped_by)


def static_batches(mode: StaticMode, workload: Workload, concurrency: int, n_requests: int,
                   time_limit_s: float) -> PointRun:
    """Requests in groups of C, each group one batched call, one after another, until n_requests or
    the time limit. Each row's spans run from its group's call."""
    results, steps, stopped_by = [], [], "count"
    start = time.perf_counter()
    for g in range(0, n_requests, concurrency):
        if time.perf_counter() - start >= time_limit_s:
            stopped_by = "time"
            break
        idx = range(g, min(g + concurrency, n_requests))
        try:
            rows, step_s = mode.batch([workload.prompts[i] for i in idx], [workload.new_tokens[i] for i in idx])
        except Exception as e:  # noqa: BLE001 -- counted as failed requests, as in the other loads
            rows, step_s = [RequestResult(len(workload.prompts[i]), error=short_error(e)) for i in idx], []
        end = time.perf_counter()
        for r in rows:
            r.end = end
        results += rows
        if len(idx) == concurrency:
            steps += step_s
    wall = max((r.end for r in results), default=start) - start
    return PointRun(results, wall, stopped_by, steps)


# ---- the gate ----------------------------------------------------------------------------------

def reference_outputs(gen, cases: list[tuple[list[int], int]], stop_at_eos: bool = False) -> list:
    """Each case run alone through the Generator (one request in the engine at a time)."""
    params = (lambda n: SamplingParams.greedy(n)) if stop_at_eos else greedy
    return [gen.generate(list(p), params(n)) for p, n in cases]


def validate_mode(mode, cases: list[tuple[list[int], int]], reference: list) -> str | None:
    """None if the mode's outputs equal the reference, else why not (after "failed validation: ").

    The cases run in the mode's own concurrent shape: all at once from one thread each (static: one
    batch), so that batching, admission mid-flight and padding are what is checked."""
    if getattr(mode, "static", False):
        try:
            results = mode.batch([p for p, _ in cases], [n for _, n in cases])[0]
        except Exception as e:  # noqa: BLE001
            return f"the batch failed: {short_error(e)}"
    else:
        results: list[RequestResult | None] = [None] * len(cases)

        def one(i: int) -> None:
            results[i] = _call(mode.request, *cases[i])
        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(cases))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i, ((prompt, _), r, ref) in enumerate(zip(cases, results, reference)):
        where = f"request {i} (prompt {len(prompt)} tokens)"
        if r.error is not None:
            return f"{where} failed: {r.error}"
        if getattr(mode, "stops_at_eos", False):          # http: text only
            if r.text != ref.text:
                k = next((j for j, (a, b) in enumerate(zip(r.text, ref.text)) if a != b), min(len(r.text), len(ref.text)))
                return (f"{where}: text differs from the Generator's alone at character {k} "
                        f"({r.text[k:k + 20]!r} vs {ref.text[k:k + 20]!r}); is the server serving the same model?")
            continue
        why = validate_tokens(ref.token_ids, r.token_ids)
        if why is not None:
            return f"{where}: {why}"
    return None


# ---- a point's summary -------------------------------------------------------------------------

def summarize(run: PointRun) -> dict:
    """Throughput over the point's wall time and latency percentiles over its completed requests
    (ITL: every gap of every request, pooled, as vllm bench serve does). Seconds."""
    ok = [r for r in run.results if r.error is None]
    errors = sorted({r.error for r in run.results if r.error is not None})
    wall = run.wall_s if run.wall_s > 0 else float("nan")
    out = {
        "requests": len(ok), "failed": len(run.results) - len(ok), "wall_s": run.wall_s, "stopped_by": run.stopped_by,
        "total_output_tokens": sum(r.output_tokens for r in ok),
        "total_prompt_tokens": sum(r.prompt_tokens for r in ok),
        "request_throughput": len(ok) / wall if ok else None,
        "output_throughput": sum(r.output_tokens for r in ok) / wall if ok else None,
        "errors": errors[:5],
    }

    def dist(values):
        values = [v for v in values if v is not None]
        return percentiles(values) if values else None
    out["ttft"] = dist(r.ttft_s for r in ok)
    out["itl"] = dist(g for r in ok for g in r.itl_s)
    out["tpot"] = dist(r.tpot_s for r in ok)
    out["e2e"] = dist(r.total_s for r in ok)
    out["queue"] = dist(r.queue_s for r in ok)
    out["decode_step"] = dist(run.decode_steps)
    return out


# ---- a run -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServePlan:
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    rates: tuple[float, ...] = ()
    requests: int | None = None                 # per point; None: default_requests(C)
    quick: bool = False
    time_limit_s: float = DEFAULT_TIME_LIMIT_S
    modes: tuple[str, ...] = LOCAL_MODES
    threads: int | None = None
    max_batch: int = 8
    prefill_chunk: int | None = None            # the Generator's: None adaptive, 0 never split, N tokens
    prompt_lens: tuple[int, int] = DEFAULT_PROMPT_LENS
    new_tokens: tuple[int, int] = DEFAULT_NEW_TOKENS
    workload_seed: int = 0
    arrival_seed: int = 0
    validate_requests: int = 4
    validate_new_tokens: int = 32
    http_url: str | None = None
    http_model: str | None = None
    rounds: int = 1                             # each point's modes, alternating, this many times

    def n_requests(self, concurrency: int | None) -> int:
        return self.requests or default_requests(concurrency, self.quick)

    @property
    def workload_size(self) -> int:
        return max([self.n_requests(c) for c in self.concurrency] + [self.n_requests(None) for _ in self.rates] + [1])

    def settings(self) -> dict:
        """The run's own settings, for the header."""
        req = self.requests or ("2 x clients, >= 8" if self.quick else "4 x clients, >= 32")
        return {"threads": self.threads, "max batch (slots)": self.max_batch,
                "prefill chunk": "adaptive" if self.prefill_chunk is None else
                                 "never split" if self.prefill_chunk == 0 else f"{self.prefill_chunk} tokens",
                "requests per point": f"{req} (open loop: {self.n_requests(None)})",
                "time limit per point": f"{self.time_limit_s:g} s",
                **({"rounds": f"{self.rounds} per point, modes alternating; ratios within a round, goals on "
                              "their median"} if self.rounds > 1 else {}),
                "validation": f"{self.validate_requests} requests x <= {self.validate_new_tokens} tokens per mode, "
                              "exact greedy tokens vs the Generator alone"}


def make_modes(plan: ServePlan, gen) -> list:
    made = []
    for name in plan.modes:
        if name == "inflight":
            made.append(InflightMode(gen))
        elif name == "thread-per-request":
            made.append(ThreadPerRequestMode(gen.backend, gen.config.eos_token_id, gen.tokenizer))
        elif name == "static":
            made.append(StaticMode(gen.backend, gen.config.eos_token_id, gen.tokenizer))
        elif name == "http":
            made.append(HttpMode(plan.http_url, plan.http_model))
        else:
            raise ValueError(f"unknown mode {name!r} (one of {MODES})")
    return made


def measure_model(model: str, gen, modes: list, plan: ServePlan, *, weights: str = "random",
                  log: Callable[[str], None] = lambda s: None, conditions: dict | None = None) -> list:
    """Validate every mode, then time every point of the plan: one ServeRecord per (mode, point)."""
    from benchmarks.serve_report import ServeRecord
    workload = make_workload(plan.workload_size, gen.config.vocab_size, gen.config.eos_token_id,
                             plan.workload_seed, plan.prompt_lens, plan.new_tokens)
    cases = validation_cases(workload, plan.validate_requests, plan.validate_new_tokens)
    reference = reference_outputs(gen, cases)
    eos_reference = None
    verdict: dict[str, str | None] = {}
    for m in modes:
        if getattr(m, "stops_at_eos", False):
            eos_reference = eos_reference or reference_outputs(gen, cases, stop_at_eos=True)
        verdict[m.name] = validate_mode(m, cases, eos_reference if getattr(m, "stops_at_eos", False) else reference)
        log(f"{model} {m.name}: " + ("validated" if verdict[m.name] is None else f"FAILED validation: {verdict[m.name]}"))
    base = dict(model=model, weights=weights, threads=plan.threads, max_batch=plan.max_batch,
                workload=workload.describe(), conditions=conditions,
                validation={"requests": len(cases), "new_tokens": [n for _, n in cases],
                            "prompt_tokens": [len(p) for p, _ in cases]})
    points = [("closed", c, None) for c in plan.concurrency] + [("open", None, r) for r in plan.rates]
    records = []
    # Rounds inside a point: its modes alternate (inflight, static, inflight, static, ...).
    for (load, c, rate), rnd, m in itertools.product(points, range(plan.rounds), modes):
        n = plan.n_requests(c)
        if load == "open" and m.static:
            continue                           # a static batch needs its prompts up front
        rec = dict(base, mode=m.name, load=load, concurrency=c, rate=rate, requested=n, round=rnd)
        if verdict[m.name] is not None:
            records.append(ServeRecord(**rec, status=f"failed validation: {verdict[m.name]}"))
            continue
        stats0 = gen.stats() if m.name == "inflight" else None
        if m.static:
            run = static_batches(m, workload, c, n, plan.time_limit_s)
        elif load == "closed":
            run = closed_loop(m.request, workload, c, n, plan.time_limit_s)
        else:
            run = open_loop(m.request, workload, rate, n, plan.time_limit_s, plan.arrival_seed)
        s = summarize(run)
        errors = s.pop("errors")
        extra = {"errors": errors} if errors else {}
        if stats0 is not None:   # prefix_cache_hits: prompt tokens not computed (a repeated prompt, a later round)
            stats = gen.stats()
            extra["forward_calls"] = stats.forward_calls - stats0.forward_calls
            extra["prefix_cache_hits"] = stats.prefix_cache_hits - stats0.prefix_cache_hits
        status = STATUS_OK if s["requests"] else f"failed: every request failed ({'; '.join(errors)})"
        if status != STATUS_OK:
            s = {k: v for k, v in s.items() if k in ("failed", "wall_s", "stopped_by")}
        records.append(ServeRecord(**rec, status=status, extra=extra, **s))
        r = records[-1]
        log(f"{model} {m.name} {r.point}{f' round {rnd + 1}/{plan.rounds}' if plan.rounds > 1 else ''}: " + (
            f"{r.output_throughput:.1f} tok/s, {r.request_throughput:.2f} req/s, ITL p99 "
            f"{r.itl['p99'] * 1e3 if r.itl else float('nan'):.1f} ms ({r.requests} requests, {r.wall_s:.1f} s"
            f"{', stopped by the time limit' if r.stopped_by == 'time' else ''}"
            f"{f', {r.failed} failed' if r.failed else ''})" if r.ok else r.status))
    return records


def run_serve_bench(specs: list, plan: ServePlan, out_dir: Path, *, work_root: Path,
                    log: Callable[[str], None] = print):
    """Prepare each model as `gpt2-engine bench` does (benchmarks/models.py), load one Generator on
    it, measure every mode and point, then write results.jsonl, table.md and the plots."""
    from benchmarks.conditions import busy_warning, collect_conditions, format_header
    from benchmarks.models import prepare_model
    from benchmarks.serve_report import write_outputs
    from engine.generator import Generator
    conditions = collect_conditions()
    header = format_header(conditions, plan.settings())
    warning = busy_warning(conditions)
    if warning:
        log(f"warning: {warning}")
    records = []
    for spec in specs:
        t0 = time.perf_counter()
        model = prepare_model(spec, work_root)
        path = model.artifact("fp32")
        gen = Generator.from_pretrained(path, threads=plan.threads, max_batch=plan.max_batch,
                                        prefill_chunk=plan.prefill_chunk)
        gen.warm_up()   # as `gpt2-engine serve` does: no mode pays for first touches of the slot pool
        log(f"{spec.name}: ready in {time.perf_counter() - t0:.0f} s ({path})"
            + ("; the server under --http must serve this model directory" if "http" in plan.modes else ""))
        try:
            records += measure_model(spec.name, gen, make_modes(plan, gen), plan, weights=model.weights, log=log,
                                     conditions=conditions)
        finally:
            gen.close()
    return write_outputs(records, out_dir, header)
