"""README.md's code blocks run as written (issue 24, item 2: its Python example had `await` outside a
function). Every block is accounted for, so a new one needs a runner here:

- the Python API block runs unchanged, exec'd in this process, on the tiny config: `SIZES["gpt2"]` is the
  2-layer model while it runs and the model cache is a temporary directory, so its
  `Generator.from_pretrained("gpt2", init="random")` exports and loads in a second instead of 124M;
- the server's Python (openai client) and curl blocks run against a live server of the tiny model served
  as `artifacts/gpt2` (what `gpt2-engine serve artifacts/gpt2` would call it), with the one substitution
  `localhost:8000` -> that server's address;
- the bash blocks' `gpt2-engine ...` lines are parsed against the commands' options (running them takes
  minutes to hours: exports of every size, downloads, benchmarks, TensorRT), `make X` lines must name a
  Makefile target, `pip install` lines are tests/test_install_hints.py's.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess

import click
import pytest

import engine.config
from engine import RandomWeightsWarning
from tests.runtime_fixtures import REPO, TINY, load_generator

README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w+)\n(.*?)^```", README, re.M | re.S)


def python_blocks() -> dict[str, str]:
    """Each Python block by what it is: 'api' or 'openai'; anything else fails the test."""
    out = {}
    for lang, code in BLOCKS:
        if lang != "python":
            continue
        kind = "api" if "from engine import" in code else "openai" if "from openai import" in code else None
        assert kind is not None and kind not in out, f"a README Python block this test does not run:\n{code}"
        out[kind] = code
    return out


def bash_lines() -> list[list[str]]:
    lines = []
    for lang, code in BLOCKS:
        if lang == "bash":
            lines += [shlex.split(line, comments=True) for line in code.splitlines() if line.strip()]
    return [words for words in lines if words]


def test_every_block_is_python_or_bash():
    assert {lang for lang, _ in BLOCKS} == {"python", "bash"}
    assert set(python_blocks()) == {"api", "openai"}


def test_the_python_api_block_runs_as_written(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(engine.config.SIZES, "gpt2", TINY)
    monkeypatch.setenv("GPT2_ENGINE_CACHE", str(tmp_path / "cache"))
    with pytest.warns(RandomWeightsWarning):     # the random weights are labelled at load
        exec(compile(python_blocks()["api"], "README.md (Python API)", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert re.search(r" (length|eos) True ", out), out   # print(out.text, out.finish_reason, out.random_weights, ...)
    assert (tmp_path / "cache" / "gpt2-fp32-random-seed0" / "manifest.json").is_file()


@pytest.fixture(scope="module")
def server(tiny_model):
    pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
    from server import start_in_thread
    gen = load_generator(tiny_model)
    with start_in_thread(gen, model_name="artifacts/gpt2") as srv:
        yield srv
    gen.close()


def test_the_openai_client_block_runs_as_written(server, capsys):
    pytest.importorskip("openai", reason="the [serve] extra (openai client) is not installed")
    code = python_blocks()["openai"]
    assert code.count("http://localhost:8000") == 1
    exec(compile(code.replace("http://localhost:8000", server.url), "README.md (openai)", "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.strip()


def test_the_curl_line_runs_as_written(server):
    (curl,) = [w for w in bash_lines() if w[0] == "curl"]
    address = server.url.removeprefix("http://")
    args = [a.replace("localhost:8000", address) for a in curl]
    assert args != curl  # the one substitution happened
    if shutil.which("curl"):
        out = subprocess.run(args, capture_output=True, text=True, timeout=60, check=True).stdout
    else:
        import httpx
        out = httpx.post(server.url + "/v1/completions", content=args[args.index("-d") + 1], timeout=60).text
    body = json.loads(out)
    assert body["choices"][0]["text"] is not None and body["usage"]["completion_tokens"] >= 1, body


def test_every_command_line_parses(tmp_path, monkeypatch):
    from cli.main import main
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("Hello\n")   # generate --batch-file opens its file while parsing
    targets = set(re.findall(r"^([\w.-]+):", (REPO / "Makefile").read_text(), re.M))
    seen = set()
    for words in bash_lines():
        tool = words[0]
        seen.add(tool)
        if tool == "gpt2-engine":
            cmd = main.get_command(click.Context(main), words[1])
            assert cmd is not None, words
            with cmd.make_context(words[1], words[2:]):
                pass
        elif tool == "make":
            assert set(words[1:]) <= targets, words
        else:
            assert tool in ("pip", "curl"), f"a README command this test does not check: {' '.join(words)}"
    assert {"gpt2-engine", "make", "pip", "curl"} <= seen
