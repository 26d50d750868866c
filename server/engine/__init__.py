"""The engine: one thread owns the model, the KV cache and the adapter slots."""
