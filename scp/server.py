"""The network side: a pynetdicom AE answering C-ECHO and C-STORE, started and stopped cleanly.

Each C-STORE is written to the spool as received (no decoding, no transcoding) and put
into a group by :class:`~scp.batching.Batcher`; a :class:`~scp.submission.Submitter`
thread records each complete group as a radq job.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, AllStoragePresentationContexts, VerificationPresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.transport import ThreadedAssociationServer

from api.state import AppState
from api.submit import resolve_models
from db.session import make_engine, make_sessionmaker
from radq.blobs import open_blob_store
from radq.errors import ConfigurationError, LimitExceeded, RadqError, SubmissionError
from radq.queue import make_celery
from radq.settings import Settings
from scp.batching import Batcher, Grouping
from scp.spool import Received, Spool
from scp.submission import Submitter

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
"""C-STORE failure: the SCP cannot store the dataset (disk, limits)."""
EXIT_OK = 0
EXIT_UNSUBMITTED = 1
"""Stopped, but some received files could not be recorded as jobs; they stay in the spool."""
_PREFERRED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
_LAST = [DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian]
TRANSFER_SYNTAXES = [
    *_PREFERRED,
    *(uid for uid in AllTransferSyntaxes if uid not in _PREFERRED and uid not in _LAST),
    *_LAST,
]
"""Every transfer syntax pydicom names, compressed ones included, so files are stored as sent.

pynetdicom accepts, per proposed context, the first of these the sender offers. dcmtk's
and pynetdicom's storescu propose each compressed syntax in a context of its own, which
is then accepted unchanged; where one context offers several, Explicit VR Little Endian
wins, so radq never asks a sender to compress (maybe lossy) or drop VRs on its behalf.
"""
_ERROR_COMMENT_MAX = 64  # (0000,0902) Error Comment is an LO


@dataclass(frozen=True)
class ScpConfig:
    """What ``radq scp`` was asked to run."""

    ae_title: str = "RADQ"
    host: str = "127.0.0.1"
    port: int = 11112
    grouping: Grouping = Grouping.ASSOCIATION
    models: list[str] = field(default_factory=list)


def check_ae_title(title: str) -> str:
    """An AE title as DICOM allows it: 1-16 characters, no backslash or control characters.

    Raises:
        ConfigurationError: the title is not one.
    """
    stripped = title.strip()
    if not 1 <= len(stripped) <= 16 or "\\" in stripped or not stripped.isprintable():
        raise ConfigurationError(
            f"AE title {title!r} is not valid: use 1-16 printable characters without a backslash"
        )
    return stripped


def build_ae(ae_title: str) -> AE:
    """An AE that accepts Verification and every storage SOP class in every transfer syntax."""
    ae = AE(ae_title=ae_title)
    ae.require_called_aet = True  # a modality aimed at another AE title is misconfigured: refuse it
    ae.supported_contexts = VerificationPresentationContexts
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(cast(str, context.abstract_syntax), TRANSFER_SYNTAXES)
    return ae


def read_study_uid(path: Path) -> str:
    """The file's StudyInstanceUID, or "" when it has none or cannot be read."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
        return str(ds.get("StudyInstanceUID", "") or "").strip()
    except Exception:  # any unreadable header: the worker reports why, per file
        return ""


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:_ERROR_COMMENT_MAX]
    return ds


def _ended(assoc: Association) -> bool:
    # Handlers run on the association's thread, so once it has ended no file can follow.
    return not assoc.is_alive()


def _peer(assoc: Association) -> str:
    requestor = assoc.requestor
    return f"{requestor.ae_title.strip()}@{requestor.address}:{requestor.port}"


class StoreHandlers:
    """The pynetdicom event handlers; they run on each association's own thread."""

    def __init__(self, spool: Spool, batcher: Batcher, grouping: Grouping) -> None:
        self.spool = spool
        self.batcher = batcher
        self.grouping = grouping

    def bindings(self) -> list[EventHandlerType]:
        return [
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_RELEASED, functools.partial(self.on_end, how="released")),
            (evt.EVT_ABORTED, functools.partial(self.on_end, how="aborted")),
        ]

    def on_echo(self, event: Event) -> int:
        return STATUS_SUCCESS

    def on_end(self, event: Event, how: str) -> None:
        log.info("association %s %s", _peer(event.assoc), how)

    def on_store(self, event: Event) -> int | Dataset:
        """Store one dataset; success only once it is on disk in its group.

        Any failure is answered 0xA700 (out of resources) with a reason, and never
        propagates: one bad dataset must not end the association or the server.
        """
        assoc = event.assoc
        request = cast(C_STORE, event.request)
        calling_ae = assoc.requestor.ae_title.strip()
        sop_uid = str(request.AffectedSOPInstanceUID or "").strip() or f"unknown-{uuid.uuid4().hex}"
        received: Received | None = None
        try:
            if request.DataSet is None:
                raise ValueError("the C-STORE request carries no data set")
            received = self.spool.receive(
                event.file_meta, request.DataSet, calling_ae=calling_ae, sop_instance_uid=sop_uid
            )
            if received.size > self.batcher.max_bytes:
                raise LimitExceeded(
                    f"{received.size} bytes is over the limit of {self.batcher.max_bytes} "
                    "(RADQ_MAX_UPLOAD_BYTES)"
                )
            if self.grouping is Grouping.STUDY:
                study = read_study_uid(received.path)
                label = f"study {study or '(no StudyInstanceUID)'}"
                self.batcher.add(("study", study), received, label=label)
            else:
                finished = functools.partial(_ended, assoc)
                self.batcher.add(assoc, received, label=f"association {_peer(assoc)}", finished=finished)
        except Exception as exc:
            if received is not None:
                received.path.unlink(missing_ok=True)
            if isinstance(exc, OSError | RadqError):
                log.error("C-STORE %s from %s refused: %s", sop_uid, _peer(assoc), exc)
            else:
                log.exception("C-STORE %s from %s failed", sop_uid, _peer(assoc))
            return _failure(STATUS_OUT_OF_RESOURCES, f"radq cannot store it: {exc}")
        return STATUS_SUCCESS


class ScpServer:
    """The SCP's resources and lifecycle: :meth:`start`, then :meth:`stop` once."""

    def __init__(self, settings: Settings, config: ScpConfig) -> None:
        self.settings = settings
        self.config = config
        self.spool = Spool(settings.scp_spool_dir or settings.home / "scp-spool")
        self.ae = build_ae(check_ae_title(config.ae_title))
        self._server: ThreadedAssociationServer | None = None
        self._state: AppState | None = None
        self._submitter: Submitter | None = None

    def start(self) -> None:
        """Take the spool, connect, queue leftovers, and listen.

        Raises:
            ConfigurationError: unknown model, spool in use, or the port cannot be bound.
        """
        settings = self.settings
        settings.ensure_dirs()
        self.spool.open()
        try:
            self._start(settings)
        except BaseException:
            self._close()
            raise

    def _start(self, settings: Settings) -> None:
        engine = make_engine(settings.resolved_database_url)
        self._state = state = AppState(
            settings=settings,
            engine=engine,
            sessions=make_sessionmaker(engine),
            celery=make_celery(settings),
            blobs=open_blob_store(settings),
        )
        try:
            models = resolve_models(state, self.config.models)
        except SubmissionError as exc:
            raise ConfigurationError(str(exc)) from None
        batcher = Batcher(
            self.spool, quiet_seconds=settings.scp_quiet_seconds, max_bytes=settings.max_upload_bytes
        )
        self._submitter = submitter = Submitter(state, self.spool, batcher, models=models)
        recovered = submitter.recover()
        if recovered:
            log.warning("submitting %d group(s) of received files left in %s", recovered, self.spool.groups)
        submitter.start()
        handlers = StoreHandlers(self.spool, batcher, self.config.grouping)
        address = (self.config.host, self.config.port)
        try:
            self._server = self.ae.start_server(address, block=False, evt_handlers=handlers.bindings())
        except OSError as exc:
            raise ConfigurationError(f"cannot listen on {address[0]}:{address[1]}: {exc.strerror}") from None
        log.info(
            "DICOM SCP %s listening on %s:%d; one job per %s%s; models %s; spool %s",
            self.ae.ae_title,
            *address,
            self.config.grouping.value,
            f" after {settings.scp_quiet_seconds:g}s quiet" if self.config.grouping is Grouping.STUDY else "",
            ", ".join(models),
            self.spool.root,
        )

    def stop(self) -> int:
        """Stop accepting, let open associations finish (up to the grace period, then
        abort them), record every group received so far as a job, and release everything.

        Returns:
            ``EXIT_OK``, or ``EXIT_UNSUBMITTED`` when some groups could not be recorded
            (they stay in the spool for the next start).
        """
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        open_assocs = self.ae.active_associations
        if open_assocs:
            grace = self.settings.scp_shutdown_grace_seconds
            log.info("no longer accepting; waiting up to %gs for %d association(s)", grace, len(open_assocs))
            deadline = time.monotonic() + grace
            while self.ae.active_associations and time.monotonic() < deadline:
                time.sleep(0.05)
        for assoc in self.ae.active_associations:
            log.warning("aborting association %s; what it sent so far is submitted", _peer(assoc))
            assoc.abort()
        for assoc in self.ae.active_associations:
            assoc.join(timeout=5)
        left: list[Path] = []
        if self._submitter is not None:
            self._submitter.stop()
            left = self._submitter.flush()
        self._close()
        if left:
            log.error(
                "%d group(s) of received files could not be recorded as jobs; they stay in %s "
                "and are submitted when `radq scp` starts again",
                len(left),
                self.spool.groups,
            )
            return EXIT_UNSUBMITTED
        log.info("stopped")
        return EXIT_OK

    def _close(self) -> None:
        if self._submitter is not None:
            self._submitter.stop()
        if self._state is not None:
            self._state.engine.dispose()
        self.spool.close()


def run_scp(settings: Settings, config: ScpConfig) -> int:
    """Run the SCP until SIGTERM or SIGINT; returns the process exit code.

    Raises:
        ConfigurationError: it cannot start (see :meth:`ScpServer.start`).
    """
    stopping = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s received: stopping", signal.Signals(signum).name)
        stopping.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server = ScpServer(settings, config)
        server.start()
        try:
            while not stopping.wait(0.5):
                pass
        finally:
            code = server.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code
