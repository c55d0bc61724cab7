"""Reading results back by StudyInstanceUID."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Instance, Job, Result


@dataclass
class InstanceResults:
    instance: Instance
    results: list[Result] = field(default_factory=list)


def study_instances(session: Session, study_instance_uid: str) -> list[InstanceResults]:
    """Every instance of a study with its results.

    A study submitted more than once appears once per SOPInstanceUID: the most recent
    submission that has results wins, so re-running a job does not double the study.
    """
    instances = session.scalars(
        select(Instance).where(Instance.study_instance_uid == study_instance_uid).order_by(Instance.id)
    ).all()
    if not instances:
        return []
    results_by_instance: dict[int, list[Result]] = defaultdict(list)
    ids = [i.id for i in instances]
    for start in range(0, len(ids), 1000):
        for result in session.scalars(
            select(Result)
            .where(Result.instance_id.in_(ids[start : start + 1000]))
            .order_by(Result.instance_id, Result.model, Result.model_version)
        ):
            results_by_instance[result.instance_id].append(result)

    latest: dict[str, InstanceResults] = {}
    for inst in instances:  # ascending id: later submissions overwrite earlier ones
        key = inst.sop_instance_uid or f"instance:{inst.id}"
        entry = InstanceResults(inst, results_by_instance.get(inst.id, []))
        if entry.results or key not in latest or not latest[key].results:
            latest[key] = entry
    return list(latest.values())


def study_pseudonym(entries: list[InstanceResults]) -> str | None:
    """The patient pseudonym of a study: the one most of its instances carry (None if none do)."""
    found = Counter(e.instance.patient_pseudonym for e in entries if e.instance.patient_pseudonym)
    return found.most_common(1)[0][0] if found else None


@dataclass
class StudyOfPatient:
    study_instance_uid: str
    instances: int
    modalities: list[str]
    first_submitted: datetime


def studies_of_patient(session: Session, pseudonym: str, limit: int = 500) -> list[StudyOfPatient]:
    """The studies whose instances carry ``pseudonym``, first submitted first."""
    rows = session.execute(
        select(Instance.study_instance_uid, func.count(), func.min(Job.created_at))
        .join(Job, Job.id == Instance.job_id)
        .where(Instance.patient_pseudonym == pseudonym, Instance.study_instance_uid.is_not(None))
        .group_by(Instance.study_instance_uid)
        .order_by(func.min(Job.created_at))
        .limit(limit)
    ).all()
    modalities: dict[str, set[str]] = defaultdict(set)
    for uid, modality in session.execute(
        select(Instance.study_instance_uid, Instance.modality)
        .where(Instance.patient_pseudonym == pseudonym, Instance.modality.is_not(None))
        .distinct()
    ):
        modalities[str(uid)].add(str(modality))
    return [
        StudyOfPatient(str(uid), count, sorted(modalities.get(str(uid), ())), first)
        for uid, count, first in rows
    ]


def summarise(entries: list[InstanceResults], aggregations: Mapping[str, str]) -> list[dict[str, Any]]:
    """Per model and version, aggregate each label over the study's instances.

    Args:
        entries: the study's instances with results.
        aggregations: model name to ``max`` or ``mean`` (from its card); default ``max``.
    """
    grouped: dict[tuple[str, str], list[dict[str, float]]] = defaultdict(list)
    for entry in entries:
        for r in entry.results:
            grouped[(r.model, r.model_version)].append(r.outputs)
    summary = []
    for (model, version), outputs in sorted(grouped.items()):
        how = aggregations.get(model, "max")
        labels = sorted({label for o in outputs for label in o})
        values: dict[str, float] = {}
        for label in labels:
            vals = [o[label] for o in outputs if label in o]
            values[label] = max(vals) if how == "max" else sum(vals) / len(vals)
        summary.append(
            {
                "model": model,
                "model_version": version,
                "aggregation": how,
                "instances": len(outputs),
                "outputs": values,
            }
        )
    return summary
