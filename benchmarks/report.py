"""Tables and plots generated from benchmark records only (never typed by hand).

``markdown_table`` gives one row per record, failed backends included (with their status and no
timings), and flags a record whose timings cannot be trusted (``unsteady``); ``make_plots`` draws decode
latency vs context position, tokens/s vs batch (when some configuration has two batch sizes or more),
and the engine-vs-peers bar chart with the physical floor drawn across it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from benchmarks.records import BenchRecord, as_record
from benchmarks.stats import Percentiles, x_floor

COLUMNS = (
    "backend", "model", "precision", "batch", "prompt", "new",
    "TTFT ms p50/p90/p99", "decode ms/token p50/p90/p99", "tok/s p50", "RSS MB", "x floor", "status",
)
_EMPTY = "-"
# A record is flagged when its timed runs disagree by more than this (slowest over fastest), or when its
# decode p50 is this far from the same run's decode-vs-position measurement of that runner: one p50 of a
# few repeats is then a busy machine's, not the runner's (a `bench --quick` table once showed HF decode
# at 239 ms/token beside 40-50 ms in the same run's position plot).
UNSTEADY_X = 1.5


def _num(v: float | None) -> str:
    # 3 significant digits is what run-to-run noise supports; more would be false precision.
    if v is None:
        return _EMPTY
    a = abs(v)
    return f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 1 else f"{v:.3g}"


def _ms_triplet(p: Percentiles | None) -> str:
    if p is None:
        return _EMPTY
    return " / ".join(_num(p[k] * 1e3) for k in ("p50", "p90", "p99"))


def floor_multiple(r: BenchRecord) -> float | None:
    """Decode p50 over the decode floor: the stored ratio if the runner set one, else computed."""
    if "x_floor" in r.ratios:
        return r.ratios["x_floor"]
    if r.decode_per_token is None or not r.floor:
        return None
    return x_floor(r.decode_per_token["p50"], r.floor.get("decode_floor_s"))


def unsteady(r: BenchRecord) -> str | None:
    """Why this record's timings are not to be trusted, or None: runs that disagree (slowest / fastest >
    UNSTEADY_X, for TTFT or decode), or a decode p50 outside [1/UNSTEADY_X, UNSTEADY_X] times the range of
    the same runner's decode-vs-position medians in this run."""
    why = []
    for name, p in (("decode", r.decode_per_token), ("TTFT", r.ttft)):
        if p and p["n"] >= 2 and p["min"] > 0 and p["max"] / p["min"] > UNSTEADY_X:
            why.append(f"{name} runs {_num(p['min'] * 1e3)}-{_num(p['max'] * 1e3)} ms ({p['max'] / p['min']:.1f}x)")
    if r.decode_per_token and r.per_position:
        steps = [s for _, s in r.per_position]
        p50 = r.decode_per_token["p50"]
        if p50 > UNSTEADY_X * max(steps) or p50 < min(steps) / UNSTEADY_X:
            why.append(f"decode p50 {_num(p50 * 1e3)} ms vs {_num(min(steps) * 1e3)}-{_num(max(steps) * 1e3)} ms "
                       "by position")
    return "; ".join(why) or None


def markdown_table(records: Iterable[BenchRecord | Mapping]) -> str:
    """A GitHub-markdown table, one row per record, in the given order. A record whose timings are
    unsteady (`unsteady`) says so in its status: "ok, UNSTEADY: ... (rerun on a quieter machine)"."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in map(as_record, records):
        base = [r.backend, r.model, r.precision, str(r.batch), str(r.prompt_len), str(r.new_tokens)]
        status = r.status.replace("|", "\\|").replace("\n", " ")
        if r.ok:
            xf = floor_multiple(r)
            timings = [
                _ms_triplet(r.ttft),
                _ms_triplet(r.decode_per_token),
                _num(r.tokens_per_s["p50"]) if r.tokens_per_s else _EMPTY,
                _num(r.peak_rss_mb),
                f"{xf:.2f}x" if xf is not None else _EMPTY,
            ]
            why = unsteady(r)
            if why:
                status += f", UNSTEADY: {why} (rerun on a quieter machine, or with more --repeats)"
        else:
            # A backend that failed validation was not timed: show why, never numbers.
            timings = [_EMPTY] * 5
        lines.append("| " + " | ".join(base + timings + [status]) + " |")
    return "\n".join(lines)


def _plot_decode_vs_position(plt, recs: list[BenchRecord], path: Path) -> Path | None:
    series = [r for r in recs if r.ok and r.per_position]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in series:
        pos, sec = zip(*r.per_position)
        ax.plot(pos, [s * 1e3 for s in sec], label=f"{r.label} b{r.batch}")
    return _finish_line_plot(plt, fig, ax, path, "context position (tokens in cache)", "decode step, ms (median)",
                             "Decode latency vs context position")


def _plot_tokens_vs_batch(plt, recs: list[BenchRecord], path: Path) -> Path | None:
    # One line per configuration that differs only in batch.
    groups: dict[tuple, list[BenchRecord]] = {}
    for r in recs:
        if r.ok and r.tokens_per_s:
            groups.setdefault((r.label, r.prompt_len, r.new_tokens, r.threads), []).append(r)
    if not any(len({r.batch for r in rs}) > 1 for rs in groups.values()):
        return None  # one batch size (bench --quick): a plot of single points says nothing a table does not
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # a full bench has ~18 lines: the default 10 colours repeat
    for (label, prompt, new, _), rs in groups.items():
        rs.sort(key=lambda r: r.batch)
        ax.plot([r.batch for r in rs], [r.tokens_per_s["p50"] for r in rs], marker="o",
                label=f"{label} (prompt {prompt}, new {new})")
    ax.set_xscale("log", base=2)
    batches = sorted({r.batch for rs in groups.values() for r in rs})
    ax.set_xticks(batches, [str(b) for b in batches])  # plain batch sizes, not powers of 2 notation
    ax.minorticks_off()
    return _finish_line_plot(plt, fig, ax, path, "batch", "tokens/s (p50)", "Throughput vs batch")


def _finish_line_plot(plt, fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_vs_peers(plt, recs: list[BenchRecord], path: Path) -> Path | None:
    # One panel per (model, batch, prompt) so the bars in a panel are comparable.
    panels: dict[tuple, list[BenchRecord]] = {}
    for r in recs:
        panels.setdefault((r.model, r.batch, r.prompt_len), []).append(r)
    panels = {k: v for k, v in panels.items() if any(r.ok and r.decode_per_token for r in v)}
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6, 4.5 * len(panels)), 4.5), squeeze=False)
    for ax, ((model, batch, prompt), rs) in zip(axes[0], panels.items()):
        labels = [f"{r.backend}\n{r.precision}" for r in rs]
        p50 = [r.decode_per_token["p50"] * 1e3 if r.ok and r.decode_per_token else 0.0 for r in rs]
        # Error bar from p50 up to p90: the tail the user feels.
        up = [(r.decode_per_token["p90"] * 1e3 - v) if r.ok and r.decode_per_token else 0.0
              for r, v in zip(rs, p50)]
        x = range(len(rs))
        ax.bar(x, p50, yerr=[[0] * len(rs), up], capsize=3, color="tab:blue")
        for i, r in enumerate(rs):
            if not (r.ok and r.decode_per_token):
                ax.text(i, 0, r.status.split(":")[0], rotation=90, ha="center", va="bottom", fontsize=8)
        # The floor depends on bytes per weight, so each precision gets its own line.
        floors = {}
        for r in rs:
            if r.floor and r.floor.get("decode_floor_s"):
                floors.setdefault(r.precision, r.floor["decode_floor_s"] * 1e3)
        for (prec, ms), style in zip(sorted(floors.items()), ("--", ":", "-.", (0, (5, 1)))):
            ax.axhline(ms, color="tab:red", linestyle=style, label=f"floor {prec}: {ms:.3g} ms")
        ax.set_xticks(list(x), labels, fontsize=8)
        ax.set_ylabel("decode ms/token (p50, bar to p90)")
        ax.set_title(f"{model}, batch {batch}, prompt {prompt}")
        if floors:
            ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(records: Iterable[BenchRecord | Mapping], out_dir: str | Path) -> list[Path]:
    """Write the PNG plots the records have data for; returns their paths (a plot with no data is skipped)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works headless, never opens a window
    import matplotlib.pyplot as plt

    recs = [as_record(r) for r in records]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    made = [
        _plot_decode_vs_position(plt, recs, out / "decode_vs_position.png"),
        _plot_tokens_vs_batch(plt, recs, out / "tokens_per_s_vs_batch.png"),
        _plot_vs_peers(plt, recs, out / "decode_vs_peers.png"),
    ]
    return [p for p in made if p is not None]
