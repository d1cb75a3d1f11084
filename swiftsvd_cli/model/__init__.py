"""Models: architecture adapters, loading, layer-by-layer execution, low-rank modules and compressed checkpoints."""
