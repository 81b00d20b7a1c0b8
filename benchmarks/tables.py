"""What a bench run writes, from its records only: the engine/peer/floor ratios (add_ratios, stored
in each record), the markdown tables beside markdown_table's one row per record, results.jsonl,
table.md and the plots (benchmarks/report.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmarks.gates import ACCURACY_TOKENS, LOSSY_MIN_AGREEMENT
from benchmarks.records import BenchRecord, write_jsonl
from benchmarks.report import make_plots, markdown_table
from benchmarks.stats import ratio


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
        r.ratios.update(memory_load_ratios(r))
        if r.floor and r.decode_per_token:
            r.ratios["x_floor"] = ratio(r.decode_per_token["p50"], r.floor["decode_floor_s"])
        if r.floor and r.ttft:
            r.ratios["ttft_x_prefill_floor"] = ratio(r.ttft["p50"], r.floor["prefill_floor_s"])
        if not r.backend.startswith("engine-"):
            continue
        if r.backend == "engine-ort-spec":  # speculative decoding vs the same target without a draft
            alone = next((t for t in records if t.ok and t.backend == "engine-ort" and _key(t) == _key(r)), None)
            if alone is not None and r.decode_per_token and alone.decode_per_token:
                r.ratios["decode_vs_target_alone"] = ratio(r.decode_per_token["p50"], alone.decode_per_token["p50"])
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


def memory_load_ratios(r: BenchRecord) -> dict:
    """rss_x_weights: the RSS the load and the validation run added (extra.rss_after_load_mb -
    extra.rss_baseline_mb) over the runner's weight file bytes; load_x_read: load_s over reading those
    files from the page cache in the same run (extra.weight_read_s). Missing figures: no entry.

    RSS is process-wide: the first runner of a library in a run also pages in that library's code
    (ONNX Runtime: ~40-60 MB of its shared object), so on gpt2 (498 MB of fp32 weights) the bench
    reads ~0.05-0.1x above a process that imported and ran the library before its baseline."""
    e, out = r.extra or {}, {}
    after, base, nbytes = e.get("rss_after_load_mb"), e.get("rss_baseline_mb"), e.get("weight_bytes")
    if after is not None and base is not None and nbytes:
        out["rss_x_weights"] = round((after - base) * 1e6 / nbytes, 3)
    x = ratio(r.load_s, e.get("weight_read_s"))
    if x is not None:
        out["load_x_read"] = round(x, 2)
    return out


def memory_load_table(records: list[BenchRecord]) -> str | None:
    """One row per runner and model (a load serves all its configurations): weight bytes, the RSS the
    load added and its ratio to them, load time against reading the weight files from the page cache."""
    seen: dict[tuple, BenchRecord] = {}
    for r in records:
        if r.ok and ("rss_x_weights" in r.ratios or "load_x_read" in r.ratios):
            seen.setdefault((r.backend, r.model, r.precision), r)
    if not seen:
        return None
    lines = ["| backend | model | precision | weight files MB | RSS added MB | RSS / weights | load s "
             "| page-cache read s | load / read |", "|---|---|---|---|---|---|---|---|---|"]

    def num(v, f):
        return "-" if v is None else format(v, f)
    for (backend, model, precision), r in seen.items():
        e = r.extra
        added = (e["rss_after_load_mb"] - e["rss_baseline_mb"]) if "rss_after_load_mb" in e and "rss_baseline_mb" in e else None
        nbytes = e.get("weight_bytes")
        lines.append(f"| {backend} | {model} | {precision} | {num(nbytes / 1e6 if nbytes else None, '.0f')} "
                     f"| {num(added, '.0f')} | {num(r.ratios.get('rss_x_weights'), '.2f')}x | {num(r.load_s, '.2f')} "
                     f"| {num(e.get('weight_read_s'), '.3f')} | {num(r.ratios.get('load_x_read'), '.1f')}x |")
    return "\n".join(lines)


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
    mtable = memory_load_table(records)
    if mtable:
        md += ["", "## Memory and load (RSS added by load + validation run over the weight file bytes; "
               "load over reading those files from the page cache, same run)", "", mtable]
    atable = accuracy_table(records)
    if atable:
        md += ["", f"## Lossy runners' accuracy (vs HF fp32 logits, teacher-forced on {ACCURACY_TOKENS} fixed "
               f"random tokens; the lossy gate asks for >= {LOSSY_MIN_AGREEMENT:.0%} agreement)", "", atable]
    if plots:
        md += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    (out_dir / "table.md").write_text("\n".join(md) + "\n")
    return BenchResult(records, out_dir, header, table, rtable, plots, stable)
