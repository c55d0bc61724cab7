"""Status values, stored as strings."""

from __future__ import annotations

from enum import StrEnum


class InstanceStatus(StrEnum):
    PENDING = "pending"  # recorded, no message published yet
    QUEUED = "queued"  # a message carrying it is in the broker
    PROCESSING = "processing"  # claimed by a worker (holds a lease)
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"  # nothing to infer (no image, no model applies)


FINAL_STATUSES = (InstanceStatus.DONE, InstanceStatus.FAILED, InstanceStatus.SKIPPED)
WAITING_STATUSES = (InstanceStatus.PENDING, InstanceStatus.QUEUED)


class JobStatus(StrEnum):
    REGISTERING = "registering"  # a path submission is still being enumerated
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"


OPEN_JOB_STATUSES = (JobStatus.REGISTERING, JobStatus.QUEUED, JobStatus.RUNNING)


class SourceStatus(StrEnum):
    """Where the background enumeration of one submitted path stands."""

    REGISTERING = "registering"
    DONE = "done"
    FAILED = "failed"  # the walk itself failed (the path vanished, a permission error)
    CANCELLED = "cancelled"  # the job was cancelled while it was being enumerated


class StorageKind(StrEnum):
    BLOB = "blob"  # uploaded; ``location`` is the sha256 in the blob store
    PATH = "path"  # submitted by path; ``location`` is the resolved absolute path
    # Uploaded, and deleted from the blob store by the retention sweep once its jobs had
    # finished (RADQ_BLOB_RETENTION_DAYS); ``location`` is still the sha256.
    DELETED = "deleted"


class Priority(StrEnum):
    URGENT = "urgent"
    NORMAL = "normal"
    BULK = "bulk"


MESSAGE_PRIORITY = {Priority.URGENT: 0, Priority.NORMAL: 3, Priority.BULK: 9}
"""Celery message priority per job priority. On Redis, kombu keeps one list per step
(0, 3, 6, 9) and a worker's BRPOP takes from the lowest step first."""


class Scope(StrEnum):
    """What an API token may do; each scope includes the ones before it."""

    READ = "read"  # read jobs, instances, results, studies
    SUBMIT = "submit"  # read, and submit, cancel, retry, STOW-RS
    ADMIN = "admin"  # everything, the audit trail included

    def allows(self, needed: Scope) -> bool:
        """Whether a token of this scope may do what ``needed`` guards."""
        order = list(Scope)
        return order.index(self) >= order.index(needed)
