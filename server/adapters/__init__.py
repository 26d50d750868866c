"""Adapters: parsing checkpoints, the tiered registry, and the per-row methods applied in the forward pass."""
