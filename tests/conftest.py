"""Set before anything imports triton: without CUDA, Triton kernels run in its interpreter (the segmented
adapter kernels' tests; server/kernels/segments.py)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
