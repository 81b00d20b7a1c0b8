"""The bench's optional libraries are checked before any work: a missing one is one line on stderr
naming it and the install command, a non-zero exit within seconds, no traceback (benchmarks/extras.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from benchmarks import extras, tables

REPO = Path(__file__).resolve().parents[1]

# A sitecustomize that makes the named top-level modules unimportable (as if not installed), for a
# Python started with its directory first on PYTHONPATH.
BLOCKER = '''import sys

BLOCKED = {blocked!r}


class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, _Block())
'''


def _python_without(tmp_path: Path, *blocked: str) -> dict:
    """An environment whose Python cannot import ``blocked``."""
    site = tmp_path / "blocker"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER.format(blocked=set(blocked)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


@pytest.mark.parametrize("command", [["-m", "cli.bench"], ["-m", "cli", "bench"]],
                         ids=["cli.bench", "gpt2-engine bench"])
def test_bench_without_matplotlib_stops_before_any_work(tmp_path, command):
    env = _python_without(tmp_path, "matplotlib")
    probe = subprocess.run([sys.executable, "-c", "import matplotlib"], env=env, cwd=REPO, capture_output=True)
    assert probe.returncode != 0  # the blocker works: matplotlib cannot be imported there
    out, work = tmp_path / "out", tmp_path / "work"
    res = subprocess.run([sys.executable, *command, "--model", "gpt2", "--init", "random", "--quick",
                          "--out", str(out), "--work-dir", str(work)],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert res.returncode != 0
    assert "pip install" in res.stderr and "bench" in res.stderr and "matplotlib" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not out.exists() and not work.exists()  # nothing was exported, converted or timed


def test_bench_kernels_needs_no_optional_library(tmp_path):
    """bench-kernels runs ONNX Runtime's kernels alone: its modules import without any bench extra."""
    env = _python_without(tmp_path, "matplotlib", "torch", "transformers", "ctranslate2")
    res = subprocess.run([sys.executable, "-c", "import benchmarks.kernel_scaling, cli.bench"],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_what_is_needed_depends_on_the_peers(monkeypatch):
    monkeypatch.setattr(extras, "importable", lambda name: False)
    always = [names for names, _ in extras.missing_for_bench(())]
    assert always == [("matplotlib",), ("transformers", "torch")]   # plots, the reference
    assert [names for names, _ in extras.missing_for_bench(("hf",))] == always
    assert extras.missing_for_bench(("hf", "ct2-int8"))[-1][0] == ("ctranslate2",)
    monkeypatch.setattr(extras, "importable", lambda name: True)
    assert extras.missing_for_bench(("ct2",)) == []
    extras.check_bench(("ct2",))  # nothing missing: no error


def test_a_blocked_module_counts_as_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert not extras.importable("matplotlib")
    assert extras.importable("numpy")


def _capture(monkeypatch):
    from cli import bench as cli
    seen = {}

    def fake_run_bench(specs, plan, out, *, work_root, **kw):
        seen.update(plan=plan)
        return tables.BenchResult([], out, "HEADER", "TABLE", "RATIOS", [])
    monkeypatch.setattr(cli, "run_bench", fake_run_bench)
    return cli, seen


def test_missing_ctranslate2_names_the_peers_and_how_to_leave_them_out(monkeypatch, tmp_path):
    cli, seen = _capture(monkeypatch)
    monkeypatch.setattr(extras, "importable", lambda name: name != "ctranslate2")
    res = CliRunner().invoke(cli.bench, ["--quick", "--out", str(tmp_path / "o"), "--work-dir", str(tmp_path / "w")])
    assert res.exit_code == 1 and not seen
    assert "ctranslate2 (the CTranslate2 peers)" in res.output and "pip install torch==2.13.0 && pip install -e '.[bench]'" in res.output
    assert "--peer hf" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli.bench, ["--quick", "--peer", "hf", "--out", str(tmp_path / "o"),
                                         "--work-dir", str(tmp_path / "w")])
    assert seen["plan"].peers == ("hf",) and "TABLE" in res.output and "needs" not in res.output
