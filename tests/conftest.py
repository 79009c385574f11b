"""Test-wide settings. Triton kernels run on CPU through the interpreter here (no GPU)."""

import os

import torch

# Must be set before any Triton kernel is decorated/launched; harmless when a GPU exists.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
