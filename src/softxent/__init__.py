"""softxent: the softmax cross-entropy loss and the models built on it, at every scale.

The core (this package without extras) needs only NumPy and SciPy.  ``softxent.torch``, the Triton kernels
and the Dask back-end are loaded only when imported.
"""

from .gradcheck import check_seed_derivation, gradcheck
from .loss import (
    cross_entropy,
    cross_entropy_with_grad,
    log_softmax,
    logsumexp,
    softmax,
    softmax_jvp,
)

__version__ = "0.1.0"


def __getattr__(name):
    # The estimator needs scikit-learn (the 'sklearn' extra); load it only when it is asked for.
    if name == "SoftmaxRegression":
        from .estimator import SoftmaxRegression

        return SoftmaxRegression
    if name == "LinearSoftmaxObjective":
        from .objective import LinearSoftmaxObjective

        return LinearSoftmaxObjective
    raise AttributeError(f"module 'softxent' has no attribute {name!r}")


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
    "__version__",
]
