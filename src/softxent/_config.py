"""What this install of softxent runs on: :func:`show_config` (also ``softxent info``)."""

from __future__ import annotations

import importlib.util
import sys

__all__ = ["config", "show_config"]

_EXTRAS = ("sklearn", "torch", "triton", "dask", "typer", "safetensors", "onnx")


def config() -> dict:
    """The kernels in use, the threads, the BLAS libraries and the optional packages found, as a dict."""
    from . import __version__, _kernels
    from ._parallel import available_cores

    info = {
        "softxent": __version__,
        "python": sys.version.split()[0],
        "kernels": _kernels.backend(),
        "kernels_available": list(_kernels.available()),
        "n_jobs_default": available_cores(),
        "blas": [],
        "extras": {name: importlib.util.find_spec(name) is not None for name in _EXTRAS},
    }
    try:
        from threadpoolctl import threadpool_info
    except ImportError:  # pragma: no cover - a dependency; an install without it still runs 1 thread
        pass
    else:
        info["blas"] = [{k: lib.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                        for lib in threadpool_info() if lib.get("user_api") == "blas"]
    return info


def kernels_line(info: dict | None = None) -> str:
    """One line on the row kernels: which run, and why when they are not the compiled ones."""
    info = config() if info is None else info
    if info["kernels"] == "cython":
        return "compiled (softxent._fused, Cython)"
    if "cython" in info["kernels_available"]:
        return "NumPy (chosen; the compiled ones are built)"
    return ("NumPy (softxent._fused is not built: no C compiler when softxent was installed; "
            "reinstall with one for faster fits)")


def show_config(file=None) -> None:
    """Print :func:`config` in a few lines: which row kernels the objective uses (compiled or NumPy), the
    default thread count, the BLAS libraries loaded, the optional packages found."""
    info = config()
    out = sys.stdout if file is None else file
    lines = [f"softxent {info['softxent']} (Python {info['python']})",
             f"row kernels: {kernels_line(info)}",
             f"threads: n_jobs=None uses {info['n_jobs_default']} (the cores this process may use); "
             "BLAS runs at 1 thread inside the pool"]
    for lib in info["blas"]:
        lines.append(f"BLAS: {lib['internal_api']} {lib['version']} ({lib['architecture']}), "
                     f"{lib['num_threads']} threads outside the pool")
    found = [k for k, v in info["extras"].items() if v]
    lines.append("optional packages found: " + (", ".join(found) if found else "none"))
    print("\n".join(lines), file=out)
