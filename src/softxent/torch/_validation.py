"""Argument checks shared by softxent.torch's functions: every message names the argument, the value
received and what was expected (never ``assert``: user input gets a ``ValueError`` / ``TypeError``).

Checks that need the *values* of tensors (class indices inside ``[0, V)``, non-negative weights, a
non-negative normalizer) run on the host in eager mode, all in one device-to-host transfer.  They are
skipped while ``torch.compile`` traces the code and during CUDA-graph capture, where reading a value
would break the graph: there an out-of-range class index is not diagnosed by softxent (PyTorch's own
``gather`` then raises on the CPU and fails a device-side assertion on CUDA).

:func:`first_derivatives_only` decorates the autograd Functions so that a double backward raises
``DOUBLE_BACKWARD_MESSAGE`` instead of returning a silently wrong second derivative.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch

from ..loss import PROBA_IGNORE_INDEX_MESSAGE, REDUCTIONS
from ._row_terms import Z_LOSS_WEIGHTINGS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LOW_PRECISION = (torch.float16, torch.bfloat16)
IMPLS = ("auto", "chunked", "triton", "torch")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_options(reduction, label_smoothing, z_loss, softcap) -> None:
    """The loss options, with the reference's rules and messages (softxent.loss._check_options)."""
    if isinstance(label_smoothing, torch.Tensor) or isinstance(z_loss, torch.Tensor) or isinstance(
            softcap, torch.Tensor):
        raise TypeError("label_smoothing, z_loss and softcap must be Python numbers, not tensors; got "
                        f"{type(label_smoothing).__name__}, {type(z_loss).__name__}, "
                        f"{type(softcap).__name__}")
    if isinstance(label_smoothing, bool) or isinstance(z_loss, bool) or isinstance(softcap, bool):
        raise TypeError("label_smoothing, z_loss and softcap must be numbers, not bools; got "
                        f"{label_smoothing!r}, {z_loss!r}, {softcap!r}")
    # Plain Python (no NumPy) so that torch.compile traces it without a graph break.
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if not (isinstance(label_smoothing, numbers.Real) and 0.0 <= float(label_smoothing) <= 1.0):
        raise ValueError(f"label_smoothing must be a number in [0, 1]; got {label_smoothing!r}")
    if not (isinstance(z_loss, numbers.Real) and math.isfinite(float(z_loss)) and float(z_loss) >= 0.0):
        raise ValueError(f"z_loss must be a finite number >= 0; got {z_loss!r}")
    if softcap is not None and not (isinstance(softcap, numbers.Real) and math.isfinite(float(softcap))
                                    and float(softcap) > 0.0):
        raise ValueError(f"softcap must be None or a finite number > 0; got {softcap!r}")


def check_z_loss_weighting(z_loss_weighting) -> None:
    if z_loss_weighting not in Z_LOSS_WEIGHTINGS:
        raise ValueError(f"z_loss_weighting must be one of {Z_LOSS_WEIGHTINGS} (the z-loss term weighted "
                         f"like the target row, or by tokens as PaLM / Liger); got {z_loss_weighting!r}")


def check_ignore_index(ignore_index) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int; got {ignore_index!r}")
    return int(ignore_index)


def is_dtensor(t) -> bool:
    """Whether ``t`` is a torch.distributed DTensor (False on a torch build without torch.distributed)."""
    try:
        from torch.distributed.tensor import DTensor
    except (ImportError, RuntimeError):  # a torch build without torch.distributed
        return False
    return isinstance(t, DTensor)


def check_not_dtensor(t, name: str) -> None:
    """A torch.distributed DTensor (FSDP2 / tensor-parallel shard) is refused with the remedy."""
    if is_dtensor(t):
        raise ValueError(
            f"{name} is a torch.distributed DTensor (placements {tuple(t.placements)}, global shape "
            f"{tuple(t.shape)}); softxent.torch needs a full local tensor. Gather it first "
            f"({name}.full_tensor(), or FSDP's unshard/summon_full_params), or keep that module's "
            "weight unsharded (e.g. fully_shard(..., reshard_after_forward=False) on the output layer)"
        )


def check_float_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    check_not_dtensor(t, name)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64); "
                        f"got dtype {t.dtype}")
    return t


def check_target(target, lead: tuple, num_classes: int, ignore_index: int, name: str = "target",
                 classes: str = "V") -> bool:
    """A fused loss's target: integer class indices of shape ``lead``, or probabilities (floating) of
    shape ``lead + (V,)`` -- then ``ignore_index`` must be negative (PyTorch's rule).  Returns whether
    it holds probabilities.  ``classes`` names the probabilities' last axis in the messages."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices or probabilities; got "
                        f"{type(target).__name__}")
    check_not_dtensor(target, name)
    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"{name} must hold integer class indices (int64, int32, ...) of shape {lead} or "
                        f"class probabilities (floating) of shape {lead + (num_classes,)}; got dtype "
                        f"{target.dtype}")
    proba = target.is_floating_point()
    if proba and tuple(target.shape) != lead + (num_classes,):
        raise TypeError(f"{name} must hold integer class indices of shape x.shape[:-1] = {lead}, or class "
                        f"probabilities (floating) of shape x.shape[:-1] + ({classes},) = "
                        f"{lead + (num_classes,)}; "
                        f"got dtype {target.dtype} and shape {tuple(target.shape)}")
    if not proba and tuple(target.shape) != lead:
        raise ValueError(f"{name} must have shape x.shape[:-1] = {lead} (class indices) or {lead} + (V,) "
                         f"(probabilities); got shape {tuple(target.shape)}")
    if proba and ignore_index >= 0:
        raise ValueError(PROBA_IGNORE_INDEX_MESSAGE.format(ignore_index=ignore_index))
    return proba


def check_index_target(target, name: str = "target") -> torch.Tensor:
    """An integer class-index target (of any shape: the vocabulary-parallel path checks shapes itself)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer class indices; got "
                        f"{type(target).__name__}")
    check_not_dtensor(target, name)
    if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
        raise TypeError(f"{name} must hold integer class indices (int64, int32, ...); got dtype "
                        f"{target.dtype}")
    return target


def check_same_device(named: dict) -> None:
    """Every non-None tensor of ``named`` on the device of the first one."""
    items = [(k, v) for k, v in named.items() if isinstance(v, torch.Tensor)]
    ref_name, ref = items[0]
    for k, v in items[1:]:
        if v.device != ref.device:
            raise ValueError(f"{k} is on device {v.device} but {ref_name} is on {ref.device}; "
                             "move them to the same device")


def autocast_and_check_dtypes(x, weight, bias):
    """``(x, weight, bias)`` cast to the autocast dtype inside ``torch.autocast`` (as ``F.linear`` would),
    then required to share one dtype."""
    if torch.is_autocast_enabled(x.device.type):
        ac = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(ac), weight.to(ac)
        bias = None if bias is None else bias.to(ac)
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"x, weight and bias must share one dtype; got x {x.dtype}, weight {weight.dtype}"
                        f"{'' if bias is None else f', bias {bias.dtype}'} (cast them, or run under "
                        "torch.autocast)")
    return x, weight, bias


def check_weights_tensor(w, shape: tuple, name: str, device) -> torch.Tensor | None:
    """A per-row or per-class weight tensor: real, of ``shape``, not requiring grad."""
    if w is None:
        return None
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape} or None; got "
                        f"{type(w).__name__}")
    check_not_dtensor(w, name)
    if w.dtype == torch.bool or w.is_complex():
        raise TypeError(f"{name} must be a real floating (or integer) tensor; got dtype {w.dtype}")
    if tuple(w.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got shape {tuple(w.shape)}")
    if w.device != device:
        raise ValueError(f"{name} is on device {w.device} but the inputs are on {device}")
    if w.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} requires grad, but softxent.torch treats weights as constants and "
                         f"returns no gradient for them; pass {name}.detach()")
    return w


def check_normalizer(normalizer, reduction: str, device) -> torch.Tensor | None:
    """``normalizer`` (a number or a 0-d / 1-element tensor, with ``reduction='sum'`` only) as a
    0-d float32 tensor on ``device``; a tensor's value is checked later with the host checks."""
    if normalizer is None:
        return None
    if reduction != "sum":
        raise ValueError(f"normalizer divides the summed loss, so it needs reduction='sum'; got "
                         f"reduction={reduction!r} with normalizer={normalizer!r}")
    if isinstance(normalizer, torch.Tensor):
        check_not_dtensor(normalizer, "normalizer")
        if normalizer.numel() != 1 or normalizer.dtype == torch.bool or normalizer.is_complex():
            raise ValueError(f"normalizer must be a number or a one-element real tensor; got a tensor "
                             f"of shape {tuple(normalizer.shape)} and dtype {normalizer.dtype}")
        return normalizer.detach().reshape(()).to(device=device, dtype=torch.float32)
    if isinstance(normalizer, bool) or not isinstance(normalizer, numbers.Real):
        raise TypeError(f"normalizer must be a number or a one-element tensor; got {normalizer!r}")
    if not (math.isfinite(float(normalizer)) and float(normalizer) >= 0):
        raise ValueError(f"normalizer must be finite and >= 0 (a token count); got {normalizer!r}")
    return torch.tensor(float(normalizer), dtype=torch.float32, device=device)


def check_max_chunk_bytes(max_chunk_bytes) -> None:
    if max_chunk_bytes is None:
        return
    if isinstance(max_chunk_bytes, bool) or not isinstance(max_chunk_bytes, numbers.Integral) or \
            int(max_chunk_bytes) <= 0:
        raise ValueError(f"max_chunk_bytes must be None or an int > 0 (bytes); got {max_chunk_bytes!r}")


def check_impl(impl) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")


def check_skip_threshold(skip_threshold, impl: str) -> None:
    if skip_threshold is None:
        return
    is_auto = isinstance(skip_threshold, str) and skip_threshold == "auto"
    is_number = (isinstance(skip_threshold, numbers.Real) and not isinstance(skip_threshold, bool)
                 and 0.0 < float(skip_threshold) < 1.0)
    if not (is_auto or is_number):
        raise ValueError(f"skip_threshold must be None, 'auto' or a number in (0, 1); got {skip_threshold!r}")
    if impl not in ("triton", "auto"):
        raise ValueError(f"skip_threshold (the Triton backward's block skip) needs impl='triton' or "
                         f"'auto'; got impl={impl!r}")


def host_checks_enabled() -> bool:
    """False while torch.compile traces or a CUDA graph is being captured (no host reads there)."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling():
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    return True


def check_values(*, target=None, num_classes=None, ignore_index=-100, weights=(), normalizer=None,
                 target_name="target") -> None:
    """Value checks (one host transfer): class indices in ``[0, V)`` or ``ignore_index``; each of
    ``weights`` (pairs ``(name, tensor)``) finite and >= 0; ``normalizer`` finite and >= 0."""
    if not host_checks_enabled():
        return
    flags, names = [], []
    if target is not None and target.numel():
        bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
        flags.append(bad.any())
        names.append("target")
    for name, w in weights:
        if w is not None and w.numel():
            if w.is_floating_point():  # O(1) memory: amin / amax propagate NaN
                lo, hi = torch.aminmax(w.reshape(-1))
                flags.append(~((lo >= 0) & torch.isfinite(hi)))
            else:
                flags.append((w < 0).any())
            names.append(name)
    if normalizer is not None:
        flags.append(~((normalizer >= 0) & torch.isfinite(normalizer)))
        names.append("normalizer")
    if not flags:
        return
    failed = torch.stack([f.reshape(()) for f in flags]).tolist()
    for name, bad in zip(names, failed):
        if not bad:
            continue
        if name == "target":
            mask = (target != ignore_index) & ((target < 0) | (target >= num_classes))
            value = int(target[mask].reshape(-1)[0])
            raise ValueError(f"{target_name} holds class index {value}, outside [0, {num_classes}) for "
                             f"V={num_classes} classes (and not ignore_index={ignore_index})")
        if name == "normalizer":
            raise ValueError(f"normalizer must be finite and >= 0 (a token count); got "
                             f"{float(normalizer)!r}")
        w = dict(weights)[name]
        wf = w.double()
        vals = wf[~((wf >= 0) & torch.isfinite(wf))].reshape(-1)[:3].tolist()
        raise ValueError(f"{name} must be finite and >= 0; got values such as {vals}")


DOUBLE_BACKWARD_MESSAGE = (
    "softxent.torch computes first derivatives only: a gradient of its cross-entropy taken with "
    "create_graph=True cannot be differentiated again (double backward). For second derivatives use "
    "torch.nn.functional.cross_entropy on materialised logits")


class _RefuseDifferentiation(torch.autograd.Function):
    """``grad`` unchanged, tied to ``anchors`` (the inputs that required grad) by a node whose backward
    raises, so that differentiating ``grad`` with respect to any of them fails loudly."""

    @staticmethod
    def forward(ctx, grad, *anchors):
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)


def first_derivatives_only(cls):
    """Class decorator for softxent's autograd Functions, in place of ``once_differentiable``.

    Like it, the backward runs under ``no_grad``.  ``once_differentiable`` refuses a double backward only
    when the incoming gradient itself requires grad; with ``loss.backward(create_graph=True)`` it does
    not, the returned gradients come back as constants, and a second derivative (a gradient penalty on
    ``x @ W.T`` through W) is silently wrong.  Here, whenever grad mode is on in the backward (that is,
    ``create_graph=True``), each returned gradient is tied to the Function's differentiable inputs by a
    node that raises ``DOUBLE_BACKWARD_MESSAGE``.  The forward only records which inputs those are."""
    forward, backward = cls.forward, cls.backward

    @functools.wraps(forward)
    def recording_forward(ctx, *args):
        ctx.differentiable_inputs = tuple(a for a in args if isinstance(a, torch.Tensor) and a.requires_grad)
        return forward(ctx, *args)

    @functools.wraps(backward)
    def guarded_backward(ctx, *grad_outputs):
        with torch.no_grad():
            grads = backward(ctx, *grad_outputs)
        if not torch.is_grad_enabled():
            return grads
        anchors = ctx.differentiable_inputs
        return tuple(_RefuseDifferentiation.apply(g, *anchors) if isinstance(g, torch.Tensor) else g
                     for g in grads)

    cls.forward = staticmethod(recording_forward)
    cls.backward = staticmethod(guarded_backward)
    return cls
