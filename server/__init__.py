"""adapter-server: one frozen base LM, many adapters of every family in shared batches."""

import os

# oneDNN (torch's CPU kernels for bfloat16 products) keeps a compiled kernel, and for some a reordered
# copy of the weight, per new input shape, in two caches of 1,024 entries each: prefill lengths vary
# without end, so resident memory grew by hundreds of MB (see BENCHMARKS, precision). Bounded here,
# before torch is imported; a user's own setting wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
os.environ.setdefault("LRU_CACHE_CAPACITY", "64")

__version__ = "0.1.0"
