"""`gpt2-engine export` / `inspect` as a user runs them: a real subprocess, its exit code and stderr.

Every bad input must give exit code != 0, one line of error on stderr (no traceback), and leave neither
a model directory nor a `.partial-` temp directory behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from export.checkpoint import save_checkpoint
from tests.conftest import TINY


def _decoded(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    # Bytes, decoded by hand: text mode would turn the progress bar's \r into line breaks.
    proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
    return proc


def run_cli(*args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return _decoded(subprocess.run([sys.executable, "-m", "cli", *map(str, args)], capture_output=True,
                                   timeout=timeout, env={**os.environ, **(env or {})}))


def error_lines(stderr: str) -> list[str]:
    """stderr's non-empty lines as a terminal shows them (a progress bar redraws itself with \\r)."""
    return [line.split("\r")[-1].strip() for line in stderr.split("\n") if line.split("\r")[-1].strip()]


def assert_clean_failure(proc: subprocess.CompletedProcess, out: Path, *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("Error: "), line
    for n in needles:
        assert n in line, line
    assert not out.exists(), f"{out} was left behind"
    if out.parent.is_dir():
        left = [p.name for p in out.parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]
        assert not left, f"temp directories left behind: {left}"
    return line


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "outputs" / "model"


@pytest.fixture
def bad_ckpt(tmp_path, tiny_checkpoint):
    """A fresh copy of the tiny checkpoint to break."""
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, d)
    return d


# ---- bad inputs -----------------------------------------------------------------------------------------

def test_dir_that_is_not_a_checkpoint(tmp_path, out):
    d = tmp_path / "photos"
    d.mkdir()
    (d / "cat.jpg").write_bytes(b"\xff\xd8")
    assert_clean_failure(run_cli("export", d, "--out", out), out, str(d), "not a GPT-2 checkpoint")


def test_missing_weights_file(bad_ckpt, out):
    (bad_ckpt / "model.safetensors").unlink()
    assert_clean_failure(run_cli("export", bad_ckpt, "--out", out), out, "no model.safetensors")


def test_truncated_weights_file(bad_ckpt, out):
    data = (bad_ckpt / "model.safetensors").read_bytes()
    (bad_ckpt / "model.safetensors").write_bytes(data[:len(data) // 3])
    assert_clean_failure(run_cli("export", bad_ckpt, "--out", out), out, "truncated or corrupt")


def test_wrong_shape(tmp_path, tiny_weights, out):
    import numpy as np
    w = dict(tiny_weights, **{"h.0.mlp.c_fc.weight": np.zeros((64, 255), np.float32)})
    d = save_checkpoint(tmp_path / "ckpt", TINY, w)
    assert_clean_failure(run_cli("export", d, "--out", out), out, "'h.0.mlp.c_fc.weight'", "(64, 256)")


def test_unknown_model_name(tmp_path, out):
    line = assert_clean_failure(run_cli("export", "gpt-5", "--out", out, env={"HF_HUB_CACHE": str(tmp_path / "hub")}),
                                out, "'gpt-5'")
    assert all(n in line for n in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2"))


def test_model_not_cached_offline(tmp_path, out):
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    assert_clean_failure(run_cli("export", "gpt2", "--out", out, env=env), out, "HF_HUB_OFFLINE", "--init random")


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_unwritable_out(tmp_path, tiny_checkpoint, where):
    # Tests run as root, where a chmod-ed directory does not stop writes: use paths no one can create.
    if where == "under_a_file":
        (tmp_path / "a_file").write_text("x")
        out = tmp_path / "a_file" / "sub" / "model"
    else:
        out = Path("/proc/gpt2-engine-test/model")
    assert_clean_failure(run_cli("export", tiny_checkpoint, "--out", out), out, str(out.parent))


def test_out_is_a_file(tmp_path, tiny_checkpoint):
    f = tmp_path / "model"
    f.write_text("precious")
    proc = run_cli("export", tiny_checkpoint, "--out", f)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert error_lines(proc.stderr) == [f"Error: --out {f} is a file: choose a directory path"]
    assert f.read_text() == "precious"


def test_existing_non_empty_out_needs_force(tmp_path, tiny_checkpoint):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    proc = run_cli("export", tiny_checkpoint, "--out", out)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "exists and is not empty" in lines[0] and "--force" in lines[0], proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_bad_precision_is_a_usage_error(tiny_checkpoint, out):
    proc = run_cli("export", tiny_checkpoint, "--out", out, "--precision", "int3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "int3" in proc.stderr
    assert not out.exists()


def test_gqa_attention_with_fp16_is_refused(tiny_checkpoint, out):
    proc = run_cli("export", tiny_checkpoint, "--out", out, "--precision", "fp16", "--attention", "gqa")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "fp32/int8" in lines[0] and "TensorRT" in lines[0], proc.stderr
    assert not out.exists()


def test_prepack_with_fp16_is_refused(tiny_checkpoint, out):
    proc = run_cli("export", tiny_checkpoint, "--out", out, "--precision", "fp16", "--prepack")
    assert_clean_failure(proc, out, "--prepack", "fp32, int8")


# ---- good inputs --------------------------------------------------------------------------------------

def test_export_then_inspect_then_force(tmp_path, tiny_checkpoint):
    out = tmp_path / "model"
    proc = run_cli("export", tiny_checkpoint, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    # The graph in model.onnx, every weight in model.onnx.data (memory-mapped by ONNX Runtime).
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "model.onnx.data", "tokenizer.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "checkpoint"
    assert manifest["config"] == TINY.to_dict()

    proc = run_cli("inspect", out)
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM" not in proc.stdout and f"weights:    {tiny_checkpoint.name}" in proc.stdout
    assert "2 layers, 64 wide, 4 heads" in proc.stdout

    (out / "stale.txt").write_text("from the previous export")
    proc = run_cli("export", tiny_checkpoint, "--out", out, "--force", "--precision", "fp16")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "manifest.json").read_text())["precision"] == "fp16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no .partial- or .old- left

    proc = run_cli("inspect", tmp_path / "nowhere")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert error_lines(proc.stderr) == [f"Error: model directory {tmp_path / 'nowhere'} does not exist: "
                                        f"create it with `gpt2-engine export MODEL --out {tmp_path / 'nowhere'}`"]


def test_export_prepack_saves_the_prepacked_model_that_loads_use(tmp_path, tiny_checkpoint):
    from engine.artifact import load_artifact
    from engine.backends.ort import PREPACKED_DIR, OrtBackend, find_prepacked
    out = tmp_path / "model"
    proc = run_cli("export", tiny_checkpoint, "--out", out, "--precision", "int8", "--prepack")
    assert proc.returncode == 0, proc.stderr
    packed = find_prepacked(load_artifact(out))
    assert packed is not None and packed.parent == out / PREPACKED_DIR
    assert OrtBackend(load_artifact(out), threads=1).model_file == packed


def test_init_random_is_labelled(tmp_path):
    """`--init random` through the real CLI code; the size table's distilgpt2 entry is swapped for the
    tiny config in that process only (the real one costs ~10 s of random numbers for the same code path)."""
    out = tmp_path / "model"
    patch = ("import sys, engine.config as c; from tests.conftest import TINY; c.SIZES['distilgpt2'] = TINY; "
             "from cli.main import main; sys.argv[0] = 'gpt2-engine'; main()")
    proc = _decoded(subprocess.run([sys.executable, "-c", patch, "export", "distilgpt2", "--init", "random",
                                    "--seed", "7", "--out", str(out)], capture_output=True, timeout=300,
                                   cwd=Path(__file__).resolve().parents[1]))
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "random"
    assert manifest["source"]["seed"] == 7 and manifest["source"]["name"] == "distilgpt2"
    assert manifest["config"] == TINY.to_dict()
    assert "RANDOM weights" in proc.stdout

    proc = run_cli("inspect", out)
    assert proc.returncode == 0, proc.stderr
    assert "weights:    distilgpt2 (RANDOM weights, seed 7: output is not language)" in proc.stdout

    proc = run_cli("inspect", out, "--json")
    assert json.loads(proc.stdout)["source"]["kind"] == "random"


def test_init_random_needs_a_size_name(out):
    assert_clean_failure(run_cli("export", "./my-model", "--init", "random", "--out", out), out,
                         "--init random needs a size name")
