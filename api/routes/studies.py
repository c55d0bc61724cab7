"""Results by StudyInstanceUID."""

from __future__ import annotations

import re
from collections import defaultdict

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, Response

from api.deps import SessionDep, StateDep
from api.schemas import (
    ErrorOut,
    ResultOut,
    SeriesOut,
    StudyInstanceOut,
    StudyResultsOut,
    SummaryOut,
)
from db.jobs import as_utc
from db.models import Result
from db.studies import study_instances, summarise
from radq.errors import BlobMissing
from radq.model_card import discover_cards

router = APIRouter(tags=["studies"], responses={422: {"model": ErrorOut}})
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _result(r: Result) -> ResultOut:
    return ResultOut(
        model=r.model,
        model_version=r.model_version,
        weights_sha256=r.weights_sha256,
        radq_version=r.radq_version,
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
def read_study_results(study_instance_uid: str, session: SessionDep, state: StateDep) -> StudyResultsOut:
    entries = study_instances(session, study_instance_uid)
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
        series=list(series.values()),
        summary=[SummaryOut.model_validate(s) for s in summarise(entries, aggregations)],
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
