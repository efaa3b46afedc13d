"""Test-suite settings shared by every test module."""

import os
import shutil

# Triton kernels run on the CPU through Triton's interpreter where there is no GPU.  The variable must be
# set before any kernel is decorated, i.e. before softxent.torch's Triton module is imported.
if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture(scope="module")
def torch_one_thread():
    """PyTorch on one thread for a module of tiny shapes: OpenMP hand-offs (slow on shared, loaded cores)
    would cost more than the arithmetic.  Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "softxent", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
    )
    settings.load_profile("softxent")
except ImportError:  # hypothesis is in the test extra; a bare install can still run the plain tests
    pass


def pytest_addoption(parser):
    parser.addoption("--fuzz", action="store_true", default=False,
                     help="run the fuzz suites at full size (thousands of cases) instead of CI's fixed-seed few "
                          "hundred")


@pytest.fixture(scope="session")
def fuzz_scale(request) -> int:
    """How many cases a fuzz test draws: 1 in the suite (fixed seeds, a few hundred cases in all), about 20
    with ``pytest --fuzz`` (thousands)."""
    return 20 if request.config.getoption("--fuzz") else 1


@pytest.fixture(autouse=True)
def _no_debris_in_the_checkout():
    """Tests write only under tmp_path: a test that leaves a new entry in the working folder's ``runs/``
    (the command line's default output folder) fails."""
    from pathlib import Path

    runs = Path.cwd() / "runs"
    before = set(os.listdir(runs)) if runs.is_dir() else set()
    yield
    after = set(os.listdir(runs)) if runs.is_dir() else set()
    assert after <= before, f"the test left {sorted(after - before)} in {runs}"
