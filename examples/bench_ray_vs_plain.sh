#!/bin/bash
# The serving benchmark through Ray Serve against the plain server, in one run (docs/scaling.md, "Benchmark"):
#   plain-2t  gpt2-engine serve, 1 process, 2 threads
#   plain-1t  gpt2-engine serve, 1 process, 1 thread (the replicas' engine alone, for the proxy hop's cost)
#   ray-1x1   gpt2-engine serve --ray, 1 replica, 1 CPU / 1 thread
#   ray-2x1   gpt2-engine serve --ray, 2 replicas, 1 CPU / 1 thread each
# each measured by `gpt2-engine bench-serve --http URL` (validated first: the server's greedy text must equal
# the Generator's), one after the other. Usage: examples/bench_ray_vs_plain.sh [OUT_DIR]   (~5 minutes on 2 cores)
set -u
OUT=${1:-bench-results/ray-vs-plain-$(date -u +%Y%m%d-%H%M%S)}
CLI=${CLI:-.venv/bin/gpt2-engine}
PY=${PY:-.venv/bin/python}
BENCH="--model gpt2 --threads 1 --concurrency 1 --concurrency 4 --requests 16 --prompt-lens 16 128 --new-tokens 32 64 --time-limit 90"
export RAY_USAGE_STATS_ENABLED=0
mkdir -p "$OUT"
# The model bench-serve validates against: its random gpt2 (prepared once, as `gpt2-engine bench` does).
MODEL=$($PY -c "
from benchmarks.cli import _default_work_dir, _model_spec
from benchmarks.models import prepare_model
print(prepare_model(_model_spec('gpt2', 'random', 0, 0.1), _default_work_dir()).artifact('fp32'))" | tail -1)

run() {  # name port serve-options...
  local name=$1 port=$2; shift 2
  echo "== $name ($(cut -d' ' -f1-3 /proc/loadavg) load)" | tee -a "$OUT/log.txt"
  $CLI serve "$MODEL" --port "$port" "$@" > "$OUT/$name.server.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 240); do
    curl -sf "http://127.0.0.1:$port/v1/models" > /dev/null 2>&1 && break
    kill -0 $pid 2> /dev/null || { echo "$name: the server exited"; tail -5 "$OUT/$name.server.log"; return; }
    sleep 0.5
  done
  $CLI bench-serve $BENCH --http "http://127.0.0.1:$port" --out "$OUT/$name" > "$OUT/$name.bench.txt" 2>&1
  echo "$name: bench-serve exit $?" | tee -a "$OUT/log.txt"
  kill -TERM $pid; wait $pid
}
run plain-2t 18301 --threads 2
run plain-1t 18302 --threads 1
run ray-1x1 18303 --ray --replicas 1 --num-cpus 1
run ray-2x1 18304 --ray --replicas 2 --num-cpus 1
echo "== end ($(cut -d' ' -f1-3 /proc/loadavg) load)" | tee -a "$OUT/log.txt"
for n in plain-2t plain-1t ray-1x1 ray-2x1; do grep "^| gpt2 | http" "$OUT/$n.bench.txt" | sed "s/| http |/| $n |/"; done
