"""`gpt2-engine --version`, and `--help` as a new user reads it (issue 24, item 3): every command ends
with two or three examples that are valid command lines (each is parsed against the command's options
here), and an alias (`info`) is listed once, as an alias of its command."""

from __future__ import annotations

import shlex
from importlib.metadata import version

import click
import pytest
from click.testing import CliRunner

from cli.main import main

COMMANDS = ["bench", "bench-kernels", "bench-load", "bench-serve", "build", "export", "generate", "inspect", "serve"]


def examples_of(cmd: click.Command) -> list[str]:
    epilog = cmd.epilog or ""
    assert "Examples:" in epilog, f"{cmd.name}: no examples in --help"
    return [line.strip() for line in epilog.split("Examples:", 1)[1].splitlines() if line.strip()]


def test_version():
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"gpt2-engine {version('gpt2-engine')} (onnxruntime {version('onnxruntime')}, Python ")


def test_every_command_is_listed_once_and_the_alias_as_an_alias():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0, r.output
    listed = r.output.split("Commands:", 1)[1].split("\n\n", 1)[0]
    names = [line.split()[0] for line in listed.splitlines() if line.startswith("  ") and not line.startswith("   ")]
    assert names == COMMANDS
    assert "inspect (alias: info)" in listed and listed.count("Print what a model directory holds") == 1


def test_the_alias_runs_its_command(tmp_path):
    r = CliRunner().invoke(main, ["info", str(tmp_path / "nowhere")])
    assert r.exit_code == 1 and "does not exist" in r.output


@pytest.mark.parametrize("name", COMMANDS)
def test_help_ends_with_examples_that_parse(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("Hello\n")   # generate --batch-file opens its file while parsing
    r = CliRunner().invoke(main, [name, "--help"])
    assert r.exit_code == 0, r.output
    assert r.output.rstrip().splitlines()[-1].strip().startswith("gpt2-engine ")   # the examples end the help
    lines = examples_of(main.get_command(click.Context(main), name))
    assert 2 <= len(lines) <= 3, lines
    for line in lines:
        args = shlex.split(line)
        assert args[0] == "gpt2-engine", line
        cmd = main.get_command(click.Context(main), args[1])
        assert cmd is not None, line
        # The examples may show a neighbour (build's shows the export it needs); each parses as its command.
        with cmd.make_context(args[1], args[2:]) as ctx:
            assert ctx.params is not None
    assert any(shlex.split(line)[1] in (name, "info") for line in lines), f"no example of {name} itself"
