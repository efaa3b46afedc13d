"""``torch.nn.Module`` wrappers of softxent.torch's functions (options fixed at construction)."""

from __future__ import annotations

import torch
from torch import nn

from ._cross_entropy import cross_entropy
from ._linear_cross_entropy import linear_cross_entropy

__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss"]


class _CrossEntropyOptions(nn.Module):
    """The options both loss modules take, kept as attributes and shown by ``repr``."""

    def __init__(self, *, ignore_index: int, label_smoothing: float, reduction: str, z_loss: float,
                 softcap: float | None, z_loss_weighting: str = "class"):
        super().__init__()
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.reduction = reduction
        self.z_loss = z_loss
        self.softcap = softcap
        self.z_loss_weighting = z_loss_weighting

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"reduction={self.reduction!r}, z_loss={self.z_loss}, softcap={self.softcap}"
                + ("" if self.z_loss_weighting == "class" else f", z_loss_weighting={self.z_loss_weighting!r}"))


class CrossEntropyLoss(_CrossEntropyOptions):
    """:func:`softxent.torch.cross_entropy` as a module: ``loss = module(logits, target)``.

    ``weight`` (class weights ``(K,)``) is kept as a buffer, so it moves with ``.to(device)``.
    """

    def __init__(self, weight: torch.Tensor | None = None, *, ignore_index: int = -100,
                 label_smoothing: float = 0.0, reduction: str = "mean", z_loss: float = 0.0,
                 softcap: float | None = None, z_loss_weighting: str = "class"):
        super().__init__(ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction,
                         z_loss=z_loss, softcap=softcap, z_loss_weighting=z_loss_weighting)
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, sample_weight=None) -> torch.Tensor:
        return cross_entropy(logits, target, weight=self.weight, sample_weight=sample_weight,
                             ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
                             reduction=self.reduction, z_loss=self.z_loss, softcap=self.softcap,
                             z_loss_weighting=self.z_loss_weighting)


class LinearCrossEntropyLoss(_CrossEntropyOptions):
    """:func:`softxent.torch.linear_cross_entropy` as a module: ``loss = module(x, weight, target)``.

    The module holds the options, not the output layer: pass the layer's ``weight`` (and ``bias``) at
    each call, e.g. ``loss_fn(hidden, model.lm_head.weight, labels)``.  ``class_weight`` ``(V,)`` is a
    buffer.  Per-call ``sample_weight`` and ``normalizer`` (e.g. the token count of the whole
    accumulated batch, with ``reduction='sum'``) are forward arguments.

    >>> import torch
    >>> loss_fn = LinearCrossEntropyLoss(shift=True)
    >>> h = torch.randn(2, 6, 16); W = torch.randn(50, 16, requires_grad=True)
    >>> loss = loss_fn(h, W, torch.randint(0, 50, (2, 6)))
    >>> loss.backward(); W.grad.shape
    torch.Size([50, 16])
    """

    def __init__(self, *, ignore_index: int = -100, label_smoothing: float = 0.0,
                 reduction: str = "mean", class_weight: torch.Tensor | None = None, z_loss: float = 0.0,
                 softcap: float | None = None, shift: bool | int = False, impl: str = "auto",
                 max_chunk_bytes: int | None = None, skip_threshold: float | str | None = None,
                 z_loss_weighting: str = "class", process_group=None):
        super().__init__(ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction,
                         z_loss=z_loss, softcap=softcap, z_loss_weighting=z_loss_weighting)
        self.register_buffer("class_weight", class_weight)
        self.process_group = process_group  # vocabulary-parallel weight shards (tensor parallel)
        self.shift = shift
        self.impl = impl
        self.max_chunk_bytes = max_chunk_bytes
        self.skip_threshold = skip_threshold

    def forward(self, x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: torch.Tensor | None = None, *, sample_weight=None, normalizer=None,
                return_lse: bool = False, return_z_loss: bool = False, return_accuracy: bool = False):
        """``target``: class indices or probabilities; the ``return_*`` flags as in
        :func:`softxent.torch.linear_cross_entropy`."""
        return linear_cross_entropy(
            x, weight, target, bias, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, reduction=self.reduction,
            sample_weight=sample_weight, class_weight=self.class_weight, z_loss=self.z_loss,
            softcap=self.softcap, normalizer=normalizer, shift=self.shift, return_lse=return_lse,
            impl=self.impl, max_chunk_bytes=self.max_chunk_bytes, skip_threshold=self.skip_threshold,
            z_loss_weighting=self.z_loss_weighting, return_z_loss=return_z_loss, return_accuracy=return_accuracy,
            process_group=self.process_group)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shift={self.shift}, impl={self.impl!r}"
