"""`export`, and the first `generate NAME` that exports into the model cache, show a progress bar over the
layers on a terminal, and nothing when stderr is not one (issue 24, item 4).

A terminal here is a pseudo-terminal (pty) on the child's stderr. A fresh pty reports 0 x 0, as one that
nobody sized does (`script`, editors' and agents' shells): tqdm then printed nothing at all, which is
what a user saw for the 6-24 s of a gpt2 export; the exporter falls back to 80 columns there.

A tiny export takes a fraction of a second, under tqdm's 0.1 s between redraws: the tests redraw on every
update (TQDM_MININTERVAL=0, tqdm's own setting) so that the bar's last frame, n/n layers, is on screen.
"""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import threading

import pytest

import engine.config
from tests.runtime_fixtures import REPO, TINY


def run_on_a_terminal(*args: str, env: dict | None = None, cols: int = 0) -> tuple[int, str, str]:
    """`python -m cli ARGS` with stderr on a pty of `cols` columns (0: unsized): (exit code, stdout, terminal)."""
    master, slave = pty.openpty()
    if cols:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, cols, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "cli", *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=slave, cwd=REPO, env={**os.environ, "PYTHONIOENCODING": "utf-8", "TQDM_MININTERVAL": "0", **(env or {})})
    os.close(slave)
    chunks: list[bytes] = []

    def drain():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:       # EIO: every writer closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    out, _ = proc.communicate(timeout=180)
    reader.join(10)
    os.close(master)
    return proc.returncode, out.decode("utf-8"), b"".join(chunks).decode("utf-8", "replace")


def frames(terminal: str, desc: str) -> list[str]:
    return [f.strip() for f in terminal.replace("\n", "\r").split("\r") if f.strip().startswith(desc)]


@pytest.mark.parametrize("cols", [0, 100], ids=["unsized-terminal", "sized-terminal"])
def test_export_shows_the_layers_on_a_terminal(cols, tiny_model, tmp_path):
    code, out, terminal = run_on_a_terminal("export", str(tiny_model.ckpt), "--out", str(tmp_path / "o"), cols=cols)
    assert code == 0, terminal
    graph = frames(terminal, "graph:")
    assert graph and any(f"{TINY.n_layer}/{TINY.n_layer}" in f and "layer" in f for f in graph), terminal
    assert frames(terminal, "export:"), terminal
    assert out.startswith("exported ") and "layer/s" not in out          # the bar is on stderr only


def test_no_bar_when_stderr_is_not_a_terminal(tiny_model, tmp_path):
    r = subprocess.run([sys.executable, "-m", "cli", "export", str(tiny_model.ckpt), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=REPO, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "layer" not in r.stderr and r.stderr == "", r.stderr


def test_the_first_generate_of_a_name_shows_the_export(tiny_model, tmp_path):
    env = {"GPT2_ENGINE_CACHE": str(tmp_path / "cache")}
    args = ("generate", str(tiny_model.ckpt), "Hello", "-n", "2", "--greedy")
    code, out, terminal = run_on_a_terminal(*args, env=env)
    assert code == 0, terminal
    assert any(f"{TINY.n_layer}/{TINY.n_layer}" in f for f in frames(terminal, "graph:")), terminal
    assert out.startswith("Hello")
    code, _, terminal = run_on_a_terminal(*args, env=env)                 # exported already: no bar
    assert code == 0 and not frames(terminal, "graph:") and not frames(terminal, "export:"), terminal


def test_random_weights_have_a_bar_over_the_layers_too(tmp_path, monkeypatch):
    """Drawing gpt2-xl's random weights takes longer than building its graph: they get their own bar."""
    import functools

    import export.exporter
    from export.exporter import export_model
    monkeypatch.setitem(engine.config.SIZES, "distilgpt2", TINY)
    monkeypatch.setattr(export.exporter, "tqdm", functools.partial(export.exporter.tqdm, mininterval=0))
    master, slave = pty.openpty()
    terminal = os.fdopen(slave, "w", encoding="utf-8")
    monkeypatch.setattr(sys, "stderr", terminal)
    try:
        export_model("distilgpt2", tmp_path / "o", init="random")
        terminal.flush()
        data = os.read(master, 1 << 20).decode("utf-8", "replace")
    finally:
        monkeypatch.undo()
        terminal.close()
        os.close(master)
    assert any(f"{TINY.n_layer}/{TINY.n_layer}" in f for f in frames(data, "weights:")), data
    assert any(f"{TINY.n_layer}/{TINY.n_layer}" in f for f in frames(data, "graph:")), data
