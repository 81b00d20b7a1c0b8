"""Named models on first use: `gpt2-engine generate gpt2 ...` exports the name once into a cache
directory (~/.cache/gpt2-engine, or $GPT2_ENGINE_CACHE) and reuses it after that.

It lives on the export side because it exports; the runtime only ever loads a directory.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from engine.artifact import is_current_export
from engine.config import canonical_size_name
from engine.errors import InputError
from export.exporter import export_model


def default_cache_dir() -> Path:
    return Path(os.environ.get("GPT2_ENGINE_CACHE", Path.home() / ".cache" / "gpt2-engine"))


def resolve_model_dir(model: str, precision: str = "fp32", init: str | None = None, seed: int = 0,
                      cache_dir: Path | None = None, show_progress: bool = True) -> Path:
    """A model directory for `model`: itself if it is one, else export it once into the cache dir."""
    p = Path(model).expanduser()
    if (p / "manifest.json").is_file():
        return p
    size = canonical_size_name(model)
    if p.is_dir() and size is None:  # a checkpoint directory: export it next to the cache, keyed by path
        key = f"ckpt-{hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:12]}-{precision}"
    elif size is not None:
        key = f"{size}-{precision}" + (f"-random-seed{seed}" if init == "random" else "")
    else:
        raise InputError(f"{model!r} is neither a model directory, a checkpoint directory, nor a known model name "
                         "(gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2)")
    target = (cache_dir or default_cache_dir()) / key
    if not is_current_export(target):  # absent, partial, or made by an older exporter: export again
        export_model(model, target, precision=precision, init=init, seed=seed, force=True,
                     show_progress=show_progress)
    return target
