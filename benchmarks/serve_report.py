"""What `gpt2-engine bench-serve` writes, from its records only: results.jsonl (one ServeRecord per
(model, mode, load point)), the ratios between modes of the same run (add_ratios), table.md
(conditions header, the table, the ratios, the issue's goals) and the plots.

Units in records: seconds, percentiles dicts (benchmarks/stats.py) over a point's completed requests;
tables show milliseconds (TTFT, ITL, TPOT, queue) and seconds (end-to-end).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from benchmarks.records import STATUS_OK, check_distributions
from benchmarks.report import _num
from benchmarks.stats import Percentiles, ratio

SCHEMA_VERSION = 1
KIND = "serve"
_DISTRIBUTIONS = ("ttft", "itl", "tpot", "e2e", "queue", "decode_step")


@dataclass
class ServeRecord:
    """One (model, mode, load point). Fields beyond the key (None = not measured):

    load: "closed" (concurrency C clients) or "open" (Poisson arrivals at `rate` req/s)
    requested: requests the point was to send; requests: completed; failed: sent and failed
    stopped_by: "count" (all sent) or "time" (the point's time limit came first)
    request_throughput / output_throughput: completed requests, output tokens per second of wall time
    ttft, itl, tpot, e2e, queue: percentiles (s); decode_step: static only, its full batches' steps
    ratios: derived in the same run (add_ratios), against the other modes of the same round
    round: which of the run's rounds (bench-serve --rounds): the modes of a point alternate round by
    round, so a drift in the machine's speed between modes lands on both sides of each ratio
    validation: what the gate ran
    """

    model: str
    mode: str
    load: str
    concurrency: int | None = None
    rate: float | None = None
    status: str = STATUS_OK
    weights: str = "random"
    threads: int | None = None
    max_batch: int | None = None
    requested: int | None = None
    requests: int | None = None
    failed: int | None = None
    wall_s: float | None = None
    stopped_by: str | None = None
    total_output_tokens: int | None = None
    total_prompt_tokens: int | None = None
    request_throughput: float | None = None
    output_throughput: float | None = None
    ttft: Percentiles | None = None
    itl: Percentiles | None = None
    tpot: Percentiles | None = None
    e2e: Percentiles | None = None
    queue: Percentiles | None = None
    decode_step: Percentiles | None = None
    ratios: dict = field(default_factory=dict)
    round: int = 0
    workload: str | None = None
    validation: dict | None = None
    conditions: dict | None = None
    extra: dict = field(default_factory=dict)
    kind: str = KIND
    schema: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.load not in ("closed", "open"):
            raise ValueError(f"load must be 'closed' or 'open', got {self.load!r}")
        if (self.load == "closed") != (self.concurrency is not None) or (self.load == "open") != (self.rate is not None):
            raise ValueError(f"a closed-loop point has a concurrency, an open-loop one a rate; got load {self.load!r}, "
                             f"concurrency {self.concurrency!r}, rate {self.rate!r}")
        if self.schema > SCHEMA_VERSION:
            raise ValueError(f"record schema {self.schema} is newer than this reader ({SCHEMA_VERSION}): update gpt2-engine")
        check_distributions(self, _DISTRIBUTIONS)

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    @property
    def point(self) -> str:
        """'C=8' or 'R=2/s': how tables and logs name the load."""
        return f"C={self.concurrency}" if self.load == "closed" else f"R={self.rate:g}/s"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping) -> ServeRecord:
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in d.items() if k in names}
        unknown = {k: v for k, v in d.items() if k not in names}
        if unknown:  # what a newer writer added is kept, not dropped on a round trip
            known["extra"] = {**unknown, **known.get("extra", {})}
        return cls(**known)


def write_jsonl(path: str | Path, records: Iterable[ServeRecord]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(r.to_json() + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: str | Path) -> list[ServeRecord]:
    """Records from a results.jsonl (blank lines ignored); errors name the line."""
    out = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(ServeRecord.from_dict(json.loads(line)))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}:{i}: not a bench-serve record: {e}") from e
    return out


# ---- ratios --------------------------------------------------------------------------------------

def _p(dist: Percentiles | None, key: str) -> float | None:
    return None if dist is None else dist[key]


def add_ratios(records: list[ServeRecord]) -> None:
    """Stored in each inflight (and http) record, against the other modes at the same model, C and round:

    tokens_vs_static, tokens_vs_thread_per_request   output tokens/s over theirs
    itl_p99_vs_static_step                            ITL p99 over static's batch-C decode step p50
    ttft_vs_thread_per_request, tpot_vs_thread_per_request   p50s, at C=1 only (a lone user)
    http: tokens_vs_inflight, itl_p99_vs_inflight, ttft_vs_inflight (p50): the cost of the HTTP layer
    """
    by = {(r.model, r.load, r.concurrency, r.rate, r.round, r.mode): r for r in records if r.ok}
    for r in records:
        if not r.ok or r.mode not in ("inflight", "http"):
            continue
        key = (r.model, r.load, r.concurrency, r.rate, r.round)
        tpr, static, inflight = (by.get((*key, m)) for m in ("thread-per-request", "static", "inflight"))
        if r.mode == "inflight":
            if static is not None:
                r.ratios["tokens_vs_static"] = ratio(r.output_throughput, static.output_throughput)
                r.ratios["itl_p99_vs_static_step"] = ratio(_p(r.itl, "p99"), _p(static.decode_step, "p50"))
            if tpr is not None:
                r.ratios["tokens_vs_thread_per_request"] = ratio(r.output_throughput, tpr.output_throughput)
                if r.concurrency == 1:
                    r.ratios["ttft_vs_thread_per_request"] = ratio(_p(r.ttft, "p50"), _p(tpr.ttft, "p50"))
                    r.ratios["tpot_vs_thread_per_request"] = ratio(_p(r.tpot, "p50"), _p(tpr.tpot, "p50"))
        elif inflight is not None:
            r.ratios["tokens_vs_inflight"] = ratio(r.output_throughput, inflight.output_throughput)
            r.ratios["itl_p99_vs_inflight"] = ratio(_p(r.itl, "p99"), _p(inflight.itl, "p99"))
            r.ratios["ttft_vs_inflight"] = ratio(_p(r.ttft, "p50"), _p(inflight.ttft, "p50"))
        r.ratios = {k: v for k, v in r.ratios.items() if v is not None}


# ---- tables --------------------------------------------------------------------------------------

COLUMNS = ("model", "mode", "load", "req/s", "out tok/s", "TTFT ms p50/p90/p99", "ITL ms p50/p90/p99",
           "TPOT ms p50", "E2E s p50/p90/p99", "queue ms p50/p99", "requests", "status")
_EMPTY = "-"


def _triplet(p: Percentiles | None, factor: float, keys=("p50", "p90", "p99")) -> str:
    return _EMPTY if p is None else " / ".join(_num(p[k] * factor) for k in keys)


def _rounds(records: Iterable[ServeRecord]) -> bool:
    return len({r.round for r in records}) > 1


def _point(r: ServeRecord, rounds: bool) -> str:
    return f"{r.point} #{r.round + 1}" if rounds else r.point


def markdown_table(records: Iterable[ServeRecord]) -> str:
    """One row per record, in the given order; failed modes show their status and no numbers."""
    records = list(records)
    rounds = _rounds(records)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in records:
        status = r.status.replace("|", "\\|").replace("\n", " ")
        if r.ok:
            n = f"{r.requests}" + (f" (+{r.failed} failed)" if r.failed else "") + \
                (" (time limit)" if r.stopped_by == "time" else "")
            cells = [_num(r.request_throughput), _num(r.output_throughput), _triplet(r.ttft, 1e3), _triplet(r.itl, 1e3),
                     _triplet(r.tpot, 1e3, ("p50",)), _triplet(r.e2e, 1.0), _triplet(r.queue, 1e3, ("p50", "p99")), n]
        else:
            cells = [_EMPTY] * 8
        lines.append("| " + " | ".join([r.model, r.mode, _point(r, rounds), *cells, status]) + " |")
    return "\n".join(lines)


def _x(v: float | None) -> str:
    return _EMPTY if v is None else f"{v:.2f}x"


def _ms(v: float | None) -> str:
    return _EMPTY if v is None else _num(v * 1e3)


def _median(values: Iterable[float | None]) -> float | None:
    """The median of the measured values (None: none measured)."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratios_table(records: list[ServeRecord]) -> str | None:
    """The in-flight engine against the other modes, per model and clients (closed loop): a row per
    round, and with several rounds a row of their medians (each column's own median)."""
    rows = [r for r in records if r.ok and r.mode == "inflight" and r.load == "closed" and r.ratios]
    if not rows:
        return None
    rounds = _rounds(records)
    static = {(r.model, r.concurrency, r.round): r for r in records if r.ok and r.mode == "static"}
    keys = ("tokens_vs_static", "tokens_vs_thread_per_request", "itl_p99_vs_static_step",
            "ttft_vs_thread_per_request", "tpot_vs_thread_per_request")
    lines = ["| model | clients | inflight tok/s | / static | / thread-per-request | ITL p99 ms | static step p50 ms "
             "| ITL p99 / static step | TTFT p50 / thread-per-request | TPOT p50 / thread-per-request |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def line(label, tokens, ratios, itl, step):
        x = [_x(ratios.get(k)) for k in keys]
        return (f"| {label} | {_num(tokens)} | {x[0]} | {x[1]} | {_ms(itl)} | {_ms(step)} | {x[2]} | {x[3]} | {x[4]} |")

    def step_of(r):
        s = static.get((r.model, r.concurrency, r.round))
        return _p(s.decode_step, "p50") if s else None

    for model, c in dict.fromkeys((r.model, r.concurrency) for r in rows):
        group = [r for r in rows if (r.model, r.concurrency) == (model, c)]
        for r in group:
            lines.append(line(f"{model} | {c}" + (f" #{r.round + 1}" if rounds else ""), r.output_throughput,
                              r.ratios, _p(r.itl, "p99"), step_of(r)))
        if len(group) > 1:
            lines.append(line(f"{model} | {c} median of {len(group)}", _median(r.output_throughput for r in group),
                              {k: _median(r.ratios.get(k) for r in group) for k in keys},
                              _median(_p(r.itl, "p99") for r in group), _median(step_of(r) for r in group)))
    return "\n".join(lines)


# The goals of issue 13, read off the ratios: (ratio key, clients, bound, "min" or "max", wording).
GOALS = (
    ("tokens_vs_static", 8, 0.85, "min", "8 clients: output tokens/s >= 0.85x the static batch of 8"),
    ("tokens_vs_thread_per_request", 8, 3.0, "min", "8 clients: output tokens/s >= 3x thread-per-request"),
    ("itl_p99_vs_static_step", 8, 2.0, "max", "8 clients: ITL p99 <= 2x the static batch-8 decode step (p50)"),
    ("ttft_vs_thread_per_request", 1, 1.10, "max", "1 client: TTFT p50 within 10% of thread-per-request (<= 1.10x)"),
    ("tpot_vs_thread_per_request", 1, 1.10, "max", "1 client: decode ms/token p50 within 10% of thread-per-request"),
)


def goals_table(records: list[ServeRecord]) -> str | None:
    """Each goal read off its ratio (with several rounds, their median)."""
    rows = []
    for model in dict.fromkeys(r.model for r in records):
        inflight = [r for r in records if r.ok and r.model == model and r.mode == "inflight" and r.load == "closed"]
        for key, c, bound, kind, words in GOALS:
            v = _median(r.ratios.get(key) for r in inflight if r.concurrency == c)   # over rounds
            if v is None:
                verdict = "not measured"
            else:
                verdict = "met" if (v >= bound if kind == "min" else v <= bound) else "missed"
            rows.append(f"| {model} | {words} | {_x(v)} | {verdict} |")
    if not rows:
        return None
    return "\n".join(["| model | goal | measured | |", "|---|---|---|---|", *rows])


# ---- plots ---------------------------------------------------------------------------------------

def _series(recs: list[ServeRecord], load: str) -> dict[tuple[str, str], list[ServeRecord]]:
    groups: dict[tuple[str, str], list[ServeRecord]] = {}
    for r in recs:
        if r.ok and r.load == load and r.output_throughput is not None:
            groups.setdefault((r.model, r.mode), []).append(r)
    return groups


def _plot(plt, groups: dict, x_of, xlabel: str, log2: bool, path: Path, title: str) -> Path | None:
    if not groups:
        return None
    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = set()
    models = list(dict.fromkeys(m for m, _ in groups))
    modes = list(dict.fromkeys(m for _, m in groups))
    for (model, mode), rs in groups.items():
        # A colour per mode, a line style per model: the same mode reads alike across models.
        style = dict(marker="o", color=plt.cm.tab10(modes.index(mode) % 10),
                     linestyle=("-", "--", ":", "-.")[models.index(model) % 4], label=f"{model} {mode}")
        x = sorted({x_of(r) for r in rs})        # several rounds at one x: their median
        xs.update(x)
        ax_t.plot(x, [_median(r.output_throughput for r in rs if x_of(r) == v) for v in x], **style)
        with_itl = [v for v in x if any(r.itl for r in rs if x_of(r) == v)]
        ax_l.plot(with_itl, [_median(r.itl["p99"] for r in rs if r.itl and x_of(r) == v) * 1e3 for v in with_itl],
                  **style)
    for ax, ylabel in ((ax_t, "output tokens/s"), (ax_l, "inter-token latency p99, ms")):
        if log2:
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(xs), [str(v) for v in sorted(xs)])
            ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(records: Iterable[ServeRecord], out_dir: str | Path) -> list[Path]:
    """serve_vs_concurrency.png (closed loop) and serve_vs_rate.png (open loop), where there is data."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works headless, never opens a window
    import matplotlib.pyplot as plt

    recs = list(records)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    made = [_plot(plt, _series(recs, "closed"), lambda r: r.concurrency, "concurrent clients (closed loop)", True,
                  out / "serve_vs_concurrency.png", "Serving: throughput and ITL p99 vs concurrency"),
            _plot(plt, _series(recs, "open"), lambda r: r.rate, "arrival rate, requests/s (Poisson)", False,
                  out / "serve_vs_rate.png", "Serving: throughput and ITL p99 vs arrival rate")]
    return [p for p in made if p is not None]


# ---- outputs -------------------------------------------------------------------------------------

@dataclass
class ServeResult:
    records: list[ServeRecord]
    out_dir: Path
    header: str
    table: str
    ratios: str | None
    goals: str | None
    plots: list[Path]


def render(records: list[ServeRecord], header: str, plots: Iterable[Path] = ()) -> str:
    """table.md's text: header, table, ratios, goals, plots (all from the records)."""
    md = ["# gpt2-engine bench-serve", "", "```", header, "```", "", markdown_table(records)]
    rtable, gtable = ratios_table(records), goals_table(records)
    if rtable:
        md += ["", "## In-flight vs static batch and thread-per-request (same run, same requests)", "", rtable]
    if gtable:
        md += ["", "## Goals (issue 13)", "", gtable]
    plots = list(plots)
    if plots:
        md += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(md) + "\n"


def write_outputs(records: list[ServeRecord], out_dir: str | Path, header: str) -> ServeResult:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    add_ratios(records)
    write_jsonl(out_dir / "results.jsonl", records)
    plots = make_plots(records, out_dir)
    (out_dir / "table.md").write_text(render(records, header, plots))
    return ServeResult(records, out_dir, header, markdown_table(records), ratios_table(records), goals_table(records),
                       plots)
