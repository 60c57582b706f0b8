"""glip-fusion test configuration.

Without a GPU the Triton kernels run in Triton's CPU interpreter. The variable must be set before the kernels are
defined (``@triton.jit`` reads it at decoration time), i.e. before ``glip_fusion.triton``'s kernel modules are
imported, which happens lazily on the first call. pytest loads this file before collecting the tests of this folder.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
