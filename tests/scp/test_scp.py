"""``radq scp``: real DICOM associations on 127.0.0.1 into a running API and worker.

The SCP runs as its own process (``radq scp``) with the stack's settings; files go over
the network with pynetdicom's ``storescu``, an in-process pynetdicom AE, and dcmtk's
``storescu`` where it is installed. Jobs are found in SQL by their instance names
(``scp:<calling AE>/<SOPInstanceUID>.dcm``) and followed through the HTTP API.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, VerificationPresentationContexts, _config
from pynetdicom.association import Association
from pynetdicom.dsutils import create_file_meta, split_dataset
from sqlalchemy import or_, select

from db.models import Instance
from radq.errors import ConfigurationError
from radq.services import free_port, spawn, stop
from scp.batching import Batcher
from scp.spool import PREAMBLE, Received, Spool
from tests.conftest import SAMPLES, Stack
from tests.jobwait import wait_done

REAL = SAMPLES / "real"
CT = sorted(REAL.glob("CT5N_*.dcm"))
MR = REAL / "MR_small.dcm"
JPEG = REAL / "JPGExtended.dcm"
CALLED = "RADQ"
SUCCESS = 0x0000


def _aet() -> str:
    """A calling AE title of its own per test, so its jobs are found by name."""
    return "T" + uuid.uuid4().hex[:12].upper()


def _sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# --- a running `radq scp` ---------------------------------------------------------------------


@dataclass
class Scp:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    spool: Path


def _echo(port: int, called: str = CALLED) -> int | None:
    """The C-ECHO status, or None when no association could be made."""
    ae = AE(ae_title="ECHOTEST")
    ae.acse_timeout = ae.network_timeout = 5
    ae.requested_contexts = VerificationPresentationContexts
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if "Status" in status else None
    finally:
        assoc.release()


def _start(stack: Stack, spool: Path, *args: str, port: int | None = None, **env: str) -> Scp:
    port = port or free_port()
    log = spool.parent / f"{spool.name}.log"
    proc = spawn(
        ["scp", "--port", str(port), "--ae-title", CALLED, *args],
        env={**stack.settings.to_env(), "RADQ_SCP_SPOOL_DIR": str(spool), **env},
        log_file=log,
    )
    scp = Scp(proc, port, log, spool)
    deadline = time.monotonic() + 60
    while _echo(port) != SUCCESS:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            pytest.fail(f"radq scp did not answer C-ECHO (exit {proc.poll()}):\n{log.read_text()}")
        time.sleep(0.2)
    return scp


@contextmanager
def running_scp(stack: Stack, spool: Path, *args: str, **env: str) -> Iterator[Scp]:
    scp = _start(stack, spool, *args, **env)
    try:
        yield scp
    finally:
        stop(scp.proc)
        print(f"--- {scp.log.name} ---", scp.log.read_text(errors="replace"), sep="\n")


@pytest.fixture(scope="module")
def scp(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scp]:
    """One SCP in the default mode (a job per association), shared by this module."""
    with running_scp(stack, tmp_path_factory.mktemp("scp") / "spool") as server:
        yield server


# --- sending ----------------------------------------------------------------------------------


def _association(port: int, calling: str, files: list[Path]) -> Association:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    contexts = {(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in map(_meta, files)}
    for sop_class, syntax in sorted(contexts):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=CALLED)
    assert assoc.is_established, f"association from {calling} refused"
    return assoc


def _meta(path: Path) -> FileMetaDataset:
    return split_dataset(path)[0]


def send(port: int, calling: str, files: list[Path], *, end: str = "release") -> list[int]:
    """C-STORE ``files`` as they are on disk (no decode/re-encode); returns each status."""
    assoc = _association(port, calling, files)
    statuses = []
    for path in files:
        status = assoc.send_c_store(path)
        statuses.append(int(status.Status) if "Status" in status else -1)
    if end == "release":
        assoc.release()
    elif end == "abort":
        assoc.abort()
    return statuses


@pytest.fixture(autouse=True)
def _send_files_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    # pynetdicom sends a file's encoded dataset as it is instead of decoding and re-encoding it.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


# --- finding the jobs -------------------------------------------------------------------------


def scp_instances(stack: Stack, *callers: str) -> list[Instance]:
    with stack.sessions() as session:
        query = select(Instance).where(or_(*(Instance.file_name.like(f"scp:{c}/%") for c in callers)))
        return list(session.scalars(query.order_by(Instance.id)))


def wait_for_instances(stack: Stack, *callers: str, count: int, timeout: float = 60) -> list[Instance]:
    """The recorded instances named after ``callers``, once there are ``count`` of them."""
    deadline = time.monotonic() + timeout
    while True:
        found = scp_instances(stack, *callers)
        if len(found) >= count:
            assert len(found) == count, [i.file_name for i in found]
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(found)} of {count} instances recorded after {timeout}s")
        time.sleep(0.2)


def the_job(instances: list[Instance]) -> str:
    jobs = {i.job_id for i in instances}
    assert len(jobs) == 1, f"expected one job, got {len(jobs)}"
    return jobs.pop()


def assert_done(stack: Stack, job_id: str, total: int) -> None:
    counts = wait_done(stack.client, job_id)["counts"]
    assert counts["failed"] == 0 and counts["done"] + counts["skipped"] == counts["total"] == total, counts


def assert_done_with_results(stack: Stack, job_id: str, files: list[Path], calling: str) -> None:
    counts = wait_done(stack.client, job_id)["counts"]
    assert counts["failed"] == 0 and counts["done"] + counts["skipped"] == counts["total"] == len(files), (
        counts
    )
    # The same files go over several tests: an instance seen before reuses its results.
    reused = stack.client.instances(job_id, "skipped")
    assert all(i["reason"].startswith("already processed") for i in reused), reused
    names = {i["file_name"] for i in stack.client.instances(job_id)}
    assert names == {f"scp:{calling}/{_sop_uid(p)}.dcm" for p in files}
    for study_uid in {str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in files}:
        study = stack.client.study_results(study_uid)
        mine = [i for s in study["series"] for i in s["instances"] if i["job_id"] == job_id]
        expected = [
            p for p in files if str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) == study_uid
        ]
        assert len(mine) == len(expected), (study_uid, mine)
        assert all(i["status"] in ("done", "skipped") and i["results"] for i in mine), mine


# --- association grouping ---------------------------------------------------------------------


def test_pynetdicom_storescu_sends_one_job(stack: Stack, scp: Scp) -> None:
    calling, files = _aet(), [*CT, MR, JPEG]
    run = subprocess.run(
        [sys.executable, "-m", "pynetdicom", "storescu", "127.0.0.1", str(scp.port), *map(str, files),
         "-aet", calling, "-aec", CALLED, "-cx", "-v"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert output.count("Received Store Response (Status: 0x0000 - Success)") == len(files), output

    job_id = the_job(wait_for_instances(stack, calling, count=len(files)))
    assert_done_with_results(stack, job_id, files, calling)
    assert f"job {job_id}: {len(files)} instance(s) from association {calling}@" in scp.log.read_text()


def test_in_process_ae_files_arrive_byte_for_byte(stack: Stack, scp: Scp) -> None:
    calling, files = _aet(), [*CT, MR, JPEG]
    assert send(scp.port, calling, files) == [SUCCESS] * len(files)

    instances = wait_for_instances(stack, calling, count=len(files))
    assert_done_with_results(stack, the_job(instances), files, calling)
    stored = {i.file_name: i for i in instances}
    for path in files:
        inst = stored[f"scp:{calling}/{_sop_uid(path)}.dcm"]
        blob = stack.settings.resolved_blob_dir / inst.location[:2] / inst.location[2:4] / inst.location
        meta, offset = split_dataset(path)
        kept_meta, kept_offset = split_dataset(blob)
        # The dataset as the sender encoded it (JPEG stays JPEG), behind a fresh file meta.
        assert blob.read_bytes()[kept_offset:] == path.read_bytes()[offset:], path.name
        assert kept_meta.TransferSyntaxUID == meta.TransferSyntaxUID
        assert blob.read_bytes()[:132] == PREAMBLE


def test_aborted_association_still_becomes_a_job(stack: Stack, scp: Scp) -> None:
    calling, sent = _aet(), CT[:3]
    assert send(scp.port, calling, sent, end="abort") == [SUCCESS] * 3

    job_id = the_job(wait_for_instances(stack, calling, count=3))
    assert_done_with_results(stack, job_id, sent, calling)
    assert "aborted" in scp.log.read_text()


def test_bad_datasets_are_acknowledged_and_reported_per_file(stack: Stack, scp: Scp, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.dcm"
    meta = create_file_meta(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
        sop_instance_uid=generate_uid(),
        transfer_syntax=ExplicitVRLittleEndian,
    )
    buffer = io.BytesIO()
    write_file_meta_info(DicomFileLike(buffer), meta)
    garbage.write_bytes(PREAMBLE + buffer.getvalue() + os.urandom(3000))
    truncated = SAMPLES / "broken" / "MR_small_cut_in_pixels.dcm"
    report = SAMPLES / "broken" / "structured_report_no_image.dcm"
    calling, files = _aet(), [garbage, truncated, report, CT[0]]  # (MR_small shares the truncated's UID)
    assert send(scp.port, calling, files) == [SUCCESS] * len(files)

    job_id = the_job(wait_for_instances(stack, calling, count=len(files)))
    wait_done(stack.client, job_id)
    outcome = {i["file_name"]: (i["status"], i["reason"]) for i in stack.client.instances(job_id)}
    name = {p: f"scp:{calling}/{_sop_uid(p)}.dcm" for p in files[1:]}
    name[garbage] = f"scp:{calling}/{meta.MediaStorageSOPInstanceUID}.dcm"
    # Each file is recorded with what the worker made of it; none is lost, none has no reason.
    assert outcome[name[truncated]][0] == "failed" and "truncated pixel data" in outcome[name[truncated]][1]
    assert outcome[name[report]][0] == "skipped" and outcome[name[report]][1].startswith("no image")
    assert outcome[name[garbage]][0] in ("failed", "skipped") and outcome[name[garbage]][1], outcome
    assert outcome[name[CT[0]]][0] in ("done", "skipped"), outcome
    assert _echo(scp.port) == SUCCESS, "the SCP must survive bad datasets"


def test_wrong_called_ae_title_is_refused(scp: Scp) -> None:
    assert _echo(scp.port, called="NOT-RADQ") is None
    assert _echo(scp.port) == SUCCESS


def _dcmtk_storescu() -> str | None:
    """dcmtk's storescu. pynetdicom installs a ``storescu`` of its own, often first on PATH,
    so ``shutil.which`` alone may find the wrong one."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder) / "storescu"
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        try:
            out = subprocess.run([candidate, "--version"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "dcmtk" in (out.stdout + out.stderr).lower():
            return str(candidate)
    return None


def test_dcmtk_storescu_sends_one_job(stack: Stack, scp: Scp) -> None:
    storescu = _dcmtk_storescu()
    if storescu is None:
        pytest.skip("dcmtk's storescu is not installed (apt-get install dcmtk); pynetdicom's is tested above")
    calling, files = _aet(), [*CT, MR, JPEG]
    # -xx also proposes JPEG Extended (12-bit), so the JPEG file is sent as it is.
    run = subprocess.run(
        [storescu, "-v", "-xx", "-aet", calling, "-aec", CALLED, "127.0.0.1", str(scp.port),
         *map(str, files)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert output.count("Received Store Response (Success)") == len(files), output

    job_id = the_job(wait_for_instances(stack, calling, count=len(files)))
    assert_done_with_results(stack, job_id, files, calling)


# --- study grouping, shutdown, restart --------------------------------------------------------


def test_study_grouping_makes_one_job_per_study_across_associations(stack: Stack, tmp_path: Path) -> None:
    first, second = _aet(), _aet()
    with running_scp(stack, tmp_path / "spool", "--group", "study", "--quiet-seconds", "2") as server:
        assert send(server.port, first, [*CT[:3], MR]) == [SUCCESS] * 4
        assert send(server.port, second, CT[3:]) == [SUCCESS] * 2
        instances = wait_for_instances(stack, first, second, count=6)
        time.sleep(3)  # past another quiet period: nothing else may turn up
        assert len(scp_instances(stack, first, second)) == 6

    by_job: dict[str, set[str]] = {}
    for inst in instances:
        by_job.setdefault(inst.job_id, set()).add(inst.file_name)
    assert len(by_job) == 2, by_job
    ct_job = next(j for j, names in by_job.items() if len(names) == 5)
    mr_job = next(j for j, names in by_job.items() if len(names) == 1)
    assert by_job[ct_job] == {f"scp:{first}/{_sop_uid(p)}.dcm" for p in CT[:3]} | {
        f"scp:{second}/{_sop_uid(p)}.dcm" for p in CT[3:]
    }
    assert_done(stack, ct_job, 5)
    assert_done_with_results(stack, mr_job, [MR], first)


def test_sigterm_submits_what_was_received_and_exits_0(stack: Stack, tmp_path: Path) -> None:
    first, second = _aet(), _aet()
    server = _start(
        stack, tmp_path / "spool", "--group", "study", "--quiet-seconds", "600",
        RADQ_SCP_SHUTDOWN_GRACE_SECONDS="1",
    )  # fmt: skip
    try:
        assert send(server.port, first, CT[:3]) == [SUCCESS] * 3
        still_open = _association(server.port, second, CT[3:])
        statuses = [int(still_open.send_c_store(p).Status) for p in CT[3:]]
        assert statuses == [SUCCESS] * 2
        time.sleep(0.5)
        assert scp_instances(stack, first, second) == [], "a study waits for its quiet period"

        os.killpg(server.proc.pid, signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0, server.log.read_text()
    finally:
        stop(server.proc)
        print(server.log.read_text(errors="replace"))

    instances = scp_instances(stack, first, second)
    assert len(instances) == 5
    assert_done(stack, the_job(instances), 5)
    log = server.log.read_text()
    assert "SIGTERM received" in log and "aborting association" in log


def test_files_received_before_a_crash_are_submitted_on_restart(stack: Stack, tmp_path: Path) -> None:
    calling, spool = _aet(), tmp_path / "spool"
    server = _start(stack, spool)
    try:
        assoc = _association(server.port, calling, CT[:2])
        assert [int(assoc.send_c_store(p).Status) for p in CT[:2]] == [SUCCESS] * 2
        os.killpg(server.proc.pid, signal.SIGKILL)  # no chance to submit anything
        server.proc.wait(timeout=30)
        assoc.abort()
    finally:
        stop(server.proc)
    assert scp_instances(stack, calling) == []
    assert len(list((spool / "groups").iterdir())) == 1

    with running_scp(stack, spool) as restarted:
        job_id = the_job(wait_for_instances(stack, calling, count=2))
        assert "submitting 1 group(s) of received files left in" in restarted.log.read_text()
    assert_done_with_results(stack, job_id, CT[:2], calling)
    assert list((spool / "groups").iterdir()) == []


def test_groups_that_cannot_be_recorded_stay_in_the_spool(stack: Stack, tmp_path: Path) -> None:
    calling, spool = _aet(), tmp_path / "spool"
    # A database without radq's tables: every attempt to record the job fails.
    unusable = f"sqlite:///{tmp_path / 'empty.db'}"
    with running_scp(stack, spool, RADQ_DATABASE_URL=unusable) as server:
        assert send(server.port, calling, CT[:2]) == [SUCCESS] * 2
        deadline = time.monotonic() + 30
        while "will retry" not in server.log.read_text():
            assert time.monotonic() < deadline, server.log.read_text()
            time.sleep(0.2)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 1, "exit 1: received files are still unsubmitted"
    assert len(list((spool / "groups").iterdir())) == 1
    assert scp_instances(stack, calling) == []

    with running_scp(stack, spool):
        job_id = the_job(wait_for_instances(stack, calling, count=2))
    assert_done_with_results(stack, job_id, CT[:2], calling)


# --- the grouping rules, without the network --------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _received(spool: Spool, calling: str, sop_uid: str, size: int = 100) -> Received:
    meta = create_file_meta(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=sop_uid,
        transfer_syntax=ExplicitVRLittleEndian,
    )
    return spool.receive(meta, io.BytesIO(b"\0" * size), calling_ae=calling, sop_instance_uid=sop_uid)


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    spool = Spool(tmp_path / "spool")
    spool.open()
    yield spool
    spool.close()


def test_study_groups_wait_for_their_quiet_period(spool: Spool) -> None:
    clock = Clock()
    batcher = Batcher(spool, quiet_seconds=10, max_bytes=10**9, clock=clock)
    batcher.add("study-a", _received(spool, "A", "1.1"), label="study a")
    clock.now = 8
    batcher.add("study-a", _received(spool, "B", "1.2"), label="study a")
    clock.now = 17
    assert batcher.take_ready() == []
    clock.now = 18
    (group,) = batcher.take_ready()
    assert group.count == 2 and group.calling_aes == {"A", "B"}
    assert [name for name, _ in spool.files(group.path)] == ["scp:A/1.1.dcm", "scp:B/1.2.dcm"]
    # A later instance of the same study starts a new group.
    batcher.add("study-a", _received(spool, "A", "1.3"), label="study a")
    assert batcher.pending() == 1


def test_association_groups_end_with_the_association(spool: Spool) -> None:
    ended = False
    batcher = Batcher(spool, quiet_seconds=0.001, max_bytes=10**9, clock=Clock())
    batcher.add("assoc", _received(spool, "A", "1.1"), label="a", finished=lambda: ended)
    batcher.add("assoc", _received(spool, "A", "1.1"), label="a", finished=lambda: ended)  # a resend
    assert batcher.take_ready() == []
    ended = True
    (group,) = batcher.take_ready()
    assert group.count == 1


def test_full_groups_roll_over_into_a_new_job(spool: Spool) -> None:
    first = _received(spool, "A", "1.1", size=600)
    batcher = Batcher(spool, quiet_seconds=10, max_bytes=first.size + 100, clock=Clock())
    batcher.add("study", first, label="s")
    batcher.add("study", _received(spool, "A", "1.2", size=600), label="s")
    (full,) = batcher.take_ready()
    assert full.count == 1
    assert len(batcher.take_all()) == 1


def test_a_spool_serves_one_process(spool: Spool) -> None:
    with pytest.raises(ConfigurationError, match="in use by another process"):
        Spool(spool.root).open()
