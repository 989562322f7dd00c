import os
import sys
import warnings

# tests import the spawn helper as `from _dist import run_ranks`
sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", message="Triton is not supported on current platform")

# the suite's process-wide Triton patches (fla_cp applies none; spawned ranks: _dist.run_ranks)
from _interpret import enable_test_patches  # noqa: E402

enable_test_patches()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; excluded from the default run (-m 'not slow')")
