"""What of a file's header may reach the database: a pseudonym of the patient, never who they are.

The worker stores UIDs, modality, body part and series description; the patient is
kept only as the keyed HMAC of the PatientID (:func:`radq.pseudonyms.pseudonymise`).
Notes and reasons quote file content (pydicom's warnings quote values), so the patient
values of the file are cut out of them before they are stored.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from radq.pseudonyms import pseudonymise
from workers.header import element_text

PATIENT_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientBirthName",
    "PatientMotherBirthName",
    "OtherPatientNames",
    "OtherPatientIDs",
    "PatientAddress",
    "PatientTelephoneNumbers",
)
"""Header values that identify the patient and must not reach a database column."""

REDACTED = "[patient data removed]"
_MIN_PART = 3
"""Shorter parts of a name (initials) are not cut out: they would shred every note."""


def patient_values(ds: Dataset) -> list[str]:
    """The patient-identifying texts of ``ds``, longest first, with each part of a name.

    Never raises: an unreadable element has no text to leak.
    """
    found: set[str] = set()
    for keyword in PATIENT_KEYWORDS:
        text = element_text(ds, keyword)
        if not text:
            continue
        found.add(text)
        for part in text.replace("\\", "^").replace("=", "^").split("^"):
            if len(part.strip()) >= _MIN_PART:
                found.add(part.strip())
    return sorted(found, key=len, reverse=True)


def redact(text: str | None, values: list[str]) -> str | None:
    """``text`` with every occurrence of each of ``values`` replaced."""
    if not text:
        return text
    for value in values:
        if value in text:
            text = text.replace(value, REDACTED)
    return text


def patient_pseudonym(ds: Dataset, key: bytes) -> str | None:
    """The HMAC-SHA256 pseudonym of the file's PatientID, or None when it has none."""
    patient_id = element_text(ds, "PatientID")
    return pseudonymise(key, patient_id) if patient_id else None
