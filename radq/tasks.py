"""Celery task names: the contract between the API (producer) and workers (consumers).

The API publishes by name so it never imports worker code.
"""

INFER_CHUNK = "radq.infer_chunk"
"""Args: ``job_id: str``, ``instance_ids: list[int]``. Runs every model of the job."""

NOTIFY_JOB = "radq.notify_job"
"""Args: ``job_id: str``. POSTs the job's summary to its webhook URL, with retries."""
