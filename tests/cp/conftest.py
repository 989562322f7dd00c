import os
import sys
import warnings

# tests import the spawn helper as `from _dist import run_ranks`
sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", message="Triton is not supported on current platform")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; excluded from the default run (-m 'not slow')")
