"""Messages a new user met that were wrong or misleading (issue 24, items 8-10): each is one line that
says the fix, printed before any other output, and names only options the command has."""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

from cli.main import main
from engine.errors import EngineError


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


# ---- item 8: a random init needs a positive init range -------------------------------------------------

@pytest.mark.parametrize("value", ["-1", "0"])
def test_export_refuses_a_non_positive_init_range(value, tmp_path):
    r = invoke("export", "gpt2", "--init", "random", "--init-range", value, "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "--init-range" in r.stderr and "x>0" in r.stderr, r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", [-1.0, 0.0, float("nan"), float("inf")])
def test_export_model_refuses_a_non_positive_init_range(value, tmp_path):
    from export.exporter import export_model
    with pytest.raises(EngineError, match=r"--init-range \(the std of the random weights\) must be a number > 0"):
        export_model("gpt2", tmp_path / "o", init="random", init_range=value, show_progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["bench", "bench-serve"])
def test_the_bench_commands_refuse_it_too(command, tmp_path):
    r = invoke(command, "--init-range", "-0.1", "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "--init-range" in r.stderr, r.output


# ---- item 9: build without TensorRT names no option build lacks ---------------------------------------

def test_build_without_tensorrt_suggests_nothing_build_does_not_have(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)   # import tensorrt raises ImportError
    r = invoke("build", str(tmp_path))
    assert r.exit_code == 1 and r.stdout == "", r.output
    (line,) = r.stderr.strip().splitlines()
    assert "TensorRT is not importable" in line and "pip install -e '.[trt]'" in line
    assert "--backend" not in line, line   # build has no --backend
    assert "nothing to build" in line


def test_the_trt_backend_without_tensorrt_still_suggests_ort(monkeypatch, tiny_model):
    from engine.errors import BackendUnavailable
    from engine.generator import Generator
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailable, match=r"without a GPU use backend='ort' \(CLI: --backend ort\)"):
        Generator.from_pretrained(tiny_model.art, backend="trt")


# ---- item 10: inspect --------------------------------------------------------------------------------

@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_inspect_of_a_missing_directory_prints_only_the_error(json_flag, tmp_path):
    r = invoke("inspect", str(tmp_path / "nowhere"), *json_flag)
    assert r.exit_code == 1
    assert r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "does not exist" in r.stderr


def test_inspect_of_a_checkpoint_says_to_export_it_elsewhere(tiny_model):
    ckpt = str(tiny_model.ckpt)
    r = invoke("inspect", ckpt)
    assert r.exit_code == 1 and r.stdout == ""
    (line,) = r.stderr.strip().splitlines()
    assert "is a Hugging Face checkpoint" in line and f"gpt2-engine export {ckpt} --out DIR" in line
    assert f"--out {ckpt}" not in line   # exporting into the checkpoint's own directory is no fix


def test_inspect_of_a_model_directory(tiny_model):
    r = invoke("inspect", str(tiny_model.art))
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[0] == str(tiny_model.art) and "weights:" in r.stdout
