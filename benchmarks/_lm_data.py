"""Trained-LM-like inputs for the fused linear + cross-entropy benchmarks (one home for the recipe).

The method of ../shared/reference/gpu-anchors.md: ``logit_ij = prior_j + kappa_i [j == t_i] + noise``, a
Zipf prior (exponent 1.2) over a random frequency ranking riding on ``x[:, 0]`` (``x[:, 0] = c0``,
``W[:, 0] = prior / c0``), an intended token ``t_i`` drawn from the prior with strength ``kappa ~ U(0, 24)``
along its (unit) weight row, N(0, 1) noise in x, and targets drawn from the model's own softmax
(Gumbel-max): a peaked softmax with a loss of about 2.6 nats and a mean max-probability of about 0.67.
"""

from __future__ import annotations

import math

import torch

KAPPA_MAX, SIGMA, ZIPF, C0 = 24.0, 1.0, 1.2, 4.0


def make_lm_inputs(N: int, D: int, V: int, seed: int, *, device="cpu", dtype=torch.bfloat16):
    """``(x (N, D), W (V, D), y (N,))``: x and W in ``dtype`` on ``device``, y int64."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    with torch.no_grad():
        W = torch.randn(V, D, generator=g, device=device) / math.sqrt(D)
        rank = torch.randperm(V, generator=g, device=device).float()
        prior = -ZIPF * torch.log(rank + 10.0)
        W[:, 0] = prior / C0
        intended = torch.multinomial(torch.softmax(prior, 0), N, replacement=True, generator=g)
        direction = W[intended].clone()
        direction[:, 0] = 0
        direction /= direction.norm(dim=1, keepdim=True)
        x = SIGMA * torch.randn(N, D, generator=g, device=device) + (
            torch.rand(N, 1, generator=g, device=device) * KAPPA_MAX) * direction
        x[:, 0] = C0
        del direction, intended, rank, prior
        x, W = x.to(dtype).contiguous(), W.to(dtype).contiguous()
        y = torch.empty(N, dtype=torch.long, device=device)
        rows = max(1, min(N, 2**28 // V))
        for i in range(0, N, rows):
            z = x[i:i + rows].float() @ W.float().t()
            u = torch.rand(z.shape, generator=g, device=device).clamp_(1e-20, 1.0)
            z -= torch.log(-torch.log(u))
            y[i:i + rows] = z.argmax(1)
            del z, u
    return x, W, y
