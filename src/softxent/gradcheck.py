"""Central finite differences against an analytic gradient, and the seed's derivation checked with them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["gradcheck", "check_seed_derivation", "SeedCheck"]


def gradcheck(f, x, grad=None, *, h: float = 1e-3, n_checks: int | None = None,
              random_state=None) -> float:
    """Max relative error between an analytic gradient and 4th-order central finite differences.

    The finite difference of coordinate ``j`` is, in float64::

        fd_j = (-f(x + 2h e_j) + 8 f(x + h e_j) - 8 f(x - h e_j) + f(x - 2h e_j)) / (12 h)

    whose truncation error is ``O(h**4)``, so ``h = 1e-3`` leaves about 1e-12 of truncation and 1e-13
    of rounding for a smooth ``f`` of moderate size.  The returned error is norm-wise::

        max_j |g_j - fd_j| / max(max_j |fd_j|, max_j |g_j|, tiny)

    which, unlike an element-wise ratio, does not blow up on coordinates whose gradient is ~0.

    Args:
        f: callable taking an array shaped like ``x``; returns the scalar value, or ``(value, gradient)``
            when ``grad`` is None.
        x: the point (any shape; cast to float64).
        grad: optional callable returning the analytic gradient at ``x``.
        h: the finite-difference step.
        n_checks: check only this many coordinates, drawn at random (all if None).
        random_state: seed or ``np.random.Generator`` for that draw.

    Returns:
        the max relative error (a float); below ~1e-7 means the gradient is right.
    """
    x = np.array(x, dtype=np.float64)
    if not h > 0:
        raise ValueError(f"h must be > 0; got {h!r}")
    if grad is None:
        def value(v):
            return float(f(v)[0])
        g = np.asarray(f(x.copy())[1], dtype=np.float64)
    else:
        def value(v):
            return float(f(v))
        g = np.asarray(grad(x.copy()), dtype=np.float64)
    if g.shape != x.shape:
        raise ValueError(f"the analytic gradient must have the shape of x {x.shape}; got {g.shape}")
    coords = np.arange(x.size)
    if n_checks is not None and n_checks < x.size:
        coords = np.random.default_rng(random_state).choice(x.size, size=n_checks, replace=False)
    fd = np.empty(coords.size)
    flat = x.reshape(-1)
    for n, j in enumerate(coords):
        x0 = flat[j]
        vals = []
        for step in (2 * h, h, -h, -2 * h):
            flat[j] = x0 + step
            vals.append(value(x))
        flat[j] = x0
        fd[n] = (-vals[0] + 8 * vals[1] - 8 * vals[2] + vals[3]) / (12 * h)
    ga = g.reshape(-1)[coords]
    scale = max(np.max(np.abs(fd), initial=0.0), np.max(np.abs(ga), initial=0.0), 1e-300)
    return float(np.max(np.abs(ga - fd), initial=0.0) / scale)


@dataclass
class SeedCheck:
    """One line of the seed check: which derivative, its formula, and the errors measured."""

    name: str
    formula: str
    fd_error: float          # vs central finite differences
    closed_form_error: float  # vs the seed's closed form computed directly (NaN where not applicable)


def check_seed_derivation(n: int = 8, d: int = 5, k: int = 4, seed: int | None = 0) -> list[SeedCheck]:
    """Verify the seed's derivation on random data with :func:`softxent.loss.cross_entropy_with_grad`.

    For ``z = X Theta^T + b``, ``h = softmax(z)`` and ``E = -(1/N) sum_i y_i . log h(x_i)``::

        delta = dE/dz = (h - y) / N,   dE/dTheta = delta^T X,   dE/db = sum_i delta_i,   dE/dX = delta Theta

    Each derivative is compared with finite differences of ``E`` and with the closed form.
    """
    from .loss import cross_entropy, cross_entropy_with_grad, softmax

    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    theta = rng.standard_normal((k, d))
    b = rng.standard_normal(k)
    y = rng.integers(0, k, n)
    Y = np.eye(k)[y]

    def E(X_, theta_, b_):
        return cross_entropy(X_ @ theta_.T + b_, y)

    z = X @ theta.T + b
    _, delta = cross_entropy_with_grad(z, y)
    seed_delta = (softmax(z) - Y) / n
    grads = {
        "dE/dz": (delta, lambda v: cross_entropy(v, y), z, seed_delta, "delta = (h(x) - y) / N"),
        "dE/dTheta": (delta.T @ X, lambda v: E(X, v, b), theta, seed_delta.T @ X, "delta^T X"),
        "dE/db": (delta.sum(0), lambda v: E(X, theta, v), b, seed_delta.sum(0), "sum_i delta_i"),
        "dE/dX": (delta @ theta, lambda v: E(v, theta, b), X, seed_delta @ theta, "delta Theta"),
    }
    out = []
    for name, (g, fn, at, closed, formula) in grads.items():
        fd_err = gradcheck(fn, at, lambda _v, g=g: g)
        cf_err = float(np.max(np.abs(g - closed)) / max(np.max(np.abs(closed)), 1e-300))
        out.append(SeedCheck(name, formula, fd_err, cf_err))
    return out
