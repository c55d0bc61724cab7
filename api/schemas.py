"""Response and request bodies of the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from db.status import Priority


class Counts(BaseModel):
    total: int
    pending: int
    queued: int
    processing: int
    done: int
    failed: int
    skipped: int


class StudyRef(BaseModel):
    study_instance_uid: str
    instances: int
    done: int = 0
    failed: int = 0
    skipped: int = 0


class JobOut(BaseModel):
    id: str
    status: str = Field(description="registering, queued, running, done or cancelled")
    created_at: datetime
    finished_at: datetime | None
    models: list[str]
    options: dict[str, Any]
    priority: str
    queue: str | None = Field(
        description="The Celery queue the job's messages go to (README: Queue routing); null: RADQ_QUEUE"
    )
    webhook_url: str | None
    counts: Counts
    progress: Progress
    studies: list[StudyRef]
    registration: RegistrationOut | None = Field(
        None, description="Background enumeration of a path submission; null for uploads"
    )


class RegistrationOut(BaseModel):
    status: str = Field(description="registering, done, failed or cancelled")
    files_seen: int = Field(description="Files found and recorded so far")
    registered: int = Field(description="Instances recorded (an archive found on a path adds several)")
    rate_per_s: float | None = Field(description="Files recorded per second")
    errors: list[str] = Field(description="Why a path's enumeration stopped or found nothing")
    started_at: datetime
    finished_at: datetime | None


class SubmitOptions(BaseModel):
    """What a submission may ask for besides its files (JSON keys or multipart fields)."""

    models: list[str] = Field(
        default_factory=list, description="Model names, or 'auto'; empty means the defaults"
    )
    explain_threshold: float | None = Field(
        None, ge=0, le=1, description="Grad-CAM maps for every label scoring at least this"
    )
    priority: Priority | None = Field(
        None, description="urgent, normal or bulk; default bulk for path submissions, normal for uploads"
    )
    force: bool | None = Field(
        None, description="true: infer again instances already processed; default: RADQ_DEDUP decides"
    )
    webhook_url: str | None = Field(
        None, pattern=r"^https?://\S+$", max_length=2000, description="POSTed the job summary when it ends"
    )

    def job_options(self, *, dedup_by_default: bool) -> dict[str, Any]:
        """What the worker reads from the job: whether to deduplicate, Grad-CAM threshold."""
        options: dict[str, Any] = {"dedup": (not self.force) if self.force is not None else dedup_by_default}
        if self.explain_threshold is not None:
            options["explain_threshold"] = self.explain_threshold
        return options


class PathsRequest(SubmitOptions):
    paths: list[str] = Field(min_length=1, description="Absolute files or folders under RADQ_ALLOWED_ROOTS")


class Progress(BaseModel):
    finished: int = Field(description="Instances in a final state")
    rate_per_s: float | None = Field(description="Finished instances per second since the job was created")
    eta_seconds: float | None = Field(description="At that rate, seconds until every instance is final")


class InstanceOut(BaseModel):
    id: int
    file_name: str
    status: str
    reason: str | None
    notes: str | None
    attempts: int
    worker: str | None = Field(description="Celery node name of the worker that last took it")
    sop_instance_uid: str | None
    study_instance_uid: str | None
    series_instance_uid: str | None
    modality: str | None


class JobsPage(BaseModel):
    items: list[JobOut]


class InstancesPage(BaseModel):
    job_id: str
    status: str | None
    limit: int
    offset: int
    items: list[InstanceOut]


class ResultOut(BaseModel):
    model: str
    model_version: str
    weights_sha256: str
    radq_version: str
    precision: str | None = Field(
        description="arithmetic of the forward pass: fp32, or bf16/fp16 mixed precision "
        "(autocast; see RADQ_PRECISION); null for results written before radq recorded it"
    )
    outputs: dict[str, float]
    saliency: dict[str, str] = Field(
        default_factory=dict, description="label -> URL of a Grad-CAM PNG (jobs with explain_threshold)"
    )
    preprocessing: str
    created_at: datetime


class StudyInstanceOut(BaseModel):
    id: int
    job_id: str
    sop_instance_uid: str | None
    file_name: str
    status: str
    reason: str | None
    results: list[ResultOut]


class SeriesOut(BaseModel):
    series_instance_uid: str | None
    modality: str | None
    series_description: str | None
    instances: list[StudyInstanceOut]


class SummaryOut(BaseModel):
    model: str
    model_version: str
    aggregation: str
    instances: int
    outputs: dict[str, float]


class StudyResultsOut(BaseModel):
    study_instance_uid: str
    patient_pseudonym: str | None = Field(
        description="HMAC-SHA256 of the PatientID (the same for every study of one patient, keyed by "
        "RADQ_PSEUDONYM_KEY); null before a worker has read a header or when the file has no PatientID"
    )
    series: list[SeriesOut]
    summary: list[SummaryOut]


class ErrorOut(BaseModel):
    detail: str


class StudyFound(BaseModel):
    study_instance_uid: str
    instances: int
    modalities: list[str]
    first_submitted: datetime


class StudiesPage(BaseModel):
    patient_pseudonym: str
    items: list[StudyFound]


class AuditEventOut(BaseModel):
    at: datetime
    actor: str = Field(description="The name of the token used ('anonymous' when RADQ_AUTH=false)")
    action: str = Field(
        description="job.submit, job.cancel, job.retry, job.instances, study.read or study.find"
    )
    job_id: str | None
    study_instance_uid: str | None
    detail: str | None


class AuditPage(BaseModel):
    items: list[AuditEventOut]
