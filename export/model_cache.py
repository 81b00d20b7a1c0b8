"""Named models on first use: `gpt2-engine generate gpt2 ...` exports the name once into a cache
directory (~/.cache/gpt2-engine, or $GPT2_ENGINE_CACHE) and reuses it after that.

It lives on the export side because it exports; the runtime only ever loads a directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from engine.artifact import MANIFEST, is_current_export
from engine.config import canonical_size_name
from engine.errors import InputError
from export.checkpoint import is_repo_id
from export.exporter import export_model


def default_cache_dir() -> Path:
    return Path(os.environ.get("GPT2_ENGINE_CACHE", Path.home() / ".cache" / "gpt2-engine"))


@contextlib.contextmanager
def dir_lock(path: Path, waiting: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (a file `.NAME.lock` beside it) across processes, while it is made.

    Two runs that prepare the same directory at once (two `gpt2-engine bench`, two first `generate NAME`)
    took turns deleting each other's files; with the lock the second waits, then finds the directory made
    and reuses it. An flock: the kernel releases it when its process dies, so a killed run blocks nobody.
    `waiting(message)` is told once when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as f:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): unlocked, as before
            yield
            return
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            (waiting or (lambda m: print(m, file=sys.stderr)))(
                f"waiting for another gpt2-engine process that is preparing {path}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cache_key(model: str, precision: str = "fp32", init: str | None = None, seed: int = 0) -> str | None:
    """The cache entry `model` is exported into; None for a model directory (used as it is). InputError for
    what is none of the kinds `resolve_model_dir` takes. Decided from names and paths only (no weights, no
    network), so `serve` checks MODEL with it before it binds its port.

    `artifacts/gpt2` reads as a repo id too: a name whose first part is a local directory is taken for a path."""
    p = Path(model).expanduser()
    if (p / MANIFEST).is_file():
        return None
    size = canonical_size_name(model)
    if p.is_dir() and size is None:  # a checkpoint directory: export it next to the cache, keyed by path
        if not (p / "config.json").is_file():
            raise InputError(f"{model} is not a gpt2-engine model directory (no {MANIFEST}) nor a checkpoint directory "
                             "(no config.json): pass one made by `gpt2-engine export`, a Hugging Face checkpoint "
                             "directory, or a model name")
        return f"ckpt-{hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:12]}-{precision}"
    if size is not None:
        return f"{size}-{precision}" + (f"-random-seed{seed}" if init == "random" else "")
    if init == "random":
        raise InputError(f"random weights need a size name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2), "
                         f"got {model!r}")
    if is_repo_id(model) and not Path(model.split("/")[0]).expanduser().is_dir():
        return f"hub-{model.casefold().replace('/', '--')}-{precision}"
    raise InputError(f"{model!r} is neither a model directory, a checkpoint directory, a known model name "
                     "(gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2), nor a Hugging Face repo id of a GPT-2 model (owner/name)")


def resolve_model_dir(model: str, precision: str = "fp32", init: str | None = None, seed: int = 0,
                      cache_dir: Path | None = None, show_progress: bool = True) -> Path:
    """A model directory for `model`: itself if it is one, else export it once into the cache dir.

    `model`: a model directory; a checkpoint directory; a size name (gpt2 .. gpt2-xl, distilgpt2, their hub
    ids, any case), real weights or init='random'; or a Hugging Face repo id of a GPT-2 model (fine-tunes such
    as sshleifer/tiny-gpt2), from the local hub cache or downloaded. Each is exported once, keyed by what it is
    (a repo id in lower case: the hub's ids are case-insensitive)."""
    key = cache_key(model, precision, init, seed)
    if key is None:
        return Path(model).expanduser()
    target = (cache_dir or default_cache_dir()) / key
    if is_current_export(target):
        return target
    with dir_lock(target):  # another process may be exporting the same model: wait, then reuse its export
        if not is_current_export(target):  # absent, partial, or made by an older exporter: export again
            export_model(model, target, precision=precision, init=init, seed=seed, force=True,
                         show_progress=show_progress)
    return target
