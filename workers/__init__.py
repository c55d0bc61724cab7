"""radq workers: Celery app, tasks, decoding, preprocessing, models and inference."""
