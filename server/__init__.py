"""adapter-server: one frozen base LM, many bottleneck and (IA)3 adapters in shared batches."""

__version__ = "0.1.0"
