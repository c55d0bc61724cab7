"""SQLAlchemy 2 ORM models."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from db.status import InstanceStatus, JobStatus, SourceStatus


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


def table_of(model: type[Base]) -> Table:
    """The Core table behind a model, for statements built once and cached: building an
    ORM-enabled statement per call costs more CPU than SQLite takes to run a small one."""
    return cast(Table, model.__table__)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    models: Mapped[list[str]] = mapped_column(JSON)
    options: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # e.g. {"explain_threshold": 0.5}
    priority: Mapped[str] = mapped_column(String(8), default="normal", server_default="normal")
    webhook_url: Mapped[str | None] = mapped_column(Text)
    # The Celery queue its messages go to; recovery re-publishes there (null: RADQ_QUEUE).
    queue: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Instance(Base):
    """One submitted file. Metadata columns fill in when a worker reads the header."""

    __tablename__ = "instances"
    __table_args__ = (
        Index("ix_instances_job_status", "job_id", "status"),
        Index("ix_instances_study", "study_instance_uid"),
        Index("ix_instances_sop", "sop_instance_uid"),
        Index("ix_instances_status_updated", "status", "updated_at"),
        # The blob retention sweep looks uploads up by hash (db/retention.py).
        Index("ix_instances_storage_location", "storage", "location"),
        Index("ix_instances_patient", "patient_pseudonym"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    file_name: Mapped[str] = mapped_column(Text)
    storage: Mapped[str] = mapped_column(String(8))
    location: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int | None] = mapped_column(Integer)
    content_sha256: Mapped[str | None] = mapped_column(String(64))  # of the file's bytes
    status: Mapped[str] = mapped_column(String(16), default=InstanceStatus.PENDING)
    reason: Mapped[str | None] = mapped_column(Text)  # why it failed or was skipped
    notes: Mapped[str | None] = mapped_column(Text)  # tolerated deviations of a readable file
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Leases that ran out while this file was processing (its worker died or hung).
    lost_leases: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The Celery node name of the worker that last claimed it (which host did the work).
    worker: Mapped[str | None] = mapped_column(String(200))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    series_description: Mapped[str | None] = mapped_column(Text)
    # HMAC-SHA256 of PatientID (radq.pseudonyms); no patient name, birth date or ID is stored.
    patient_pseudonym: Mapped[str | None] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class Result(Base):
    """One model's output for one instance. Unique per (instance, model, version)."""

    __tablename__ = "results"
    __table_args__ = (
        UniqueConstraint("instance_id", "model", "model_version", name="uq_results_instance_model"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    radq_version: Mapped[str] = mapped_column(String(32))
    preprocessing: Mapped[str] = mapped_column(Text)
    # Arithmetic of the forward pass: fp32, bf16 or fp16 (autocast); None on rows written
    # before radq recorded it.
    precision: Mapped[str | None] = mapped_column(String(8))
    outputs: Mapped[dict[str, Any]] = mapped_column(JSON)
    saliency: Mapped[dict[str, str] | None] = mapped_column(JSON)  # label -> PNG sha256 in the blob store
    reused_from: Mapped[int | None] = mapped_column(Integer)  # result id copied on deduplication
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JobSource(Base):
    """A path a job was submitted with, enumerated and registered in the background.

    ``files_seen`` counts the files of the (deterministic) walk already registered, so
    an enumeration interrupted by an API restart resumes where it stopped.
    """

    __tablename__ = "job_sources"
    __table_args__ = (Index("ix_job_sources_status_lease", "status", "lease_expires_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=SourceStatus.REGISTERING)
    files_seen: Mapped[int] = mapped_column(Integer, default=0)
    registered: Mapped[int] = mapped_column(Integer, default=0)  # instances (an archive adds many)
    error: Mapped[str | None] = mapped_column(Text)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WebhookDelivery(Base):
    """One attempt to tell a job's webhook that the job ended."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    delivered: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiToken(Base):
    """A bearer token of the API. Only its SHA-256 is kept; ``prefix`` is shown to tell tokens apart."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(8))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[str] = mapped_column(String(8))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AuditEvent(Base):
    """Who (a token's name) did what: submitted, read results, cancelled, retried."""

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_at", "at"),
        Index("ix_audit_events_study", "study_instance_uid"),
        Index("ix_audit_events_job", "job_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    actor: Mapped[str] = mapped_column(String(64))  # the token's name; "anonymous" with RADQ_AUTH=false
    action: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[str | None] = mapped_column(String(36))  # no foreign key: the trail outlives jobs
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)
