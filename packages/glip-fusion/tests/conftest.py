"""glip-fusion test configuration.

Without a GPU the Triton kernels run in Triton's CPU interpreter. The variable must be set before the kernels are
defined (``@triton.jit`` reads it at decoration time); ``pytest_configure`` runs before any test module is collected
or imported, so the setting does not depend on which tests are selected or in which order they are collected.
"""
import os


def pytest_configure(config):
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
