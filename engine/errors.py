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
