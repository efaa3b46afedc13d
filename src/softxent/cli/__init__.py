"""The ``softxent`` command line (typer + rich, the ``cli`` extra).

The CLI sits on top of the stack: it uses the estimator and the loss, nothing below imports it.

This file, like ``softxent/__init__.py``, imports nothing heavy: the console script imports it before
``main`` runs, and a Ctrl-C during an import outside ``main``'s ``try`` would print a traceback.  What is
left outside is Python's own start-up (a few milliseconds, while the interpreter and ``site`` load).
"""

import sys

EXIT_INTERRUPTED = 130  # the shell's status for a process ended by SIGINT (128 + 2)


def _interrupted() -> int:
    print("softxent: error: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED


def main(argv=None) -> int:
    """Entry point of the ``softxent`` console script."""
    try:
        from .app import app
    except ImportError as exc:  # the cli extra is missing
        print(f"softxent: the command line needs the 'cli' extra ({exc.name} is missing): "
              "pip install 'softxent[cli]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while the imports run, before the commands handle it
        return _interrupted()
    try:
        return app(args=argv, prog_name="softxent", standalone_mode=True) or 0
    except KeyboardInterrupt:  # between typer's parsing and a command's own handler
        return _interrupted()
    except SystemExit as exc:
        # typer turns a KeyboardInterrupt outside the commands' handlers into a silent exit 130 (raised
        # ``from`` the interrupt); the commands report their own interrupts and raise without a cause
        cause = getattr(exc.__context__, "__cause__", None)
        if exc.code == EXIT_INTERRUPTED and isinstance(cause, KeyboardInterrupt):
            return _interrupted()
        raise


__all__ = ["main"]
