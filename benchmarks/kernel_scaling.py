"""How far ONNX Runtime's own CPU kernels let batched generation scale: the decoder's kernels timed
alone, in the model's shapes, at batch 1 and batch B, without the engine.

A decode step of the CPU graph is, by time, the linear layers (Gemm over every weight, the LM head
included: ~90% of a step) and attention over each row's cached keys/values (GroupQueryAttention); a
short prompt's prefill is almost all linear layers. This probe times exactly those kernels on random
weights:

  linear     per layer c_attn -> attn.c_proj -> c_fc -> mlp.c_proj as 2-D Gemms, chained so each waits
             for the last as in the model (a Slice takes c_attn's first C columns), then the LM head
             (transB Gemm over a (V, C) matrix, as the graph runs it) on the rows whose logits are read.
             A decode step: B rows, all read. A prefill: B x P rows, the last of each prompt read.
  attention  one GroupQueryAttention node per layer, each over its own cache, every row at position
             P + N/2 (the middle of the generation), batch 1 reading one row's keys/values, B rows'.

and reports each part's batch-B time over its batch-1 time, `step_scaling` = B x step(1) / step(B)
with step = linear + attention (the decode-step tokens/s ratio these kernels allow), and
`tokens_scaling` = B x gen(1) / gen(B) with gen = prefill + (N - 1) x step: the end-to-end tokens/s
ratio that `gpt2-engine bench` reports, for a graph made of nothing but these kernels (no LayerNorm,
GELU, prompt attention, per-op or Python cost). If the engine comes close to it, batch throughput is
bounded by the kernels, not by the graph around them. It is a ceiling for a graph that adds no cost
of its own: costs that grow less than B-fold with the batch (per-op overhead) raise a ratio while
lowering both throughputs, so a slower engine could read higher.

Times are best-of-N over interleaved rounds (floor.py's reasoning: noise only adds time). Weights are
streamed into an external-data file as they are drawn, so no size exists twice in Python memory.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from engine.config import GPT2Config
from engine.errors import InputError
from export.graph import ExternalData

FLOAT, INT32, INT64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64
OPSET = 21


def layer_weights(cfg: GPT2Config, rng: np.random.Generator) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """One block's linear layers in model order: (name, W (in, out), bias (out,)). Weights std 0.02 as
    GPT-2's init; biases std 1 keep activations O(1) through any depth (no denormals, which would
    slow the kernels and falsify the timing)."""
    C = cfg.n_embd
    shapes = (("c_attn", C, 3 * C), ("attn.c_proj", C, C), ("c_fc", C, 4 * C), ("mlp.c_proj", 4 * C, C))
    return [(name, rng.standard_normal((k, n), np.float32) * np.float32(0.02), rng.standard_normal(n, np.float32))
            for name, k, n in shapes]


def lm_head_weight(cfg: GPT2Config, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((cfg.vocab_size, cfg.n_embd), np.float32) * np.float32(0.02)  # (V, C)


def _const(name: str, value: np.ndarray, inits: list) -> str:
    inits.append(onnx.numpy_helper.from_array(value, name))
    return name


def linear_model(cfg: GPT2Config, seed: int, external: ExternalData) -> onnx.ModelProto:
    """x (M, C), rows (K,) -> logits (K, V): every linear layer of the decoder over the M rows, the LM
    head over the K rows picked (see the module docstring). Weights are drawn from `seed` in the order
    layer_weights / lm_head_weight give (the tests redo it)."""
    rng = np.random.default_rng(seed)
    C = cfg.n_embd
    nodes, inits = [], []
    starts, ends, axis1 = (_const(n, np.array([v], np.int64), inits)
                           for n, v in (("starts", 0), ("ends", C), ("axis1", 1)))
    h = "x"                                                                          # (M, C)
    for i in range(cfg.n_layer):
        for name, W, b in layer_weights(cfg, rng):
            key = f"h.{i}.{name}"
            inits += [external.tensor(f"{key}.weight", W), external.tensor(f"{key}.bias", b)]
            nodes.append(helper.make_node("Gemm", [h, f"{key}.weight", f"{key}.bias"], [f"{key}/out"], name=key))
            h = f"{key}/out"                                                         # (M, out)
            if name == "c_attn":  # attn.c_proj reads C columns, as it reads attention's (M, C) output
                nodes.append(helper.make_node("Slice", [h, starts, ends, axis1], [f"{key}/q"], name=f"{key}/Slice"))
                h = f"{key}/q"                                                       # (M, C)
    inits.append(external.tensor("lm_head.weight", lm_head_weight(cfg, rng)))       # (V, C)
    nodes.append(helper.make_node("Gather", [h, "rows"], ["last"], name="rows", axis=0))  # (K, C)
    nodes.append(helper.make_node("Gemm", ["last", "lm_head.weight"], ["logits"], name="lm_head", transB=1))  # (K, V)
    graph = helper.make_graph(nodes, "linear_layers", [helper.make_tensor_value_info("x", FLOAT, ["M", C]),
                                                        helper.make_tensor_value_info("rows", INT64, ["K"])],
                              [helper.make_tensor_value_info("logits", FLOAT, ["K", cfg.vocab_size])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 10
    return model


def attention_model(cfg: GPT2Config) -> onnx.ModelProto:
    """One GroupQueryAttention per layer (as the CPU graph has), each over its own past/present cache
    (B, nh, S, hs), sharing the packed qkv (B, 1, 3C) of a decode step."""
    nh, hs, C = cfg.n_head, cfg.head_dim, cfg.n_embd
    inputs = [helper.make_tensor_value_info("qkv", FLOAT, ["B", 1, 3 * C]),
              helper.make_tensor_value_info("seqlens_k", INT32, ["B"]),
              helper.make_tensor_value_info("total_len", INT32, [])]
    nodes, outputs = [], []
    for i in range(cfg.n_layer):
        cache = ["B", nh, "S", hs]
        inputs += [helper.make_tensor_value_info(f"past_key.{i}", FLOAT, cache),
                   helper.make_tensor_value_info(f"past_value.{i}", FLOAT, cache)]
        nodes.append(helper.make_node("GroupQueryAttention",
                                      ["qkv", "", "", f"past_key.{i}", f"past_value.{i}", "seqlens_k", "total_len"],
                                      [f"y.{i}", f"present_key.{i}", f"present_value.{i}"], name=f"h.{i}.attn",
                                      domain="com.microsoft", num_heads=nh, kv_num_heads=nh))
        outputs += [helper.make_tensor_value_info(f"y.{i}", FLOAT, ["B", 1, C]),
                    helper.make_tensor_value_info(f"present_key.{i}", FLOAT, cache),
                    helper.make_tensor_value_info(f"present_value.{i}", FLOAT, cache)]
    graph = helper.make_graph(nodes, "attention", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


def _session(model_path: str | bytes, threads: int):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])


class LinearRunner:
    """The linear layers' session; `run` is one pass over the rows `inputs` makes."""

    def __init__(self, cfg: GPT2Config, threads: int, seed: int, work_dir: Path):
        path = work_dir / "linear.onnx"
        external = ExternalData(work_dir / "linear.weights")
        try:
            model = linear_model(cfg, seed, external)
        finally:
            external.close()
        onnx.save(model, path)
        self.session = _session(str(path), threads)
        self.cfg = cfg

    def inputs(self, batch: int, tokens: int = 1, seed: int = 1) -> dict[str, np.ndarray]:
        """`batch` rows of `tokens` positions each; the LM head reads each row's last position."""
        x = np.random.default_rng(seed).standard_normal((batch * tokens, self.cfg.n_embd), np.float32)  # (B*T, C)
        return {"x": x, "rows": np.arange(tokens - 1, batch * tokens, tokens, dtype=np.int64)}           # (B,)

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, feeds)[0]                                      # (B, V)


class AttentionRunner:
    """GroupQueryAttention over `batch` rows at `position` (each row attends over position + 1 slots:
    its cache plus the step's own key/value, written in place at slot `position`)."""

    def __init__(self, cfg: GPT2Config, threads: int):
        self.cfg = cfg
        self.session = _session(attention_model(cfg).SerializeToString(), threads)

    def bind(self, batch: int, position: int, seed: int = 2):
        """An IO binding with random caches (B, nh, position + 1, hs), past and present aliased as the
        engine binds them; returns (binding, the numpy caches it writes into, the qkv it reads)."""
        import onnxruntime as ort
        cfg = self.cfg
        rng = np.random.default_rng(seed)
        binding = self.session.io_binding()
        qkv = rng.standard_normal((batch, 1, 3 * cfg.n_embd), np.float32)            # (B, 1, 3C)
        binding.bind_cpu_input("qkv", qkv)
        binding.bind_cpu_input("seqlens_k", np.full(batch, position, np.int32))      # total - 1, per row
        binding.bind_cpu_input("total_len", np.array(position + 1, np.int32))
        caches = []
        for i in range(cfg.n_layer):
            binding.bind_output(f"y.{i}", "cpu")  # before the caches: outputs come back in binding order
            for past, present in ((f"past_key.{i}", f"present_key.{i}"), (f"past_value.{i}", f"present_value.{i}")):
                arr = rng.standard_normal((batch, cfg.n_head, position + 1, cfg.head_dim), np.float32)  # (B, nh, S, hs)
                ov = ort.OrtValue.ortvalue_from_numpy(arr)
                binding.bind_ortvalue_input(past, ov)
                binding.bind_ortvalue_output(present, ov)
                caches.append(arr)
        return binding, caches, qkv

    def run(self, binding) -> None:
        self.session.run_with_iobinding(binding)

    @staticmethod
    def attention_outputs(binding) -> list[np.ndarray]:
        return [o.numpy() for o in binding.get_outputs()[0::3]]                     # n_layer x (B, 1, C)


@dataclass
class KernelScaling:
    """Best-of times (seconds) per batch size (1 and `batch`), and the ratios the module docstring
    defines, for prompts of `prompt_len` tokens and `new_tokens` generated per row."""

    batch: int
    prompt_len: int
    new_tokens: int
    linear_s: dict[int, float]      # one decode step's linear layers
    attention_s: dict[int, float]   # one decode step's attention, at position prompt_len + new_tokens // 2
    prefill_s: dict[int, float]     # the linear layers over batch x prompt_len rows

    @property
    def position(self) -> int:
        return middle_position(self.prompt_len, self.new_tokens)

    def part_ratio(self, part: str) -> float:
        t = getattr(self, f"{part}_s")
        return t[self.batch] / t[1]

    def step_s(self, b: int) -> float:
        return self.linear_s[b] + self.attention_s[b]

    def generate_s(self, b: int) -> float:
        """Prefill (which yields the first token), then new_tokens - 1 decode steps: what the bench's
        end-to-end time covers."""
        return self.prefill_s[b] + (self.new_tokens - 1) * self.step_s(b)

    @property
    def step_scaling(self) -> float:
        return self.batch * self.step_s(1) / self.step_s(self.batch)

    @property
    def tokens_scaling(self) -> float:
        return self.batch * self.generate_s(1) / self.generate_s(self.batch)


def middle_position(prompt_len: int, new_tokens: int) -> int:
    return prompt_len + new_tokens // 2


def _interleaved_best(calls: dict[int, callable], repeats: int) -> dict[int, float]:
    """Best-of-`repeats` seconds per key; each round runs every call once, alternating the order."""
    keys = list(calls)
    for k in keys:
        calls[k]()  # untimed: first-touch page faults, thread pool start
    best = {k: math.inf for k in keys}
    for r in range(repeats):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            t0 = time.perf_counter()
            calls[k]()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def measure(cfg: GPT2Config, batches: tuple[int, ...], prompt_len: int = 32, new_tokens: int = 128,
            threads: int = 1, repeats: int = 20, seed: int = 0, progress=print) -> list[KernelScaling]:
    """Time the linear layers (decode step and prefill) and attention at batch 1 and every batch in
    `batches`, in interleaved rounds (each round visits every batch size, so a slow phase of the
    machine lands on all of them)."""
    if prompt_len < 1 or new_tokens < 1 or prompt_len + new_tokens > cfg.n_positions:
        raise InputError(f"prompt_len and new_tokens must be >= 1 with prompt_len + new_tokens <= "
                         f"{cfg.n_positions} (the context), got {prompt_len} + {new_tokens}")
    if any(b < 1 for b in batches) or repeats < 1 or threads < 1:
        raise InputError(f"batches, repeats and threads must be >= 1, got {batches}, {repeats}, {threads}")
    sizes = sorted({1, *batches})
    position = middle_position(prompt_len, new_tokens)
    with tempfile.TemporaryDirectory(prefix="kernel-scaling-") as tmp:
        progress(f"linear layers: drawing {cfg.n_params() / 1e6:.0f}M random weights, building the session")
        linear = LinearRunner(cfg, threads, seed, Path(tmp))
        calls = {}
        for b in sizes:
            step, prompt = linear.inputs(b), linear.inputs(b, prompt_len)
            calls[("step", b)] = lambda f=step, run=linear.run: run(f)
            calls[("prefill", b)] = lambda f=prompt, run=linear.run: run(f)
        linear_times = _interleaved_best(calls, repeats)
        del linear, calls  # its thread pool would otherwise spin beside the next session's
    progress(f"attention: {cfg.n_layer} GroupQueryAttention nodes, position {position}")
    attention = AttentionRunner(cfg, threads)
    bindings = {b: attention.bind(b, position)[0] for b in sizes}
    attention_s = _interleaved_best({b: (lambda b=b: attention.run(bindings[b])) for b in sizes}, repeats)
    return [KernelScaling(b, prompt_len, new_tokens,
                          linear_s={k: linear_times[("step", k)] for k in (1, b)},
                          attention_s={k: attention_s[k] for k in (1, b)},
                          prefill_s={k: linear_times[("prefill", k)] for k in (1, b)})
            for b in batches]


def report(name: str, results: list[KernelScaling], threads: int) -> str:
    r0 = results[0]
    lines = [f"{name}: ONNX Runtime CPU kernels alone, {threads} threads, prompts of {r0.prompt_len} tokens, "
             f"{r0.new_tokens} new tokens, decode step at position {r0.position} (best of interleaved rounds)",
             "| batch | step: linear ms | step: attention ms | step tokens/s scaling | prefill linear ms | "
             "end-to-end tokens/s scaling |",
             "|---|---|---|---|---|---|",
             f"| 1 | {r0.linear_s[1] * 1e3:.2f} | {r0.attention_s[1] * 1e3:.2f} | 1.00x | "
             f"{r0.prefill_s[1] * 1e3:.1f} | 1.00x |"]
    for r in results:
        if r.batch == 1:
            continue
        b = r.batch
        lines.append(f"| {b} | {r.linear_s[b] * 1e3:.2f} ({r.part_ratio('linear'):.2f}x) | "
                     f"{r.attention_s[b] * 1e3:.2f} ({r.part_ratio('attention'):.2f}x) | {r.step_scaling:.2f}x | "
                     f"{r.prefill_s[b] * 1e3:.1f} | {r.tokens_scaling:.2f}x |")
    return "\n".join(lines)


# ---- the exported model's own forward, batch by batch (`bench-kernels --forward NAME=DIR`) ----------------
#
# What issue 22's goals are stated in: the raw `backend.forward` of a decode step at batch 1 and B (rows
# at 40-70 filled positions, as after a short prompt) and a prefill of P tokens, for several model
# directories side by side (fp32 and int8, or two int8 kernels). Each model runs in its own process, as a
# serving process would: sessions of several models in one process measured batch-1 int8 ~1.6x slower
# than alone (their thread pools and caches interfere), which hid a 1.3x batch-1 difference between
# two int8 kernels. The driver asks each worker in turn for a block of steps (rounds alternate the order,
# so a slow phase of a shared machine lands on every model) and reports medians of the block means.

FILL_POSITIONS = (40, 2)  # row r of the pool holds 40 + 2r tokens before the timed decode steps

_WORKER = """
import sys, time
import numpy as np
from engine.artifact import load_artifact
from engine.backends.ort import OrtBackend
path, (threads, rows, prefill, start, step) = sys.argv[1], map(int, sys.argv[2:7])
b = OrtBackend(load_artifact(path), threads=threads)
rng = np.random.default_rng(0)
pool = b.new_cache(rows, b.config.n_positions)
for r in range(rows):
    n = start + step * r
    b.forward(b.view(pool, r, r + 1), rng.integers(0, b.config.vocab_size, (1, n)), np.array([0]), np.array([[n - 1]]))
pos = np.array([start + step * r for r in range(rows)])
one = b.new_cache(1, pool.capacity)
prompt = rng.integers(0, b.config.vocab_size, (1, prefill))
def call(kind, n):
    if kind == "decode":
        v = b.view(pool, 0, n)
        return lambda: b.forward(v, rng.integers(0, b.config.vocab_size, (n, 1)), pos[:n], np.zeros((n, 1), np.int64))
    return lambda: b.forward(one, prompt, np.array([0]), np.array([[prefill - 1]]))
calls = {}
print("ready", flush=True)
for line in sys.stdin:
    kind, n, reps = line.split()
    f = calls.setdefault((kind, n), call(kind, int(n)))
    f()  # untimed: the same step repeats in serving
    t0 = time.perf_counter()
    for _ in range(int(reps)):
        f()
    print((time.perf_counter() - t0) / int(reps), flush=True)
"""


@dataclass
class ForwardScaling:
    """Median seconds per call: decode[name][batch] and prefill[name], for prefill_len tokens."""

    batches: tuple[int, ...]
    prefill_len: int
    decode: dict[str, dict[int, float]]
    prefill: dict[str, float]


def forward_scaling(models: dict[str, Path], batches: tuple[int, ...] = (8, 16), prefill_len: int = 512,
                    threads: int = 2, repeats: int = 7, steps: int = 8, progress=print) -> ForwardScaling:
    """Time each model directory's forward (see the section comment) in worker processes, interleaved."""
    import os
    import statistics
    import subprocess
    import sys
    if not models or any(b < 1 for b in batches) or repeats < 1 or threads < 1 or prefill_len < 1:
        raise InputError(f"need at least one model and batches, repeats, threads, prefill_len >= 1, got "
                         f"{len(models)} models, {batches}, {repeats}, {threads}, {prefill_len}")
    sizes = sorted({1, *batches})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")])}
    workers = {}
    try:
        for name, path in models.items():
            progress(f"{name}: loading {path}")
            p = subprocess.Popen([sys.executable, "-c", _WORKER, str(path), *map(str, (threads, max(sizes), prefill_len, *FILL_POSITIONS))],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            workers[name] = p
            if p.stdout.readline().strip() != "ready":
                raise InputError(f"{name}: the worker for {path} did not start (its error is above)")
        jobs = [("decode", b, steps) for b in sizes] + [("prefill", prefill_len, 1)]
        times: dict[tuple, list[float]] = {}
        names = list(workers)
        for r in range(repeats):
            for kind, n, reps in jobs:
                for name in (names if r % 2 == 0 else names[::-1]):
                    time.sleep(0.05)  # the last worker's threads stop spinning before the next one runs
                    p = workers[name]
                    p.stdin.write(f"{kind} {n} {reps}\n")
                    p.stdin.flush()
                    times.setdefault((name, kind, n), []).append(float(p.stdout.readline()))
            progress(f"round {r + 1}/{repeats}")
    finally:
        for p in workers.values():
            if p.stdin:
                p.stdin.close()
            p.wait(timeout=60)
    med = {k: statistics.median(v) for k, v in times.items()}
    return ForwardScaling(tuple(sizes), prefill_len, {n: {b: med[(n, "decode", b)] for b in sizes} for n in models},
                          {n: med[(n, "prefill", prefill_len)] for n in models})


def forward_report(r: ForwardScaling, threads: int) -> str:
    """Markdown: decode ms per batch (x its batch 1), prefill ms (x the first model's)."""
    first = next(iter(r.prefill))
    lines = [f"backend.forward, one process per model, {threads} threads, decode rows at "
             f"{FILL_POSITIONS[0]}..{FILL_POSITIONS[0] + FILL_POSITIONS[1] * (max(r.batches) - 1)} filled positions "
             f"(medians of interleaved rounds)",
             "| model | " + " | ".join(f"decode B={b} ms" for b in r.batches) + f" | prefill {r.prefill_len} ms |",
             "|---|" + "---|" * (len(r.batches) + 1)]
    for name, d in r.decode.items():
        cells = [f"{d[b] * 1e3:.2f}" + ("" if b == 1 else f" ({d[b] / d[1]:.2f}x)") for b in r.batches]
        pf = r.prefill[name]
        cells.append(f"{pf * 1e3:.1f}" + ("" if name == first else f" ({pf / r.prefill[first]:.2f}x {first})"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
