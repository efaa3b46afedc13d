"""A fixed set of draws of the randomized option search (tests/fuzz_linear_ce.py): every impl of
linear_cross_entropy on random combinations of shape and options, against the float64 reference and
within 10x the plain-PyTorch impl's own error.  Seed 201799 is the V = 1 softcap 'none' case the search
found (the chunked path's forward and backward chunked the logits differently)."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # --import-mode=importlib: tests/ is not on it
import fuzz_linear_ce as fuzz  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.mark.parametrize("seeds", [range(0, 20), range(20, 40), [201799]], ids=["0-19", "20-39", "201799"])
def test_option_search_draws(seeds):
    reports = [line for seed in seeds for line in fuzz.check_seed(seed)]
    assert not reports, "\n".join(reports)
