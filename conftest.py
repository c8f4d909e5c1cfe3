"""Test-wide settings for the host's and every plugin's tests.

The tests run tiny tensors, where a second OpenMP thread gains nothing and, on a busy
2-core machine, spin-waits cost 10-100x. One thread here and in every subprocess.
Caches (fitted predictors, searched schedules, reference solves) go to a directory of
the test session, never the user's ~/.cache.
"""

import atexit
import os
import shutil
import tempfile

import torch

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
torch.set_num_threads(1)
os.environ["BENCH_CACHE"] = tempfile.mkdtemp(prefix="bench-test-cache-")
atexit.register(shutil.rmtree, os.environ["BENCH_CACHE"], ignore_errors=True)
