"""`gpt2-engine generate` happy paths, checked against the library on the same model, and
`resolve_model_dir`: a model name is exported once into the cache directory and reused after that.

The model: the tiny config exported with `--init random` under the name distilgpt2 (SIZES patched
while exporting), so its manifest says "random" and the CLI must print the random-weights label.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner

import engine.config
import export.exporter
import export.model_cache
from engine.artifact import GRAPH_VERSION
from engine.errors import InputError
from engine.generator import Generator
from engine.sampling import SamplingParams
from export.model_cache import resolve_model_dir
from tests.runtime_fixtures import PROMPTS, TINY, TINY_INIT, run_cli

LABEL = "[distilgpt2 (RANDOM weights, seed 0: output is not language)]"


@pytest.fixture(scope="module")
def random_art(tmp_path_factory) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(engine.config.SIZES, "distilgpt2", TINY)
        return export.exporter.export_model("distilgpt2", tmp_path_factory.mktemp("cli") / "tiny-random",
                                            init="random", seed=0, init_range=TINY_INIT, show_progress=False)


@pytest.fixture(scope="module")
def gen(random_art):
    g = Generator.from_pretrained(random_art)
    yield g
    g.close()


@pytest.fixture(scope="module")
def stop_string(gen) -> tuple[str, str]:
    """A stop string taken from the middle of the greedy text, and the text before its first match."""
    text = gen.generate(PROMPTS[0], SamplingParams.greedy(24)).text
    # Printable and not option-like, so that it travels as one command-line argument.
    stop = next(text[i:i + 2] for i in range(len(text) // 2, len(text) - 1)
                if text[i:i + 2].isprintable() and not text[i:i + 2].startswith("-"))
    return stop, text[:text.index(stop)]


@pytest.fixture(scope="module")
def cli(random_art, stop_string, tmp_path_factory):
    """Every happy-path invocation, run at once in subprocesses."""
    batch_file = tmp_path_factory.mktemp("batch") / "prompts.txt"
    batch_file.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n{PROMPTS[2].splitlines()[0]}\n")  # blank line skipped
    art = str(random_art)
    jobs = {
        "plain": [art, "Hello", "-n", "12", "--seed", "0"],
        "greedy": [art, PROMPTS[1], "-n", "24", "--greedy"],
        "greedy-stream": [art, PROMPTS[1], "-n", "24", "--greedy", "--stream"],
        "sampled-stream": [art, PROMPTS[1], "-n", "24", "--seed", "3", "--top-p", "0.9", "--stream"],
        "batch": [art, "--batch-file", str(batch_file), "-n", "10", "--seed", "1", "--top-k", "0"],
        "stop": [art, PROMPTS[0], "-n", "24", "--greedy", "--stop", stop_string[0]],
        "timings": [art, "Hello", "-n", "6", "--seed", "0", "--timings", "--threads", "1"],
    }
    with ThreadPoolExecutor(4) as pool:
        futures = {k: pool.submit(run_cli, "generate", *args) for k, args in jobs.items()}
        results = {k: f.result() for k, f in futures.items()}
    for k, r in results.items():
        assert r.returncode == 0, f"{k}: exit {r.returncode}\n{r.stderr}"
        assert "Traceback" not in r.stderr, f"{k}: {r.stderr}"
    return results


def test_plain_generate_prints_prompt_and_text_and_the_random_label(cli, gen):
    want = gen.generate("Hello", SamplingParams(max_new_tokens=12, seed=0))
    assert cli["plain"].stdout == "Hello" + want.text + "\n"
    assert LABEL in cli["plain"].stderr.splitlines()
    assert "load" not in cli["plain"].stderr  # timings only when asked for


def test_stream_prints_what_generate_prints(cli, gen):
    want = gen.generate(PROMPTS[1], SamplingParams.greedy(24))
    assert cli["greedy"].stdout == PROMPTS[1] + want.text + "\n"
    assert cli["greedy-stream"].stdout == cli["greedy"].stdout
    assert LABEL in cli["greedy-stream"].stderr.splitlines()
    sampled = gen.generate(PROMPTS[1], SamplingParams(max_new_tokens=24, seed=3, top_p=0.9))
    assert cli["sampled-stream"].stdout == PROMPTS[1] + sampled.text + "\n"


def test_batch_file_generates_each_line_as_one_batch(cli, gen):
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2].splitlines()[0]]
    outs = gen.generate(prompts, SamplingParams(max_new_tokens=10, seed=1, top_k=0))
    assert cli["batch"].stdout == "".join(p + o.text + "\n---\n" for p, o in zip(prompts, outs))


def test_stop_string_cuts_the_output(cli, stop_string):
    stop, before = stop_string
    assert cli["stop"].stdout == PROMPTS[0] + before + "\n"


def test_timings_go_to_stderr(cli):
    r = cli["timings"]
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("load ")]
    for part in ("ms | prefill", "ms/token over 5 steps", "batch 1", "finish length"):
        assert part in line, line
    assert "prefill" not in r.stdout


def test_cli_reads_prompts_from_stdin(random_art):
    r = run_cli("generate", str(random_art), "--batch-file", "-", "-n", "4", "--greedy", stdin="Hello\nWorld\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n---\n") == 2 and r.stdout.startswith("Hello")


# ---- resolve_model_dir: export once, reuse after ------------------------------------------------------

@pytest.fixture
def exports(monkeypatch, tmp_path):
    """Tiny stands in for distilgpt2; the cache dir is a temp dir; every export_model call is recorded."""
    monkeypatch.setitem(engine.config.SIZES, "distilgpt2", TINY)
    monkeypatch.setenv("GPT2_ENGINE_CACHE", str(tmp_path / "cache"))
    calls = []
    real = export.exporter.export_model

    def counting(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(export.model_cache, "export_model", counting)
    return calls


def test_model_name_is_exported_once_then_reused(exports, tmp_path):
    first = resolve_model_dir("distilgpt2", init="random", show_progress=False)
    assert first == tmp_path / "cache" / "distilgpt2-fp32-random-seed0"
    assert (first / "manifest.json").is_file() and len(exports) == 1
    stamp = (first / "model.onnx").stat().st_mtime_ns
    for name in ("distilgpt2", "distilbert/distilgpt2"):  # the hub id names the same model
        assert resolve_model_dir(name, init="random", show_progress=False) == first
    assert len(exports) == 1, "a cached model was exported again"
    assert (first / "model.onnx").stat().st_mtime_ns == stamp
    # Another seed is another model.
    other = resolve_model_dir("distilgpt2", init="random", seed=1, show_progress=False)
    assert other != first and len(exports) == 2
    with Generator.from_pretrained(first) as g:
        assert g.artifact.is_random and g.config == TINY


def test_cached_export_from_an_older_graph_version_is_redone(exports, tmp_path):
    """An engine upgrade that changes the graph must not keep serving the old cached export."""
    first = resolve_model_dir("distilgpt2", init="random", show_progress=False)
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["graph_version"] == GRAPH_VERSION
    manifest["graph_version"] = GRAPH_VERSION - 1
    (first / "manifest.json").write_text(json.dumps(manifest))
    assert resolve_model_dir("distilgpt2", init="random", show_progress=False) == first
    assert len(exports) == 2, "a stale cached export was reused"
    assert json.loads((first / "manifest.json").read_text())["graph_version"] == GRAPH_VERSION


def test_checkpoint_directory_is_exported_once(exports, tiny_model):
    first = resolve_model_dir(str(tiny_model.ckpt), show_progress=False)
    assert first.name.startswith("ckpt-") and len(exports) == 1
    assert resolve_model_dir(str(tiny_model.ckpt), show_progress=False) == first
    assert len(exports) == 1


def test_model_directory_and_unknown_names(exports, tiny_model):
    assert resolve_model_dir(str(tiny_model.art)) == tiny_model.art
    with pytest.raises(InputError, match="gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2"):
        resolve_model_dir("gpt3")
    assert exports == []


def test_cli_generate_by_name_exports_once(exports, tmp_path):
    runner = CliRunner()
    from cli.main import main
    args = ["generate", "distilgpt2", "--init", "random", "Hello", "-n", "4", "--seed", "0"]
    first = runner.invoke(main, args)
    second = runner.invoke(main, args)
    for r in (first, second):
        assert r.exit_code == 0, r.output
        assert "[distilgpt2 (RANDOM weights, seed 0" in r.stderr
        assert r.stdout.startswith("Hello")
    assert first.stdout == second.stdout
    assert len(exports) == 1
    # one export (hidden beside it: its lock file, export.model_cache.dir_lock)
    assert [n for n in os.listdir(tmp_path / "cache") if not n.startswith(".")] == ["distilgpt2-fp32-random-seed0"]


def test_cli_generate_with_a_draft_model(tiny_model, tmp_path):
    """--draft: the model's int8 export drafts (acceptance reported), the model itself as its own draft
    costs as much as it and is not used; the output is unchanged either way."""
    from export.exporter import export_model
    int8 = export_model(str(tiny_model.ckpt), tmp_path / "int8", precision="int8", show_progress=False)
    args = ("generate", str(tiny_model.art), PROMPTS[0], "-n", "24", "--greedy", "--timings")
    plain = run_cli(*args)
    spec = run_cli(*args, "--draft", str(int8), "--draft-k", "3")
    same = run_cli(*args, "--draft", str(tiny_model.art))
    assert plain.returncode == spec.returncode == same.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout == same.stdout
    assert "draft acceptance" in spec.stderr and "draft unused (no round paid" in same.stderr
    bad = run_cli(*args, "--draft", str(tmp_path / "missing"))
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "missing" in bad.stderr
