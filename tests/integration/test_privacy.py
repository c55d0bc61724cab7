"""PHI minimisation: the database keeps a keyed pseudonym of the patient, never who the patient is."""

from __future__ import annotations

import hashlib
import hmac
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from db.models import Base, Instance
from radq.errors import ConfigurationError
from radq.pseudonyms import KEY_FILE, pseudonym_key
from radq.settings import Settings
from tests.conftest import REPO, SAMPLES, Stack
from tests.jobwait import wait_done
from workers.phi import REDACTED, patient_values, redact

NAME, FAMILY, GIVEN = "Tester^Marguerite^Q", "Tester", "Marguerite"
BIRTH_DATE = "19610417"
PATIENT_ID = "PID-4711-XZ"


def _patient_file(folder: Path, name: str, study_uid: str | None = None) -> Path:
    """A real CT slice carrying a patient's name, birth date and id."""
    ds = pydicom.dcmread(SAMPLES / "real" / "CT_small.dcm")
    ds.PatientName, ds.PatientBirthDate, ds.PatientID = NAME, BIRTH_DATE, PATIENT_ID
    ds.OtherPatientNames = "Tester^Maggie"
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.StudyInstanceUID = study_uid or pydicom.uid.generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    ds.save_as(path)
    return path


def _every_stored_text(stack: Stack) -> list[str]:
    """Every value of every text column and JSON column of every table."""
    texts: list[str] = []
    with stack.engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            for row in conn.execute(select(table)):
                texts += [str(v) for v in row if v is not None and not isinstance(v, int | float)]
    return texts


def test_patient_id_is_stored_as_its_hmac_and_no_name_or_birth_date(stack: Stack, tmp_path: Path) -> None:
    study = pydicom.uid.generate_uid()
    files = [_patient_file(tmp_path, f"{n}.dcm", study) for n in range(2)]
    later = _patient_file(tmp_path / "later", "c.dcm")  # the same patient's next study
    job = wait_done(stack.client, stack.client.upload([*files, later])["id"])
    assert job["counts"]["done"] == 3

    assert stack.settings.pseudonym_key is not None
    key = stack.settings.pseudonym_key.get_secret_value().encode()
    expected = hmac.new(key, PATIENT_ID.encode(), hashlib.sha256).hexdigest()
    with stack.sessions() as session:
        stored = session.scalars(select(Instance.patient_pseudonym).where(Instance.job_id == job["id"])).all()
    assert stored == [expected] * 3

    results = stack.client.study_results(study)
    assert results["patient_pseudonym"] == expected
    found = stack.http.get("/v1/studies", params={"patient_pseudonym": expected}).json()
    assert {s["study_instance_uid"] for s in found["items"]} == {
        study,
        pydicom.dcmread(later).StudyInstanceUID,
    }
    assert stack.http.get("/v1/studies", params={"patient_pseudonym": "nope"}).status_code == 422

    texts = _every_stored_text(stack)
    assert any(expected in t for t in texts)  # the scan reads the instances table
    for secret in (NAME, FAMILY, GIVEN, "Maggie", BIRTH_DATE, PATIENT_ID):
        leaks = [t for t in texts if secret in t]
        assert not leaks, (secret, leaks[:3])


def test_notes_and_reasons_quoting_the_patient_are_redacted(tmp_path: Path) -> None:
    ds = pydicom.dcmread(_patient_file(tmp_path, "p.dcm"))
    values = patient_values(ds)
    note = f"pydicom: Invalid value for VR DA: '{BIRTH_DATE}'; name {NAME}; also {GIVEN} and {PATIENT_ID}"
    cleaned = redact(note, values)
    assert cleaned is not None
    for secret in (NAME, GIVEN, BIRTH_DATE, PATIENT_ID):
        assert secret not in cleaned
    assert cleaned.startswith("pydicom: Invalid value for VR DA: '" + REDACTED)


def test_development_key_is_generated_once_and_shared(tmp_path: Path) -> None:
    home = tmp_path / "home"
    code = (
        "import sys; from pathlib import Path; from radq.settings import Settings; "
        "from radq.pseudonyms import pseudonym_key; "
        "print(pseudonym_key(Settings(home=Path(sys.argv[1]))).decode())"
    )
    racers = [
        subprocess.Popen([sys.executable, "-c", code, str(home)], stdout=subprocess.PIPE, text=True, cwd=REPO)
        for _ in range(4)
    ]
    keys = {p.communicate(timeout=60)[0].strip() for p in racers}
    assert len(keys) == 1 and len(next(iter(keys))) >= 40
    assert (home / KEY_FILE).read_text().strip() == next(iter(keys))
    assert (home / KEY_FILE).stat().st_mode & 0o077 == 0  # readable by its owner only
    assert pseudonym_key(Settings(home=home)).decode() == next(iter(keys))
    assert pseudonym_key(Settings(home=home, pseudonym_key="from-the-env")) == b"from-the-env"  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="RADQ_PSEUDONYM_KEY"):
        pseudonym_key(Settings(home=tmp_path / "prod", env="production"))
