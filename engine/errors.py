"""User-facing errors: each message says what is wrong and how to fix it. The CLI prints them
on one line and exits non-zero; library callers can catch `EngineError`."""


class EngineError(Exception):
    """Base class of every error gpt2-engine raises on purpose."""


class ArtifactError(EngineError):
    """A model directory is missing, corrupt, or of another format version."""


class CheckpointError(EngineError):
    """A checkpoint cannot be found or does not match the GPT-2 architecture."""


class InputError(EngineError, ValueError):
    """A prompt or parameter is out of range."""


class BackendUnavailable(EngineError):
    """A backend's libraries or hardware are missing."""


class EngineOverloaded(EngineError):
    """Too many requests are waiting for a slot: retry later (a server answers 429 or 503)."""


class EngineClosed(EngineError):
    """The engine was closed while the request waited or ran, or before it was submitted."""


class RandomWeightsWarning(UserWarning):
    """A model with random weights was loaded (`export --init random`): its text is not language. Warned once
    per model and process; outputs carry `random_weights=True`."""


# gpt2-engine is installed from its checkout (the package is not published): an extra is `pip install -e
# '.[extra]'` run there. The extras that pull torch get the CPU build first, as the Makefile installs it (a
# torch resolved by the extra alone is the multi-GB CUDA build: a 6 GB venv instead of 2 GB).
# tests/test_install_hints.py checks these against the Makefile and pyproject.toml.
CPU_TORCH = "torch==2.13.0"
TORCH_EXTRAS = ("bench", "test")
MAKE_EXTRAS = ("test", "bench", "hub", "serve", "ray")   # what `make .venv/.installed` installs


def install_hint(*extras: str) -> str:
    """The command that installs these extras from the checkout, for an error message's fix."""
    cmd = f"pip install -e '.[{','.join(extras)}]'"
    if any(e in TORCH_EXTRAS for e in extras):
        cmd = f"pip install {CPU_TORCH} && {cmd}"
    hint = f"`{cmd}` in the gpt2-engine checkout"
    if all(e in MAKE_EXTRAS for e in extras):
        hint += " (or `make .venv/.installed` there: a .venv with every extra)"
    return hint
