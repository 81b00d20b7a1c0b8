"""Every install hint is a command that works from a checkout (issue 24, item 1).

gpt2-engine is not published, so `pip install 'gpt2-engine[bench]'` resolves nothing (and where it does,
an editable install, it pulls the CUDA build of torch: a 6 GB venv). A hint is `pip install -e '.[extra]'`
run in the checkout, with the CPU torch first for the extras that pull torch, as the Makefile installs
them (engine.errors.install_hint); or the make target. Checked over the sources, docs and examples, and
on the messages the commands print.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine.errors import CPU_TORCH, MAKE_EXTRAS, TORCH_EXTRAS, install_hint

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", ".git", "docs/bench", "artifacts", "bench-results", "gpt2_engine.egg-info"}
EDITABLE = re.compile(r"pip install -e '\.\[([a-z,]+)\]'")


def text_files() -> list[Path]:
    out = []
    for p in REPO.rglob("*"):
        rel = p.relative_to(REPO).as_posix()
        if any(rel == d or rel.startswith(d + "/") for d in SKIP_DIRS) or not p.is_file():
            continue
        if p.suffix in (".py", ".md", ".yaml", ".toml", ".sh") or p.name == "Makefile":
            if p.name != Path(__file__).name:
                out.append(p)
    return out


def extras_declared() -> set[str]:
    """The keys of pyproject.toml's [project.optional-dependencies] (read by hand: tomllib is 3.11+)."""
    text = (REPO / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]\n", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([a-z0-9_-]+) = \[", section, re.M))


def test_no_hint_names_the_unpublished_package():
    bad = [f"{p.relative_to(REPO)}:{i}" for p in text_files()
           for i, line in enumerate(p.read_text().splitlines(), 1) if "gpt2-engine[" in line]
    assert bad == [], "pip install 'gpt2-engine[...]' resolves nothing: use engine.errors.install_hint"


def test_every_editable_hint_names_real_extras_and_torch_extras_get_the_cpu_torch_first():
    declared = extras_declared()
    seen = 0
    for p in text_files():
        lines = p.read_text().splitlines()
        for i, line in enumerate(lines):
            for m in EDITABLE.finditer(line):
                seen += 1
                extras = set(m.group(1).split(","))
                where = f"{p.relative_to(REPO)}:{i + 1}"
                assert extras <= declared, f"{where}: no such extra {extras - declared}"
                if extras & set(TORCH_EXTRAS):
                    before = line[:m.start()] + (lines[i - 1] if i else "")
                    assert f"pip install -q {CPU_TORCH}" in before or f"pip install {CPU_TORCH}" in before, \
                        f"{where}: the CPU torch must come first ({CPU_TORCH}), or pip fetches the CUDA build"
    assert seen >= 4  # README, docs/serving.md, docs/scaling.md, the Makefile


def test_the_hint_matches_what_the_makefile_installs():
    make = (REPO / "Makefile").read_text()
    assert f"pip install -q {CPU_TORCH}\n" in make
    assert f"pip install -q -e '.[{','.join(MAKE_EXTRAS)}]'" in make
    assert set(TORCH_EXTRAS) <= extras_declared()


def test_install_hint():
    assert install_hint("bench") == (f"`pip install {CPU_TORCH} && pip install -e '.[bench]'` in the gpt2-engine "
                                     "checkout (or `make .venv/.installed` there: a .venv with every extra)")
    assert install_hint("serve", "ray").startswith("`pip install -e '.[serve,ray]'` in the gpt2-engine checkout")
    assert "make" not in install_hint("trt")  # the Makefile does not install the GPU extras


@pytest.mark.parametrize("message", ["bench", "trt"])
def test_the_commands_messages_use_it(message, monkeypatch):
    from engine.errors import BackendUnavailable
    if message == "bench":
        from benchmarks import extras
        monkeypatch.setattr(extras, "importable", lambda name: False)
        with pytest.raises(BackendUnavailable) as e:
            extras.check_bench(())
        assert install_hint("bench") in str(e.value)
    else:
        import sys

        from engine.backends.trt_plan import import_tensorrt
        monkeypatch.setitem(sys.modules, "tensorrt", None)
        with pytest.raises(BackendUnavailable) as e:
            import_tensorrt()
        assert install_hint("trt") in str(e.value)
