"""Two bench runs at once share the default work directory (issue 24, item 17): one died with
`SafetensorError ... No such file or directory` while the other rewrote the checkpoint. Each step that
writes there holds a lock on what it makes and writes under a temporary name renamed into place; the
second run waits, then reuses. Here two processes prepare the same random model (checkpoint + export)
at the same instant, twice over, and both must finish with the same weights."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from cli.bench import _new_results_dir
from tests.runtime_fixtures import REPO

PREPARE = """
import json, sys, time
from pathlib import Path
from benchmarks.models import ModelSpec, prepare_model
from engine import Generator, SamplingParams
from engine.config import GPT2Config
root, start = Path(sys.argv[1]), float(sys.argv[2])
while time.time() < start:
    time.sleep(0.001)
cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64)
model = prepare_model(ModelSpec("tiny", "random", cfg, seed=0, init_range=0.3), root)
with Generator.from_pretrained(model.artifact("fp32"), threads=1) as g:
    print(json.dumps(g.generate([464, 3616], SamplingParams.greedy(4)).token_ids))
"""


def test_two_runs_preparing_the_same_work_dir_both_finish(tmp_path):
    outputs = []
    for round_ in range(2):   # the first round makes everything, the second reuses it (with the first gone stale)
        root = tmp_path / "work"
        if round_:
            (next(root.glob("tiny-*")) / "checkpoint" / "complete").unlink()   # half-written: made again
        start = time.time() + 2.0   # both start together, after Python and the imports are up
        procs = [subprocess.Popen([sys.executable, "-c", PREPARE, str(root), str(start)], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        results = [p.communicate(timeout=300) for p in procs]
        for p, (out, err) in zip(procs, results):
            assert p.returncode == 0, err
            outputs.append(json.loads(out.strip().splitlines()[-1]))
        waited = [err for _, err in results if "waiting for another gpt2-engine process" in err]
        assert waited, "the two runs did not overlap: the test proves nothing"
        leftovers = [p.name for p in root.rglob(".*partial*")]
        assert leftovers == [], leftovers
    assert all(o == outputs[0] for o in outputs), outputs


def test_default_results_dirs_are_one_per_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dirs = [_new_results_dir() for _ in range(3)] + [_new_results_dir("serve-") for _ in range(2)]
    assert len(set(dirs)) == 5 and all(d.is_dir() and d.parent.name == "bench-results" for d in dirs)
