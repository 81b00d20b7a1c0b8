"""`python -m benchmarks.prefix_cache`: issue 23's figures for prefix caching, caching on vs off, in one run.

  (a) ttft     a 600-token prompt sharing its first 590 tokens with a finished request: its TTFT with
               prefix caching vs the same request on a cold engine (prefix_caching=False), in-process
  (b) lm-eval  one 400-token context, 4 continuations of ~5 tokens, each its own `echo, logprobs=1,
               max_tokens=0` request, sent together to `gpt2-engine serve`: total time, on vs off
               (`--no-prefix-caching`), and the logprobs' largest difference
  (c) chat     6 turns through `gpt2-engine serve`, each resending the history: TTFT of turn 6 (the
               first streamed token, at the client), on vs off
  (d) load     unrelated prompts from 8 closed-loop clients (the scheduler issue's load: 12-token
               prompts, 64 new tokens, 2 requests each), in-process: output tokens/s, on vs off
  (e) fresh    a fresh engine: a 600-token request, then 4 unrelated 100-token ones, one after the
               other: their TTFT, on vs off (what sharing nothing costs before the pool is warm)

Both sides of every comparison alternate round by round, so drift and other jobs hit both alike; ratios
are taken within a round, then their median. (a) and (d) run on ONE in-process Generator whose prefix
caching is switched per side (EngineCore.set_prefix_caching): two Generators differ by themselves (an
A/A run of two caching-off Generators here: the first loaded ran its forwards 2-4% slower in 6 of 8
rounds), one does not. (b) and (c) need two servers (subprocesses, each idle while the other runs).

Every comparison is validated before its figures count: the same greedy tokens on both sides, logprobs
within 1e-4 (parity before speed). The model is gpt2's architecture with random weights at init 0.1
(diverse greedy output, so token equality means something), fp32, exported once under --work-dir. The
conditions (CPU, flags, load average before and after each part) are printed first and stored with the
records (--out: results.json, table.md).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.conditions import collect_conditions, format_header
from benchmarks.stats import percentiles
from engine.sampling import SamplingParams

SIDES = ("on", "off")
LOGPROB_TOL = 1e-4


def cpu_flags() -> str:
    """The flags line every figure carries: `lscpu | grep -o 'avx512[a-z_]*\\|avx2\\|amx[a-z_]*' | sort -u`."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "-"
    import re
    return " ".join(sorted(set(re.findall(r"avx512[a-z_]*|avx2|amx[a-z_]*", out))))


def load() -> float:
    return round(os.getloadavg()[0], 2)


def prepare_model(work_dir: Path) -> Path:
    """gpt2 (12 x 768) with random weights at init 0.1, fp32: exported once."""
    from engine.artifact import is_current_export
    from export.exporter import export_model
    from export.model_cache import dir_lock
    path = work_dir / "gpt2-random-i0.1"
    with dir_lock(path):
        if not is_current_export(path):
            export_model("gpt2", path, init="random", init_range=0.1, seed=0, force=True, show_progress=True)
    return path


def touch_pool(generate, rng, vocab: int, rows: int = 8) -> None:
    """Write every row of a pool once (`rows` short requests together): the first write into a row faults
    its pages in (transparent huge pages: ~160 ms per gpt2 row on this VM), a one-off cost a running server
    has paid long before; left in, it lands on whichever side first uses a fresh row."""
    generate([random_ids(rng, 24, vocab) for _ in range(rows)])


def order(i: int) -> tuple[str, ...]:
    """Which side goes first in round i: alternating, so neither always runs second."""
    return SIDES if i % 2 == 0 else SIDES[::-1]


def random_ids(rng: np.random.Generator, n: int, vocab: int) -> list[int]:
    return rng.integers(0, vocab - 1, n).tolist()


# ---- (a) TTFT of a prompt that shares 590 of its 600 tokens with a finished request -----------------------

def switch(gen, side: str):
    """The engine with prefix caching as `side` says (off also forgets what the pool holds)."""
    gen.core.set_prefix_caching(side == "on")
    return gen


def part_ttft(gen, rounds: int, rng, echo=print) -> dict:
    params = SamplingParams.greedy(16, stop_at_eos=False)
    vocab = gen.config.vocab_size
    rows = []
    for i in range(rounds + 1):                                   # round 0 warms both up, not recorded
        base = random_ids(rng, 590, vocab)
        first, query = base + random_ids(rng, 10, vocab), base + random_ids(rng, 10, vocab)
        row = {}
        for side in order(i):
            g = switch(gen, side)
            g.generate(first, params)                             # the finished request
            out = g.generate(query, params)
            row[side] = {"ttft_s": out.timings.ttft_s, "cached_tokens": out.timings.cached_tokens,
                         "tokens": out.token_ids}
        if row["on"]["tokens"] != row["off"]["tokens"]:
            raise RuntimeError(f"(a) round {i}: the tokens differ with prefix caching: not timed")
        row["ratio"] = row["on"]["ttft_s"] / row["off"]["ttft_s"]
        if i:
            rows.append(row)
            echo(f"  (a) round {i}: TTFT on {row['on']['ttft_s'] * 1e3:.1f} ms (cached {row['on']['cached_tokens']}), "
                 f"off {row['off']['ttft_s'] * 1e3:.1f} ms, ratio {row['ratio']:.3f}")
    return {"rounds": _strip(rows), "ttft_on_ms": _pct(rows, "on", "ttft_s", 1e3),
            "ttft_off_ms": _pct(rows, "off", "ttft_s", 1e3),
            "ratio_median": float(np.median([r["ratio"] for r in rows])), "same_tokens": True}


# ---- (d) unrelated prompts at 8 clients ----------------------------------------------------------------------

def _clients(gen, jobs: list[list[list[int]]], params) -> tuple[float, list]:
    barrier = threading.Barrier(len(jobs) + 1)
    results: list = [None] * len(jobs)

    def client(i):
        barrier.wait()
        results[i] = [gen.generate(p, params).token_ids for p in jobs[i]]
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, results


def part_load(gen, rounds: int, rng, clients: int = 8, per_client: int = 2, prompt_len: int = 12,
              new_tokens: int = 64, echo=print) -> dict:
    params = SamplingParams.greedy(new_tokens, stop_at_eos=False)
    vocab = gen.config.vocab_size
    rows = []
    for i in range(rounds + 1):
        jobs = [[random_ids(rng, prompt_len, vocab) for _ in range(per_client)] for _ in range(clients)]
        row, tokens = {}, {}
        for side in order(i):
            core = switch(gen, side).core
            hits0, host0, steps0 = core.prefix_hits, core.host_s, core.steps
            wall, tokens[side] = _clients(gen, jobs, params)
            n = sum(len(t) for r in tokens[side] for t in r)
            # the loop's time outside forwards per step: where prefix caching's bookkeeping would show
            row[side] = {"tokens_per_s": n / wall, "wall_s": wall, "cached_tokens": core.prefix_hits - hits0,
                         "host_ms_per_step": 1e3 * (core.host_s - host0) / max(core.steps - steps0, 1)}
        if tokens["on"] != tokens["off"]:
            raise RuntimeError(f"(d) round {i}: the tokens differ with prefix caching: not timed")
        row["ratio"] = row["on"]["tokens_per_s"] / row["off"]["tokens_per_s"]
        if i:
            rows.append(row)
            echo(f"  (d) round {i}: {row['on']['tokens_per_s']:.1f} tokens/s on (cached {row['on']['cached_tokens']}), "
                 f"{row['off']['tokens_per_s']:.1f} off, ratio {row['ratio']:.3f}; host per step "
                 f"{row['on']['host_ms_per_step']:.2f} / {row['off']['host_ms_per_step']:.2f} ms")
    ratios = [r["ratio"] for r in rows]
    return {"rounds": rows, "plan": {"clients": clients, "per_client": per_client, "prompt_len": prompt_len,
                                     "new_tokens": new_tokens},
            "tokens_per_s_on": _pct(rows, "on", "tokens_per_s"), "tokens_per_s_off": _pct(rows, "off", "tokens_per_s"),
            "host_ms_per_step_on": _pct(rows, "on", "host_ms_per_step"),
            "host_ms_per_step_off": _pct(rows, "off", "host_ms_per_step"),
            "ratio_median": float(np.median(ratios)), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "same_tokens": True}


# ---- (e) sharing nothing on a fresh engine --------------------------------------------------------------------

def part_fresh(model: Path, threads: int, rounds: int, rng, vocab: int, echo=print) -> dict:
    """A fresh Generator per side and round (a fresh pool: its rows not yet written)."""
    from engine import Generator
    rows = []
    for i in range(rounds):
        first = random_ids(rng, 600, vocab)
        others = [random_ids(rng, 100, vocab) for _ in range(4)]
        row, tokens = {}, {}
        for side in order(i):
            with Generator.from_pretrained(model, threads=threads, max_batch=8, prefix_caching=side == "on") as g:
                g.generate(first, SamplingParams.greedy(8))
                outs = [g.generate(p, SamplingParams.greedy(4)) for p in others]
            tokens[side] = [o.token_ids for o in outs]
            row[side] = {"ttft_s": float(np.median([o.timings.ttft_s for o in outs])),
                         "cached_tokens": sum(o.timings.cached_tokens for o in outs)}
        if tokens["on"] != tokens["off"]:
            raise RuntimeError(f"(e) round {i}: the tokens differ with prefix caching: not timed")
        row["ratio"] = row["on"]["ttft_s"] / row["off"]["ttft_s"]
        rows.append(row)
        echo(f"  (e) round {i + 1}: TTFT (median of 4) on {row['on']['ttft_s'] * 1e3:.1f} ms, "
             f"off {row['off']['ttft_s'] * 1e3:.1f} ms, ratio {row['ratio']:.3f}")
    return {"rounds": rows, "ttft_on_ms": _pct(rows, "on", "ttft_s", 1e3), "ttft_off_ms": _pct(rows, "off", "ttft_s", 1e3),
            "ratio_median": float(np.median([r["ratio"] for r in rows]))}


# ---- the servers ---------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`gpt2-engine serve MODEL` in a subprocess (its log in work_dir)."""

    def __init__(self, model: Path, threads: int, prefix_caching: bool, log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "cli", "serve", str(model), "--port", str(self.port), "--threads", str(threads),
               "--max-batch", "8"] + ([] if prefix_caching else ["--no-prefix-caching"])
        self.cmd = " ".join(cmd[2:])
        self.log = open(log, "w")  # noqa: SIM115 -- closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=Path(__file__).resolve().parents[1])

    def wait_ready(self, timeout: float = 180.0) -> None:
        import httpx
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"`{self.cmd}` exited with {self.proc.returncode}: see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"`{self.cmd}` was not ready after {timeout:.0f} s: see {self.log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _concurrently(url: str, bodies: list[dict]) -> list[dict]:
    import httpx
    with httpx.Client() as client, ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(_sender(client, url, len(bodies)), bodies))


def _post(client, url: str, body: dict) -> dict:
    r = client.post(url + "/v1/completions", json=body, timeout=300)
    if r.status_code != 200:
        raise RuntimeError(f"{url}: {r.status_code} {r.text[:300]}")
    return r.json()


# ---- (b) lm-evaluation-harness's burst ----------------------------------------------------------------------

def _sender(client, url: str, n: int):
    """post(body) for n threads that send at the same moment (a barrier)."""
    start = threading.Barrier(n)

    def send(body: dict) -> dict:
        start.wait()
        return _post(client, url, body)
    return send


def part_lm_eval(servers: dict, rounds: int, rng, vocab: int, echo=print) -> dict:
    import httpx
    rows = []
    for i in range(rounds + 1):
        context = random_ids(rng, 400, vocab)
        bodies = [{"prompt": context + random_ids(rng, n, vocab), "max_tokens": 0, "echo": True, "logprobs": 1,
                   "temperature": 0} for n in (5, 4, 6, 5)]
        row, answers = {}, {}
        for side in order(i):
            url = servers[side].url
            with httpx.Client() as client, ThreadPoolExecutor(len(bodies)) as pool:
                t0 = time.perf_counter()
                answers[side] = list(pool.map(_sender(client, url, len(bodies)), bodies))
                wall = time.perf_counter() - t0
            row[side] = {"total_s": wall,
                         "cached_tokens": [a["usage"]["prompt_tokens_details"]["cached_tokens"] for a in answers[side]]}
        diff = 0.0
        for a, b in zip(answers["on"], answers["off"]):
            la, lb = a["choices"][0]["logprobs"], b["choices"][0]["logprobs"]
            if la["tokens"] != lb["tokens"] or [sorted(x) for x in la["top_logprobs"][1:]] != \
                    [sorted(x) for x in lb["top_logprobs"][1:]]:
                raise RuntimeError(f"(b) round {i}: the tokens or top tokens differ with prefix caching: not timed")
            diff = max(diff, float(np.max(np.abs(np.subtract(la["token_logprobs"][1:], lb["token_logprobs"][1:])))))
        if diff > LOGPROB_TOL:
            raise RuntimeError(f"(b) round {i}: logprobs differ by {diff:.2e} > {LOGPROB_TOL}: not timed")
        row["max_logprob_diff"] = diff
        row["ratio"] = row["on"]["total_s"] / row["off"]["total_s"]
        if i:
            rows.append(row)
            echo(f"  (b) round {i}: on {row['on']['total_s'] * 1e3:.0f} ms (cached {row['on']['cached_tokens']}), "
                 f"off {row['off']['total_s'] * 1e3:.0f} ms, ratio {row['ratio']:.3f}, max |dlogprob| {diff:.1e}")
    return {"rounds": rows, "total_on_ms": _pct(rows, "on", "total_s", 1e3),
            "total_off_ms": _pct(rows, "off", "total_s", 1e3),
            "ratio_median": float(np.median([r["ratio"] for r in rows])),
            "max_logprob_diff": max(r["max_logprob_diff"] for r in rows)}


# ---- (c) a 6-turn chat -------------------------------------------------------------------------------------

def _stream_turn(client, url: str, prompt: str, max_tokens: int) -> tuple[float, str, dict]:
    """(seconds to the first streamed token, the completion's text, usage)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, text, usage = None, "", {}
    with client.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: {r.status_code} {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices"):
                if ttft is None:
                    ttft = time.perf_counter() - t0       # the first event carries the first token
                text += event["choices"][0]["text"]
            if event.get("usage"):
                usage = event["usage"]
    return ttft, text, usage


def part_chat(servers: dict, rounds: int, rng, gen, turns: int = 6, max_tokens: int = 48, echo=print) -> dict:
    """Each conversation: a 200-token system text, then `turns` user messages of 40 tokens (random ids
    as text: a chat client resends text, which the server tokenizes again); the history both sides resend
    is the same (the off side's completions), and each turn's text is compared."""
    import httpx

    def text(n):
        return gen.decode(random_ids(rng, n, gen.config.vocab_size))
    rows = []
    with httpx.Client() as client:
        for i in range(rounds + 1):
            history = text(200)
            row = {"on": [], "off": [], "prompt_tokens": [], "cached_tokens": [], "same_text": True}
            for t in range(turns):
                history += f"\n\nUser: {text(40)}\nAssistant:"
                got = {}
                for side in order(i + t):
                    got[side] = _stream_turn(client, servers[side].url, history, max_tokens)
                    row[side].append(got[side][0])
                row["prompt_tokens"].append(len(gen.encode(history)))
                row["cached_tokens"].append(got["on"][2].get("prompt_tokens_details", {}).get("cached_tokens"))
                row["same_text"] &= got["on"][1] == got["off"][1]
                history += got["off"][1]
            if not row["same_text"]:
                raise RuntimeError(f"(c) conversation {i}: a turn's text differs with prefix caching: not timed")
            row["ratio_last"] = row["on"][-1] / row["off"][-1]
            if i:
                rows.append(row)
                echo(f"  (c) conversation {i}: turn {turns} ({row['prompt_tokens'][-1]} prompt tokens, cached "
                     f"{row['cached_tokens'][-1]}): TTFT on {row['on'][-1] * 1e3:.0f} ms, off {row['off'][-1] * 1e3:.0f} ms, "
                     f"ratio {row['ratio_last']:.3f}")
    return {"rounds": rows, "turns": turns, "max_tokens": max_tokens,
            "ttft_last_on_ms": percentiles([r["on"][-1] * 1e3 for r in rows]),
            "ttft_last_off_ms": percentiles([r["off"][-1] * 1e3 for r in rows]),
            "ratio_median": float(np.median([r["ratio_last"] for r in rows]))}


# ---- records -------------------------------------------------------------------------------------------------

def _pct(rows: list[dict], side: str, key: str, scale: float = 1.0) -> dict:
    return percentiles([r[side][key] * scale for r in rows])


def _strip(rows: list[dict]) -> list[dict]:
    return [{k: ({kk: vv for kk, vv in v.items() if kk != "tokens"} if isinstance(v, dict) else v)
             for k, v in r.items()} for r in rows]


def table(record: dict) -> str:
    """The summary, from the record only."""
    c = record["conditions"]
    lines = [f"Prefix caching, gpt2 fp32 (random weights, init 0.1), {record['threads']} threads; CPU {c.get('cpu')}; "
             f"flags: {record['cpu_flags']}; commit {c.get('git_commit')}", "",
             "| figure | caching on | caching off | on / off (median of rounds) | target | load avg 1m before -> after |",
             "|---|---|---|---|---|---|"]
    p = record["parts"]
    if "ttft" in p:
        a = p["ttft"]
        lines.append(f"| (a) TTFT, 600-token prompt, 590 shared with a finished request (p50 ms) | "
                     f"{a['ttft_on_ms']['p50']:.1f} | {a['ttft_off_ms']['p50']:.1f} | {a['ratio_median']:.3f} | <= 0.15 | "
                     f"{a['load'][0]} -> {a['load'][1]} |")
    if "lm_eval" in p:
        b = p["lm_eval"]
        lines.append(f"| (b) lm-eval burst, 400-token context x 4 scoring requests, total (p50 ms) | "
                     f"{b['total_on_ms']['p50']:.0f} | {b['total_off_ms']['p50']:.0f} | {b['ratio_median']:.3f} | <= 0.4 | "
                     f"{b['load'][0]} -> {b['load'][1]} |")
    if "chat" in p:
        ch = p["chat"]
        lines.append(f"| (c) 6-turn chat through serve, TTFT of turn 6 (p50 ms) | {ch['ttft_last_on_ms']['p50']:.0f} | "
                     f"{ch['ttft_last_off_ms']['p50']:.0f} | {ch['ratio_median']:.3f} | <= 0.3 | "
                     f"{ch['load'][0]} -> {ch['load'][1]} |")
    if "fresh" in p:
        e = p["fresh"]
        lines.append(f"| (e) fresh engine: unrelated 100-token requests after a 600-token one, TTFT (p50 ms) | "
                     f"{e['ttft_on_ms']['p50']:.1f} | {e['ttft_off_ms']['p50']:.1f} | {e['ratio_median']:.3f} | "
                     f"within noise | {e['load'][0]} -> {e['load'][1]} |")
    if "load" in p:
        d = p["load"]
        lines.append(f"| (d) unrelated prompts, 8 clients, tokens/s (p50) | {d['tokens_per_s_on']['p50']:.1f} | "
                     f"{d['tokens_per_s_off']['p50']:.1f} | {d['ratio_median']:.3f} (rounds {d['ratio_min']:.3f}-"
                     f"{d['ratio_max']:.3f}) | within noise | {d['load'][0]} -> {d['load'][1]} |")
    extra = []
    if "load" in p:
        d = p["load"]
        extra.append(f"(d) the loop's host time per step (p50): {d['host_ms_per_step_on']['p50']:.2f} ms on, "
                     f"{d['host_ms_per_step_off']['p50']:.2f} ms off.")
    if "lm_eval" in p:
        extra.append(f"(b) largest |logprob on - off|: {p['lm_eval']['max_logprob_diff']:.1e}.")
    if "chat" in p:
        r = p["chat"]["rounds"][0]
        extra.append(f"(c) prompt tokens per turn {r['prompt_tokens']}, cached {r['cached_tokens']} (first conversation).")
    return "\n".join(lines + ([""] + extra if extra else [])) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", type=Path, default=Path("artifacts/bench/prefix-cache"),
                    help="where the model is exported (once) and the servers' logs go")
    ap.add_argument("--out", type=Path, default=Path("bench-results/prefix-cache"), help="results.json, table.md")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per part (after one warm-up round)")
    ap.add_argument("--parts", default="ttft,lm_eval,chat,load,fresh",
                    help="comma-separated: ttft, lm_eval, chat, load, fresh")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model = prepare_model(args.work_dir)
    conditions = collect_conditions()
    flags = cpu_flags()
    print(format_header(conditions, {"model": model, "threads": args.threads, "cpu flags (lscpu)": flags,
                                     "rounds": args.rounds}))
    record = {"conditions": conditions, "cpu_flags": flags, "threads": args.threads, "model": str(model), "parts": {}}
    rng = np.random.default_rng(0)

    from engine import Generator
    gen = Generator.from_pretrained(model, threads=args.threads, max_batch=8)
    vocab = gen.config.vocab_size
    touch_pool(lambda ps: gen.generate(ps, SamplingParams.greedy(2)), rng, vocab)
    try:
        for name, fn in (("ttft", part_ttft), ("load", part_load)):
            if name in parts:
                before = load()
                print(f"({'a' if name == 'ttft' else 'd'}) {name}: load avg {before}")
                record["parts"][name] = {**fn(gen, args.rounds, rng), "load": [before, load()]}
    finally:
        gen.core.close()     # its tokenizer still counts the chat's prompt tokens
    if "fresh" in parts:
        before = load()
        print(f"(e) fresh: load avg {before}")
        record["parts"]["fresh"] = {**part_fresh(model, args.threads, args.rounds, rng, vocab),
                                    "load": [before, load()]}
    if parts & {"lm_eval", "chat"}:
        servers = {side: Server(model, args.threads, side == "on", args.work_dir / f"serve-{side}.log") for side in SIDES}
        try:
            for s in servers.values():
                s.wait_ready()
                touch_pool(lambda ps, s=s: _concurrently(s.url, [{"prompt": p, "max_tokens": 2} for p in ps]), rng, vocab)
            print("servers: " + ", ".join(f"{side}: {s.cmd}" for side, s in servers.items()))
            if "lm_eval" in parts:
                before = load()
                print(f"(b) lm_eval: load avg {before}")
                record["parts"]["lm_eval"] = {**part_lm_eval(servers, args.rounds, rng, vocab), "load": [before, load()]}
            if "chat" in parts:
                before = load()
                print(f"(c) chat: load avg {before}")
                record["parts"]["chat"] = {**part_chat(servers, max(args.rounds // 2, 1), rng, gen),
                                           "load": [before, load()]}
        finally:
            for s in servers.values():
                s.stop()
    out = table(record)
    print("\n" + out)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    (args.out / "table.md").write_text(out)
    print(f"written: {args.out / 'results.json'}, {args.out / 'table.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
