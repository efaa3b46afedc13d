"""softxent.torch.linear_cross_entropy against PyTorch's own F.linear_cross_entropy on every sample of the
installed torch's OpInfo ``nn.functional.linear_cross_entropy`` (all variants) that the two APIs share:
a 2-D linear weight (PyTorch's K-dimensional weights have no counterpart here), in float64, loss and
every gradient (input, weight, bias, probability target) to 1e-12.  A future torch that changes its
samples or its semantics shows up here; a torch without that OpInfo skips, saying so."""

from __future__ import annotations

import sys
import types
import unittest

import pytest

torch = pytest.importorskip("torch")

from softxent.torch import linear_cross_entropy  # noqa: E402

TOL = 1e-12

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _stub_expecttest() -> None:
    """PyTorch's test package imports ``expecttest`` (a test-only dependency, absent from softxent's extras)
    for its TestCase base class only; the samples do not need it, so a stand-in serves when it is missing."""
    try:
        import expecttest  # noqa: F401
    except ImportError:
        stub = types.ModuleType("expecttest")
        stub.TestCase = unittest.TestCase
        sys.modules["expecttest"] = stub


def _opinfos():
    try:
        _stub_expecttest()
        from torch.testing._internal.common_methods_invocations import op_db
    except Exception as exc:  # noqa: BLE001 -- any failure of PyTorch's private test package means "absent"
        return None, f"torch {torch.__version__}: torch.testing._internal does not import ({exc!r})"
    ops = [op for op in op_db if op.name == "nn.functional.linear_cross_entropy"]
    if not ops or not hasattr(torch.nn.functional, "linear_cross_entropy"):
        return None, f"torch {torch.__version__} has no nn.functional.linear_cross_entropy OpInfo"
    return ops, ""


@pytest.fixture(scope="module")
def opinfos():
    """The OpInfos, imported when a test runs (PyTorch's test package takes seconds to import, which
    collection alone should not pay)."""
    ops, why = _opinfos()
    if ops is None:
        # only a torch without the built-in (before 2.13) may skip; with it, a missing or broken OpInfo is the
        # torch change this test exists to show
        if hasattr(torch.nn.functional, "linear_cross_entropy"):
            pytest.fail(why)
        pytest.skip(why)
    return ops


def _shared(sample) -> bool:
    """Samples both APIs take: a (V, D) weight (PyTorch's K-dimensional weights have no softxent form)."""
    return sample.args[0].dim() == 2


def _ours_kwargs(kwargs: dict) -> dict:
    ignore_index = kwargs.get("ignore_index")
    return dict(bias=kwargs.get("linear_bias"), class_weight=kwargs.get("weight"),
                reduction=kwargs.get("reduction", "mean"), label_smoothing=kwargs.get("label_smoothing", 0.0),
                ignore_index=-100 if ignore_index is None else ignore_index)


def _loss_and_grads(fn, x, w, target, kwargs, bias_key):
    leaves = {"input": x, "weight": w, "target": target, "bias": kwargs.get(bias_key)}
    leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()
              if isinstance(v, torch.Tensor) and v.is_floating_point()}
    kw = dict(kwargs)
    if kw.get(bias_key) is not None:
        kw[bias_key] = leaves["bias"]
    loss = fn(leaves["input"], leaves["weight"], leaves.get("target", target), **kw)
    grads = torch.autograd.grad(loss, list(leaves.values()), torch.ones_like(loss), allow_unused=True)
    return loss.detach(), dict(zip(leaves, grads))


def _rel(a, b) -> float:
    scale = max(float(b.abs().max()) if b.numel() else 0.0, 1e-300)
    return float((a - b).abs().max()) / scale if b.numel() else 0.0


# PyTorch's chunked variant falls back to its reference path for probability targets, and says so
@pytest.mark.filterwarnings(r"ignore:linear_cross_entropy. ``options`` ignored:UserWarning")
@pytest.mark.parametrize("impl", ["chunked", "torch"])
def test_matches_pytorch_linear_cross_entropy_on_its_opinfo_samples(opinfos, impl):
    seen, kinds, failures = 0, set(), []
    for op in opinfos:
        for sample in op.sample_inputs("cpu", torch.float64, requires_grad=True):
            if not _shared(sample):
                continue
            w, target = sample.args
            want_loss, want = _loss_and_grads(torch.nn.functional.linear_cross_entropy, sample.input, w,
                                              target, sample.kwargs, "linear_bias")
            ours_kw = dict(_ours_kwargs(sample.kwargs), impl=impl)
            if impl == "chunked":
                ours_kw["max_chunk_bytes"] = 2 * w.shape[0] * 8 * 4    # two rows per chunk
            got_loss, got = _loss_and_grads(linear_cross_entropy, sample.input, w, target, ours_kw, "bias")
            errs = {"loss": _rel(got_loss, want_loss)}
            errs.update({k: _rel(got[k], want[k]) for k in want if want[k] is not None})
            if max(errs.values()) > TOL or got_loss.shape != want_loss.shape:
                failures.append((op.variant_test_name, tuple(sample.input.shape), tuple(w.shape),
                                 tuple(target.shape), {k: v for k, v in sample.kwargs.items() if k != "options"},
                                 errs))
            seen += 1
            kinds.add((target.is_floating_point(), sample.kwargs.get("reduction", "mean")))
    assert seen >= 50 and len(kinds) == 6, (seen, kinds)   # both target kinds, every reduction
    assert not failures, failures[:5]
    print(f"{impl}: {seen} shared samples agree with F.linear_cross_entropy to {TOL}")
