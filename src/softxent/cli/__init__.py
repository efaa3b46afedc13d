"""The ``softxent`` command line (typer + rich, the ``cli`` extra).

The CLI sits on top of the stack: it uses the estimator and the loss, nothing below imports it.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``softxent`` console script."""
    try:
        from .app import app
    except ImportError as exc:  # the cli extra is missing
        print(f"softxent: the command line needs the 'cli' extra ({exc.name} is missing): "
              "pip install 'softxent[cli]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while the imports run, before the commands handle it
        print("softxent: error: interrupted", file=sys.stderr)
        return 130
    try:
        return app(args=argv, prog_name="softxent", standalone_mode=True) or 0
    except KeyboardInterrupt:  # between typer's parsing and a command's own handler
        print("softxent: error: interrupted", file=sys.stderr)
        return 130


__all__ = ["main"]
