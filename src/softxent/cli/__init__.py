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
    return app(args=argv, prog_name="softxent", standalone_mode=True) or 0


__all__ = ["main"]
