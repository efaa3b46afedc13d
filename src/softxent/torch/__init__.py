"""softxent in PyTorch: the cross-entropy as an autograd Function, and the fused linear + cross-entropy
for LLM vocabularies that never holds the ``N x V`` logits.

* :func:`cross_entropy` -- softxent.loss.cross_entropy's options and semantics (classes on the last axis,
  index or probability targets, ``sample_weight``, ``z_loss``, ``softcap``; a mean over nothing is 0),
  float32 math for low-precision logits, any ``grad_output``.
* :func:`linear_cross_entropy` -- ``cross_entropy(x @ W.T + b, target)`` without materialising the
  logits: ``impl='chunked'`` (pure PyTorch, bounded memory, any device), ``'triton'`` (CUDA kernels),
  ``'torch'`` (the materialising reference), ``'auto'``; index or probability targets; ``shift`` for
  causal LMs and ``normalizer`` for exact gradient accumulation; a differentiable ``return_lse``,
  ``return_z_loss`` and ``return_accuracy`` (a :class:`LinearCrossEntropyOutput`); ``process_group=`` (or a
  ``Shard(0)`` DTensor weight) for an output layer split by vocabulary rows across a tensor-parallel group
  (:func:`vocab_parallel_linear_cross_entropy`).
* :class:`CrossEntropyLoss`, :class:`LinearCrossEntropyLoss` -- the same as modules.
* ``softxent.torch.hf`` -- Hugging Face causal LMs on the fused loss without patching their forward
  (imported on use; needs ``transformers``).

Every path is tested against the float64 NumPy reference softxent.loss.
"""

try:
    import torch as _torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError("softxent.torch needs PyTorch: pip install 'softxent[torch]'") from exc

from ._chunked import DEFAULT_MAX_CHUNK_BYTES
from ._cross_entropy import cross_entropy
from ._linear_cross_entropy import LinearCrossEntropyOutput, linear_cross_entropy, triton_available
from ._vocab_parallel import vocab_parallel_linear_cross_entropy
from .modules import CrossEntropyLoss, LinearCrossEntropyLoss

__all__ = [
    "cross_entropy",
    "linear_cross_entropy",
    "LinearCrossEntropyOutput",
    "vocab_parallel_linear_cross_entropy",
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "triton_available",
    "DEFAULT_MAX_CHUNK_BYTES",
]
