"""HTTP layer: thin FastAPI routes over the generation service and the registry. Never imports torch."""
