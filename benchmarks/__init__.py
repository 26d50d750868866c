"""In-process benchmarks of the engine (`make bench`, `make bench-gpu`, `python -m benchmarks.<name>`):
bench (adapter overhead, mixed batches, cold start, throughput), gpu (decode on CUDA), precision (CPU
dtypes and quantization), sampling (structured output and penalties). Not shipped in the `server` wheel;
run from the repository root. They drive engine internals directly, so tests/benchmarks runs each once
on the tiny test model.
"""
