"""Shared pytest setup: every test starts from the same seeds, and the repo root is importable.

How the tests import: the top-level modules (model, cof, sft, ...) through the one sys.path entry below; the
helper modules next to the tests (procs, cof_fixtures, model_fixtures) because pytest's default "prepend" import
mode puts tests/ (a folder without __init__.py) on sys.path. Scripts the tests start as processes get the repo root
through PYTHONPATH (procs.run_script). No test module imports another test module."""
import os
import random
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
