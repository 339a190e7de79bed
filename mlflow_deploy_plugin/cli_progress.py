"""What every long-running `mlflow-deploy` report command shares: its progress lines on stderr."""

from __future__ import annotations

import time
from collections.abc import Callable

import click


def progress_printer() -> Callable[[str], None]:
    """A ``progress(message)`` that prints ``[  12.3s] message`` on stderr, timed from now, so a
    report that takes a while shows where it is without mixing into its result on stdout."""
    started = time.monotonic()

    def progress(message: str) -> None:
        click.echo(f"[{time.monotonic() - started:6.1f}s] {message}", err=True)

    return progress
