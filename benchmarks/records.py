"""The benchmark record: one measured configuration, stored as one JSON line.

The runner fills a :class:`BenchRecord` per (backend, model, precision, batch, prompt, new tokens,
threads); tables and plots are generated from the JSONL file only (report.py), never typed by hand.

Units: every time is in seconds, every distribution a :class:`~benchmarks.stats.Percentiles` dict
(p50, p90, p99, mean, min, max, n) over the timed runs, warm-up excluded.

Fields (None = not measured / not applicable):
  schema            record format version (SCHEMA_VERSION); readers reject newer ones
  backend           who ran it: "engine-ort", "engine-trt", "hf", "ct2", ... (free text, stable names)
  model             size name from engine.config.SIZES, e.g. "gpt2"
  precision         "fp32", "fp16", "int8", ...
  weights           "random" (initialised here) or "real" (a published checkpoint)
  batch             rows generated together, >= 1
  prompt_len        prompt tokens per row, >= 0
  new_tokens        generated tokens per row, >= 0
  threads           intra-op CPU threads the backend was given (None on GPU / unknown)
  device            "cpu", "cuda", ...
  status            "ok", or why it has no timings: "failed validation: <what>", "failed: <error>",
                    "skipped: <reason>". Only "ok" records carry timings (parity before speed).
  warmup            untimed runs before the timed ones
  load_s            seconds from artifact/checkpoint on disk to ready-to-generate
  ttft              time to first token (TTFT, defined below), per run
  decode_per_token  decode step time (one token per row), per run: mean step time of that run; a step
                    runs from one token of every row on the host to the next
  e2e               the whole call: token ids in -> all new tokens on the host, per run
  tokens_per_s      batch * new_tokens / e2e, per run (see stats.rates for its percentiles' meaning)
  peak_rss_mb       peak resident memory of the process, MB (1e6 bytes)
  gpu_mem_mb        peak GPU memory, MB
  per_position      [[position, median step seconds], ...]: decode latency vs context length
  floor             floor.floor_record(...): bandwidth_GBps, gflops, decode_floor_s, prefill_floor_s, ...
  ratios            derived comparisons, e.g. {"x_floor": 1.4, "decode_vs_hf": 0.6}; per record also
                    rss_x_weights ((extra.rss_after_load_mb - extra.rss_baseline_mb) / extra.weight_bytes)
                    and load_x_read (load_s / extra.weight_read_s): tables.memory_load_ratios
  conditions        conditions.collect_conditions() of the run, so one line is self-describing
  extra             anything else the runner wants to keep; unknown keys read from a file land here.
                    The harness keeps there, per runner: rss_baseline_mb (RSS just before the load),
                    load_peak_rss_mb, rss_after_load_mb (after the load and the validation run),
                    weight_bytes (the runner's weight files: memory.weight_files) and weight_read_s
                    (reading them from the page cache in the same run: memory.page_cache_read_s)

TTFT, the one definition every runner of the bench measures (the engine's, runners.EngineRunner,
and the peers', peers.HFRunner and peers.CT2Runner) and engine.generator.Timings.ttft_s reports:
the time from the start of the generate call, with the prompt as token ids in hand (tokenization
is outside every timing), to the first generated token of every row being available on the host.
It includes putting the ids into the runner's own input format, the KV cache's allocation, the
prefill forward (every chunk of it) and the first sample (greedy argmax in the bench). Loading is
not in it (load_s).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from benchmarks.stats import PERCENTILE_KEYS, Percentiles

SCHEMA_VERSION = 1
STATUS_OK = "ok"
_DISTRIBUTIONS = ("ttft", "decode_per_token", "e2e", "tokens_per_s")


class Skipped(Exception):
    """A runner that cannot run here (no GPU, a peer library missing, a conversion that failed): its
    records get the status "skipped: <message>"."""


def short_error(e: BaseException) -> str:
    """An exception as it reads in a "failed: ..." status: its type and first line, capped."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:300]}" if msg else type(e).__name__


@dataclass
class BenchRecord:
    backend: str
    model: str
    precision: str
    batch: int
    prompt_len: int
    new_tokens: int
    weights: str = "random"
    threads: int | None = None
    device: str = "cpu"
    status: str = STATUS_OK
    warmup: int | None = None
    load_s: float | None = None
    ttft: Percentiles | None = None
    decode_per_token: Percentiles | None = None
    e2e: Percentiles | None = None
    tokens_per_s: Percentiles | None = None
    peak_rss_mb: float | None = None
    gpu_mem_mb: float | None = None
    per_position: list[list[float]] | None = None
    floor: dict | None = None
    ratios: dict = field(default_factory=dict)
    conditions: dict | None = None
    extra: dict = field(default_factory=dict)
    schema: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.prompt_len < 0 or self.new_tokens < 0:
            raise ValueError(f"prompt_len and new_tokens must be >= 0, got {self.prompt_len}, {self.new_tokens}")
        if self.weights not in ("random", "real"):
            raise ValueError(f"weights must be 'random' or 'real', got {self.weights!r}")
        if self.schema > SCHEMA_VERSION:
            raise ValueError(
                f"record schema {self.schema} is newer than this reader ({SCHEMA_VERSION}): update gpt2-engine"
            )
        check_distributions(self, _DISTRIBUTIONS)

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    @property
    def label(self) -> str:
        """'backend model precision': how tables and plot legends name this configuration."""
        return f"{self.backend} {self.model} {self.precision}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> BenchRecord:
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in d.items() if k in names}
        # Keep what a newer writer added rather than dropping it on a round trip.
        unknown = {k: v for k, v in d.items() if k not in names}
        if unknown:
            known["extra"] = {**unknown, **known.get("extra", {})}
        return cls(**known)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False)

    @classmethod
    def from_json(cls, line: str) -> BenchRecord:
        return cls.from_dict(json.loads(line))


def as_record(r: BenchRecord | Mapping) -> BenchRecord:
    """Accept records or plain dicts (what a runner may build) everywhere."""
    return r if isinstance(r, BenchRecord) else BenchRecord.from_dict(r)


def write_jsonl(path: str | Path, records: Iterable[BenchRecord | Mapping], *, append: bool = False) -> Path:
    """Write one JSON object per line; ``append`` adds to an existing file (a run that goes on)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if append else "w", encoding="utf-8") as f:
        for r in records:
            f.write(as_record(r).to_json() + "\n")
    return path


def read_jsonl(path: str | Path) -> list[BenchRecord]:
    """Records from a JSONL file (blank lines ignored); errors name the line."""
    out = []
    with Path(path).open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(BenchRecord.from_json(line))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}:{i}: not a benchmark record: {e}") from e
    return out


def check_distributions(record, names) -> None:
    """Each named field is None or a stats.percentiles dict, and a failed record carries none."""
    for name in names:
        dist = getattr(record, name)
        if dist is None:
            continue
        missing = [k for k in (*PERCENTILE_KEYS, "n") if k not in dist]
        if missing:
            raise ValueError(f"{name} must be a percentiles dict (stats.percentiles), missing {missing}")
        if not record.ok:
            raise ValueError(f"a record with status {record.status!r} must carry no timings, got {name}")
