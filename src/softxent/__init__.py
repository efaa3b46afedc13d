"""softxent: the softmax cross-entropy loss and the models built on it, at every scale.

The core (this package without extras) needs only NumPy and SciPy.  ``softxent.torch``, the Triton kernels
and the Dask back-end are loaded only when imported.

Importing ``softxent`` itself imports nothing (not even NumPy): the names below are loaded on first use.
The ``softxent`` console script imports this package before its ``main`` can handle Ctrl-C, so whatever
this file imports is a window in which Ctrl-C prints a KeyboardInterrupt traceback (issue 18).
"""

import sys as _sys

__version__ = "0.1.0"

# name -> the submodule that defines it
_LAZY = {
    "logsumexp": "loss",
    "softmax": "loss",
    "log_softmax": "loss",
    "softmax_jvp": "loss",
    "cross_entropy": "loss",
    "cross_entropy_with_grad": "loss",
    "gradcheck": "gradcheck",
    "check_seed_derivation": "gradcheck",
    "SoftmaxRegression": "estimator",  # needs scikit-learn (the 'sklearn' extra)
    "LinearSoftmaxObjective": "objective",
    "show_config": "_config",
}
_SUBMODULES = ("loss", "gradcheck", "objective", "solvers", "estimator")


def __getattr__(name):
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'softxent' has no attribute {name!r}")


_Module = type(_sys)  # types.ModuleType, without importing types (not yet loaded at start-up)


class _Package(_Module):
    def __setattr__(self, name, value):
        # The import system binds a loaded submodule as an attribute of its package.  The function
        # softxent.gradcheck shares its submodule's name; the function keeps the name, as it did when this
        # file imported it eagerly (``import softxent.gradcheck`` must not turn it into a module).
        if name == "gradcheck" and isinstance(value, _Module):
            value = value.gradcheck
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "logsumexp",
    "softmax",
    "log_softmax",
    "softmax_jvp",
    "cross_entropy",
    "cross_entropy_with_grad",
    "gradcheck",
    "check_seed_derivation",
    "SoftmaxRegression",
    "LinearSoftmaxObjective",
    "show_config",
    "__version__",
]
