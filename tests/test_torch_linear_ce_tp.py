"""The vocabulary-parallel (tensor-parallel) fused loss on real gloo process groups of 2 and 3 processes
bound to 127.0.0.1: every option (index and probability targets, return_z_loss, return_accuracy,
z_loss_weighting, the lse's gradient), float32 and float64, the chunked and the Triton path (the kernels
under TRITON_INTERPRET=1 without a GPU), against the unsharded float64 reference, the communication
volume, bfloat16's single rounding of dx, edge cases, bad inputs raising on every rank, and DTensor
placements.  The checks run in spawned ranks (tests/_vocab_parallel_worker.py), bundled into two groups
because spawning is slow."""

from __future__ import annotations

import json
import os
import socket
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):
    if sys.platform.startswith("linux"):  # every Linux build of torch has gloo: its absence is a broken install
        raise RuntimeError("torch.distributed with gloo is not available in this torch build")
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

HERE = os.path.dirname(__file__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(suite: str, world: int, tmp_path) -> list[dict]:
    import torch.multiprocessing as mp

    sys.path.insert(0, HERE)
    try:
        import _vocab_parallel_worker as worker
    finally:
        sys.path.remove(HERE)
    seed = int(np.random.default_rng().integers(2**31))  # fresh inputs each run; the seed is in the error
    for attempt in (1, 2):
        try:
            mp.spawn(worker.run_rank, args=(world, _free_port(), str(tmp_path), suite, seed), nprocs=world,
                     join=True)
            break
        except mp.ProcessExitedException as exc:
            # A rank killed by a signal (gloo's SIGABRT seen once in ~70 runs on a loaded 2-core machine, cause
            # not yet found) is retried once with the SAME seed: a wrong result is an exception in a rank, not
            # a signal, and still fails at once; a second crash fails too.
            if exc.signal_name is None or attempt == 2:
                raise AssertionError(f"suite {suite!r} with seed {seed} failed:\n{exc}") from None
        except Exception as exc:
            raise AssertionError(f"suite {suite!r} with seed {seed} failed:\n{exc}") from None
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def test_two_ranks_every_option_against_reference(tmp_path):
    results = _spawn("options", 2, tmp_path)
    # 7 option sets x 4 reductions x 2 dtypes, probability targets, issue 17's options, the Triton path,
    # ~7 checks a case: the suite ran in full on both
    assert all(r["checks"] >= 700 for r in results), [r["checks"] for r in results]
    assert results[0]["checks"] == results[1]["checks"]
    try:
        import transformers  # noqa: F401
    except ImportError:
        return
    assert all(r["hf"] for r in results)  # the ColwiseParallel Llama ran


def test_three_ranks_uneven_vocabulary_edges_bad_inputs_and_dtensor(tmp_path):
    results = _spawn("edges", 3, tmp_path)
    assert all(r["checks"] >= 200 for r in results), [r["checks"] for r in results]
    assert len({r["checks"] for r in results}) == 1
