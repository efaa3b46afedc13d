"""Hugging Face causal LMs on softxent's fused linear + cross-entropy, without patching their forward.

A ``...ForCausalLM`` model computes ``logits = lm_head(model.model(...).last_hidden_state)`` -- the
``B x T x V`` tensor that the fused loss avoids -- and only then its loss hook.  So the fused path has
to stop before the head; it does so from the outside, through public module attributes:

* :func:`causal_lm_loss` -- runs the model's body (``model.base_model``, e.g. ``LlamaForCausalLM.model``)
  for the final hidden states, then :func:`softxent.torch.linear_cross_entropy` with the output layer
  (``model.get_output_embeddings()``, the ``lm_head``, tied or not) and ``shift=True``::

      hidden = model.base_model(input_ids, **model_kwargs).last_hidden_state       # (B, T, D)
      loss = linear_cross_entropy(hidden, lm_head.weight, labels, lm_head.bias, shift=True,
                                  reduction='sum', normalizer=num_items_in_batch)  # or 'mean' if None

  which is the model's own ``model(input_ids, labels=labels, num_items_in_batch=...).loss`` (labels
  shifted left by one, ``-100`` ignored, summed and divided by ``num_items_in_batch`` when given, the
  mean over non-ignored tokens otherwise), without the logits.  A pre-shifted ``shift_labels`` ``(B, T)``
  is used as is (no shift).  Gemma-2-style ``config.final_logit_softcapping`` becomes ``softcap``;
  models that rescale their logits otherwise (``logit_scale``, ``logits_scaling``) are refused.
* :class:`CausalLMWithFusedLoss` -- a wrapper module for training loops / ``transformers.Trainer``:
  ``wrapper(input_ids=..., labels=..., num_items_in_batch=...)`` returns a ``CausalLMOutputWithPast``
  whose ``loss`` is :func:`causal_lm_loss` (and ``logits=None``); without labels it calls the model.
* :func:`causal_lm_loss_function` -- a drop-in for transformers' loss hook
  (``model.loss_function = causal_lm_loss_function``, same signature as ``ForCausalLMLoss``).  The
  model still materialises its logits; the hook brings softxent's semantics (float32 math, a batch
  whose labels are all ignored gives 0 instead of NaN).

Tensor parallel: an ``lm_head`` sharded by ``ColwiseParallel`` (its weight a ``Shard(0)`` DTensor) runs
vocabulary-parallel (softxent.torch._vocab_parallel) under :func:`causal_lm_loss` and the wrapper, without
gathering the head (tested on a tiny Llama in a 2-process gloo group).

Needs ``transformers`` (any version with ``PreTrainedModel.base_model`` / ``get_output_embeddings``;
tested with 5.24).
"""

from __future__ import annotations

import torch
from torch import nn

from ._cross_entropy import _cross_entropy
from ._linear_cross_entropy import linear_cross_entropy

__all__ = ["causal_lm_loss", "CausalLMWithFusedLoss", "causal_lm_loss_function"]

_UNSUPPORTED_LOGIT_SCALES = ("logit_scale", "logits_scaling")


def _body_and_head(model):
    body = getattr(model, "base_model", None)
    if body is None or body is model:
        raise TypeError(f"model must be a Hugging Face ...ForCausalLM with a separate body "
                        f"(model.base_model); got {type(model).__name__}")
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Linear):
        raise TypeError(f"model.get_output_embeddings() must be an nn.Linear output layer; got "
                        f"{type(head).__name__}")
    return body, head


def _softcap(config):
    for name in _UNSUPPORTED_LOGIT_SCALES:
        value = getattr(config, name, None)
        if value is not None and value != 1:
            raise ValueError(f"the model rescales its logits (config.{name} = {value}); "
                             "causal_lm_loss does not reproduce that: use the model's own loss")
    cap = getattr(config, "final_logit_softcapping", None)
    return None if cap is None else float(cap)


def causal_lm_loss(model, input_ids=None, labels=None, *, num_items_in_batch=None, shift_labels=None,
                   ignore_index: int = -100, impl: str = "auto", max_chunk_bytes: int | None = None,
                   label_smoothing: float = 0.0, z_loss: float = 0.0, **model_kwargs) -> torch.Tensor:
    """The causal-LM loss of a Hugging Face model, with the logits never materialised.

    Args:
        model: a ``...ForCausalLM`` (``model.base_model`` is its body, ``model.get_output_embeddings()``
            its ``nn.Linear`` head).
        input_ids: ``(B, T)`` token ids (or pass ``inputs_embeds=`` in ``model_kwargs``).
        labels: ``(B, T)`` targets, unshifted (position t's hidden state predicts ``labels[:, t+1]``);
            ``ignore_index`` marks tokens without a loss.
        num_items_in_batch: the number of target tokens in the whole accumulated batch (an int or a
            tensor, transformers' name): the loss is then the sum divided by it, which makes gradient
            accumulation over micro-batches exact.  None: the mean over this batch's targets.
        shift_labels: ``(B, T)`` labels already shifted (used instead of ``labels``, no shift).
        ignore_index, impl, max_chunk_bytes, label_smoothing, z_loss: as in
            :func:`softxent.torch.linear_cross_entropy`.
        **model_kwargs: passed to the body (``attention_mask``, ``position_ids``, ...).

    Returns:
        the loss, a float32 scalar.
    """
    body, head = _body_and_head(model)
    softcap = _softcap(model.config)
    if (labels is None) == (shift_labels is None):
        raise ValueError("pass exactly one of labels (unshifted) and shift_labels (pre-shifted); got "
                         f"labels={'None' if labels is None else 'a tensor'}, shift_labels="
                         f"{'None' if shift_labels is None else 'a tensor'}")
    model_kwargs.pop("use_cache", None)
    out = body(input_ids=input_ids, use_cache=False, **model_kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    target = labels if shift_labels is None else shift_labels
    target = target.to(hidden.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    return linear_cross_entropy(
        hidden, head.weight, target, head.bias, ignore_index=ignore_index, reduction=reduction,
        normalizer=num_items_in_batch, shift=shift_labels is None, softcap=softcap,
        label_smoothing=label_smoothing, z_loss=z_loss, impl=impl, max_chunk_bytes=max_chunk_bytes)


class CausalLMWithFusedLoss(nn.Module):
    """Wrap a ``...ForCausalLM`` so that calling it with labels returns the fused loss.

    ``wrapper(input_ids=..., labels=..., num_items_in_batch=..., **kw)`` returns
    ``transformers.modeling_outputs.CausalLMOutputWithPast(loss=causal_lm_loss(...))`` with no logits;
    without ``labels`` / ``shift_labels`` it returns ``model(input_ids=..., **kw)`` unchanged (for
    evaluation and generation use ``wrapper.model``).  ``loss_options`` (``impl``, ``max_chunk_bytes``,
    ``label_smoothing``, ``z_loss``, ``ignore_index``) go to :func:`causal_lm_loss`.
    """

    def __init__(self, model: nn.Module, **loss_options):
        super().__init__()
        _body_and_head(model)
        _softcap(model.config)
        self.model = model
        self.loss_options = loss_options

    def forward(self, input_ids=None, labels=None, *, num_items_in_batch=None, shift_labels=None,
                **kwargs):
        if labels is None and shift_labels is None:
            return self.model(input_ids=input_ids, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        loss = causal_lm_loss(self.model, input_ids, labels, num_items_in_batch=num_items_in_batch,
                              shift_labels=shift_labels, **self.loss_options, **kwargs)
        return CausalLMOutputWithPast(loss=loss)


def causal_lm_loss_function(logits, labels, vocab_size: int, num_items_in_batch=None,
                            ignore_index: int = -100, shift_labels=None, **kwargs) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` on :func:`softxent.torch.cross_entropy`.

    ``model.loss_function = causal_lm_loss_function`` (the model's loss hook; its forward is untouched).
    Same arguments: ``logits`` ``(B, T, V)``, unshifted ``labels`` ``(B, T)`` (or pre-shifted
    ``shift_labels``), ``num_items_in_batch`` (sum / it) or the mean over non-ignored tokens (0, not
    NaN, when there are none).  Other keyword arguments (what the model forwards) are ignored.
    """
    if logits.shape[-1] != vocab_size:
        raise ValueError(f"logits must have vocab_size = {vocab_size} classes on the last axis; got shape "
                         f"{tuple(logits.shape)}")
    if shift_labels is None:
        # Shift the labels, not the logits (slicing the logits would copy them): the last position
        # gets ignore_index, as in transformers.
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.to(logits.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss, _, _ = _cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction,
                                normalizer=num_items_in_batch)
    return loss
