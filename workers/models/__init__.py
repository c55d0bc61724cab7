"""Model architectures, loading from local model directories, and the per-process cache."""
