"""Throughput benchmark of radq: model alone, full pipeline, naive loop (``python -m bench``)."""
