"""One decorator shared by every click command: anticipated errors become one line, exit code 1."""

from __future__ import annotations

import functools
import sys

import click

from engine.errors import EngineError


def friendly_errors(fn):
    """Turn EngineErrors into one-line messages with a non-zero exit code (no traceback)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EngineError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
    return wrapper
