"""The optional libraries a bench command needs, checked before any work: a missing one is one line
on stderr and a non-zero exit up front, never a traceback or a failure after minutes of timing.

find_spec only asks whether a module can be found (importing torch would cost seconds).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

from engine.errors import BackendUnavailable, install_hint

INSTALL = install_hint("bench")
# What `gpt2-engine bench` needs whatever its options: (import names, what for).
ALWAYS = ((("matplotlib",), "plots"),
          (("transformers", "torch"), "the HF reference every runner is validated against"))
CT2_PEERS = ("ct2", "ct2-int8")


def importable(name: str) -> bool:
    """Whether ``import name`` can find the module (a module blocked in sys.modules counts as missing)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a finder that refuses it, or sys.modules[name] is None / has no spec
        return False


def missing_for_bench(peers: Sequence[str]) -> list[tuple[tuple[str, ...], str]]:
    """(missing import names, what for) for a bench run with these peers; [] when all are there."""
    needs = list(ALWAYS)
    if any(p in CT2_PEERS for p in peers):
        needs.append((("ctranslate2",), "the CTranslate2 peers"))
    out = []
    for names, why in needs:
        absent = tuple(n for n in names if not importable(n))
        if absent:
            out.append((absent, why))
    return out


def check_bench(peers: Sequence[str]) -> None:
    """Raise BackendUnavailable (one line through cli.errors.friendly_errors) naming what is missing."""
    missing = missing_for_bench(peers)
    if not missing:
        return
    what = ", ".join(f"{' and '.join(names)} ({why})" for names, why in missing)
    only_ct2 = all("ctranslate2" in names for names, _ in missing)
    hint = " (or leave the CTranslate2 peers out: --peer hf, or --no-peers)" if only_ct2 else ""
    raise BackendUnavailable(f"gpt2-engine bench needs {what}: {INSTALL}{hint}")
