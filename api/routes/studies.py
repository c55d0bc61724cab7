"""Results by StudyInstanceUID."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import FileResponse, Response

from api.audit import audit
from api.deps import ReadDep, SessionDep, StateDep
from api.schemas import (
    ErrorOut,
    ResultOut,
    SeriesOut,
    StudiesPage,
    StudyFound,
    StudyInstanceOut,
    StudyResultsOut,
    SummaryOut,
)
from db.audit import AuditAction
from db.jobs import as_utc
from db.models import Result
from db.studies import studies_of_patient, study_instances, study_pseudonym, summarise
from radq.errors import BlobMissing
from radq.model_card import discover_cards

router = APIRouter(tags=["studies"], responses={422: {"model": ErrorOut}})
SHA256 = re.compile(r"^[0-9a-f]{64}$")
SHA256_PATTERN = SHA256.pattern


def _result(r: Result) -> ResultOut:
    return ResultOut(
        model=r.model,
        model_version=r.model_version,
        weights_sha256=r.weights_sha256,
        radq_version=r.radq_version,
        precision=r.precision,
        outputs=r.outputs,
        saliency={label: f"/v1/saliency/{sha}.png" for label, sha in (r.saliency or {}).items()},
        preprocessing=r.preprocessing,
        created_at=as_utc(r.created_at),  # type: ignore[arg-type]
    )


@router.get(
    "/v1/studies/{study_instance_uid}/results",
    response_model=StudyResultsOut,
    responses={404: {"model": ErrorOut}},
)
def read_study_results(
    study_instance_uid: str, session: SessionDep, state: StateDep, caller: ReadDep
) -> StudyResultsOut:
    entries = study_instances(session, study_instance_uid)
    # Attempts on unknown studies are recorded too: probing for UIDs is worth seeing.
    audit(state, caller, AuditAction.READ_STUDY, study_instance_uid=study_instance_uid,
          detail=None if entries else "no such study")  # fmt: skip
    if not entries:
        raise HTTPException(
            404,
            f"no study with StudyInstanceUID {study_instance_uid}: it was never submitted, "
            "or its files have not been read yet",
        )
    series: dict[str | None, SeriesOut] = {}
    by_series: dict[str | None, list[StudyInstanceOut]] = defaultdict(list)
    for entry in entries:
        inst = entry.instance
        if inst.series_instance_uid not in series:
            series[inst.series_instance_uid] = SeriesOut(
                series_instance_uid=inst.series_instance_uid,
                modality=inst.modality,
                series_description=inst.series_description,
                instances=[],
            )
        by_series[inst.series_instance_uid].append(
            StudyInstanceOut(
                id=inst.id,
                job_id=inst.job_id,
                sop_instance_uid=inst.sop_instance_uid,
                file_name=inst.file_name,
                status=inst.status,
                reason=inst.reason,
                results=[_result(r) for r in entry.results],
            )
        )
    for uid, items in by_series.items():
        series[uid].instances = items
    aggregations = {
        name: card.study_summary for name, (_, card) in discover_cards(state.settings.model_dir).items()
    }
    return StudyResultsOut(
        study_instance_uid=study_instance_uid,
        patient_pseudonym=study_pseudonym(entries),
        series=list(series.values()),
        summary=[SummaryOut.model_validate(s) for s in summarise(entries, aggregations)],
    )


@router.get("/v1/studies", response_model=StudiesPage)
def find_studies(
    session: SessionDep,
    state: StateDep,
    caller: ReadDep,
    patient_pseudonym: Annotated[
        str, Query(pattern=SHA256_PATTERN, description="A study's patient_pseudonym (64 hex digits)")
    ],
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> StudiesPage:
    """The studies of one patient, found by the pseudonym another study's results show."""
    audit(state, caller, AuditAction.FIND_STUDIES, detail=f"patient_pseudonym={patient_pseudonym}")
    found = studies_of_patient(session, patient_pseudonym, limit)
    return StudiesPage(
        patient_pseudonym=patient_pseudonym,
        items=[
            StudyFound(
                study_instance_uid=s.study_instance_uid,
                instances=s.instances,
                modalities=s.modalities,
                first_submitted=as_utc(s.first_submitted),  # type: ignore[arg-type]
            )
            for s in found
        ],
    )


@router.get(
    "/v1/saliency/{sha256}.png",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}}, 404: {"model": ErrorOut}},
)
def read_saliency(sha256: str, state: StateDep) -> Response:
    """A Grad-CAM map stored by a worker (linked from study results)."""
    if not SHA256.match(sha256):
        raise HTTPException(404, f"no saliency map {sha256}")
    path = state.blobs.local_file(sha256)
    if path is not None:  # the file store: served from disk as before
        if not path.is_file():
            raise HTTPException(404, f"no saliency map {sha256}")
        return FileResponse(path, media_type="image/png")
    try:
        png = state.blobs.read(sha256)  # maps are small (tens of KiB)
    except BlobMissing:
        raise HTTPException(404, f"no saliency map {sha256}") from None
    return Response(png, media_type="image/png")
