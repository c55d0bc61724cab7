"""Multipart bodies parsed as they arrive, each file part straight to a file of its own.

python-multipart's streaming ``MultipartParser`` (the parser Starlette itself uses) is fed
the request in chunks; every file part's bytes go to its own file in a temporary directory
beside the blob store, so memory holds one chunk of the request, never a part, and one file
is open at a time however many parts there are. A 2 GB upload costs disk, not RAM.
(Starlette's ``request.form()`` keeps each file part under 1 MB in memory until the whole
form is parsed: 1,000 CT slices of 0.5 MB took the API from 128 to 640 MiB.)

Two kinds of body use it: STOW-RS's ``multipart/related`` (:class:`PartSpool`, every part a
DICOM file) and form uploads' ``multipart/form-data`` (:class:`FormSpool`: parts with a
filename are files, the others small fields kept in memory).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from api.disk import DiskReserve
from api.ingest import INGEST_PREFIX, ArchiveLimits, Ingest, SpooledFile, is_archive_name, is_tar_name
from api.tar_stream import TarExpansion
from radq.blobs import room_for
from radq.errors import LimitExceeded, SubmissionError

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

DICOM = "application/dicom"
FEED_BYTES = 1024 * 1024
"""Request bytes gathered before one hop to a thread parses them."""
MAX_FIELD_BYTES = 64 * 1024
"""Largest value a form field (not a file) may have: they are options, kept in memory."""
MAX_FIELDS = 100
"""Most fields (not files) a form may have."""


class MalformedMultipart(SubmissionError):
    """Raised when a multipart body cannot be split into parts (bad syntax, cut short)."""


@dataclass
class Part:
    """One body part: spooled to ``path``, or None for a part not kept as a file (a form
    field, whose ``value`` is kept instead, or a STOW-RS part refused by its headers)."""

    number: int
    content_type: str
    path: Path | None
    size: int = 0
    name: str = ""  # form-data: the field name
    filename: str | None = None  # form-data: the file name; None for a field
    value: bytes = b""  # form-data: a field's value
    sha256: str = ""  # of a spooled part, computed as it was written
    members: list[SpooledFile] | None = None  # a tar expanded as it arrived: its members, spooled


def _label(part: Part) -> str:
    """How an error names ``part``: its file name, else its number."""
    return part.filename or f"part {part.number} of the request"


def _decoded(raw: bytes) -> str:
    """A header parameter as text: UTF-8, as browsers send it, else Latin-1."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class PartSpool:
    """Splits a ``multipart/related`` body into part files as it is fed, within the limits.

    A part whose Content-Type is not application/dicom is counted but not kept (its
    :attr:`Part.path` is None); a part without one takes the request's type (RFC 2387).

    Args:
        boundary: the boundary from the request's Content-Type.
        parent: directory for the temporary spool (the blob store's spool: the file
            store's own directory, so the parts land on the disk that will keep them).
        max_bytes: body size limit (``RADQ_MAX_UPLOAD_BYTES``).
        max_parts: part count limit (``RADQ_MAX_ARCHIVE_MEMBERS``).
        reserve: the free space to leave on the spool's disk, checked as each chunk is fed.

    Raises:
        MalformedMultipart: the boundary is unusable (over 70 characters).
    """

    kind = "multipart/related"
    no_parts_hint = "send one DICOM file per part"
    prefix = ".stow-"

    def __init__(
        self,
        boundary: bytes,
        parent: Path,
        *,
        max_bytes: int,
        max_parts: int,
        reserve: DiskReserve | None = None,
    ) -> None:
        self.boundary = boundary.decode("latin-1")
        self.max_bytes = max_bytes
        self.max_parts = max_parts
        self.reserve = reserve
        self.received = 0
        self.parts: list[Part] = []
        self.complete = False
        self._begun = False
        with room_for("the request's body"):
            parent.mkdir(parents=True, exist_ok=True)
            self.directory = Path(tempfile.mkdtemp(prefix=self.prefix, dir=parent))
        self._headers: dict[str, str] = {}
        self._field = bytearray()
        self._value = bytearray()
        self._part: Part | None = None
        self._out: IO[bytes] | None = None
        self._digest: Any = None  # hashlib's sha256 object while a hashed part arrives
        callbacks: MultipartCallbacks = {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }
        try:
            self._parser = MultipartParser(boundary, callbacks)
        except FormParserError as exc:
            self.cleanup()
            raise MalformedMultipart(f"unusable multipart boundary: {exc}") from None

    def _part_begin(self) -> None:
        self._begun = True
        self._headers = {}

    def _header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        self._headers[name] = self._value.decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def _spool(self, part: Part, *, hashed: bool = True) -> Part:
        """``part``, with a file of its own to receive its bytes; ``hashed``: its SHA-256
        computed as they arrive (for the blob store to take the file as is)."""
        part.path = self.directory / f"{part.number:06d}"
        with room_for(_label(part)):
            self._out = part.path.open("wb")
        self._digest = hashlib.sha256() if hashed else None
        return part

    def _open(self, number: int, headers: dict[str, str]) -> Part:
        """The part that begins with ``headers``, spooled or not."""
        if number > self.max_parts:
            raise LimitExceeded(
                f"the request has more than {self.max_parts} parts (RADQ_MAX_ARCHIVE_MEMBERS)"
            )
        media = headers.get("content-type", DICOM).split(";")[0].strip().lower() or DICOM
        part = Part(number, media, None)
        return self._spool(part) if media == DICOM else part

    def _headers_finished(self) -> None:
        self._part = self._open(len(self.parts) + 1, self._headers)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part is None:
            return
        if self._out is not None:
            view = memoryview(data)[start:end]
            with room_for(_label(self._part)):
                self._out.write(view)
            if self._digest is not None:
                self._digest.update(view)
        else:
            self._unspooled(self._part, data[start:end])
        self._part.size += end - start

    def _unspooled(self, part: Part, data: bytes) -> None:
        """Bytes of a part not spooled: a refused part's count against the limit, unkept."""

    def _part_end(self) -> None:
        if self._out is not None and self._part is not None:
            out, self._out = self._out, None
            with room_for(_label(self._part)):
                out.close()  # writes what it buffered
            if self._digest is not None:
                self._part.sha256 = self._digest.hexdigest()
        if self._part is not None:
            self.parts.append(self._part)
            self._part = None

    def _end(self) -> None:
        self.complete = True

    def feed(self, chunk: bytes) -> None:
        """Parse the next bytes of the body.

        Raises:
            LimitExceeded: the body passes ``max_bytes`` or has more than ``max_parts`` parts.
            MalformedMultipart: the bytes are not multipart with this boundary.
            StorageFull: the spool's disk is down to its reserve, or has no room.
        """
        self.received += len(chunk)
        if self.received > self.max_bytes:
            raise LimitExceeded(
                f"request body is over the limit of {self.max_bytes} bytes (RADQ_MAX_UPLOAD_BYTES)"
            )
        if self.reserve is not None:
            self.reserve.check("the request's body")
        try:
            self._parser.write(chunk)
        except FormParserError as exc:
            if not self._begun:
                raise MalformedMultipart(
                    f"malformed {self.kind} body: it does not begin with --{self.boundary}, "
                    "the boundary named in the Content-Type"
                ) from None
            raise MalformedMultipart(
                f"malformed {self.kind} body after {len(self.parts)} complete part(s): {exc}"
            ) from None

    def finish(self) -> list[Part]:
        """The parts, once the whole body has been fed.

        Raises:
            MalformedMultipart: the closing boundary never came (a body cut short), or
                the body holds no parts.
        """
        if not self.complete:
            raise MalformedMultipart(
                f"the {self.kind} body ends after {len(self.parts)} complete part(s) without its "
                f"closing boundary --{self.boundary}--: the upload was cut short or the boundary is "
                "wrong; nothing was stored"
            )
        if not self.parts:
            raise MalformedMultipart(f"the {self.kind} body has no parts: {self.no_parts_hint}")
        return self.parts

    def cleanup(self) -> None:
        """Close any open part file and delete the spool."""
        if self._out is not None:
            out, self._out = self._out, None
            with suppress(OSError):  # its buffer cannot be written (disk full): it goes anyway
                out.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class FormSpool(PartSpool):
    """Splits a ``multipart/form-data`` body as it is fed: a part with a filename is a file,
    spooled; any other is a field, its value (at most :data:`MAX_FIELD_BYTES`) in memory.
    A tar(.gz) file is expanded as it arrives (:class:`api.tar_stream.TarExpansion`): its
    members are spooled instead of the archive, within ``max_parts`` members and
    ``max_ratio``. A zip is spooled whole (its directory is at its end).

    ``max_parts`` counts the files; more is a 400 (:class:`SubmissionError`), as Starlette's
    form parser answered, rather than a 413. At most :data:`MAX_FIELDS` fields.
    """

    kind = "multipart/form-data"
    no_parts_hint = "send files as 'files' parts"
    prefix = ".upload-"
    _files = 0
    _fields = 0
    _stored = 0  # bytes in the spool's files so far: the expansions' budget
    _expansion: TarExpansion | None = None

    def __init__(
        self,
        boundary: bytes,
        parent: Path,
        *,
        max_bytes: int,
        max_parts: int,
        max_ratio: float = 200.0,
        reserve: DiskReserve | None = None,
    ) -> None:
        super().__init__(boundary, parent, max_bytes=max_bytes, max_parts=max_parts, reserve=reserve)
        self.limits = ArchiveLimits(max_parts, max_ratio)

    def _unspooled(self, part: Part, data: bytes) -> None:
        if self._expansion is not None:
            self._expansion.write(data)
            return
        if len(part.value) + len(data) > MAX_FIELD_BYTES:
            raise LimitExceeded(
                f"form field {part.name!r} is longer than {MAX_FIELD_BYTES} bytes; send files as parts "
                "with a filename"
            )
        part.value += data

    def _open(self, number: int, headers: dict[str, str]) -> Part:
        _, options = parse_options_header(headers.get("content-disposition", ""))
        if b"name" not in options:
            raise MalformedMultipart(
                f"part {number} of the multipart/form-data body has no name in its Content-Disposition"
            )
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        part = Part(number, media, None, name=_decoded(options[b"name"]))
        if b"filename" not in options:
            self._fields += 1
            if self._fields > MAX_FIELDS:
                raise MalformedMultipart(
                    f"the multipart/form-data body has more than {MAX_FIELDS} fields besides its files; "
                    "radq's options are a handful"
                )
            return part
        self._files += 1
        if self._files > self.max_parts:  # a 400, as Starlette's form parser gave
            raise SubmissionError(
                f"the request has more than {self.max_parts} files (RADQ_MAX_ARCHIVE_MEMBERS)"
            )
        part.filename = _decoded(options[b"filename"])
        if is_tar_name(part.filename):
            budget = self.max_bytes - self._stored
            into = self.directory / f"{number:06d}"
            self._expansion = TarExpansion(
                part.filename, into, self.limits, max_bytes=budget, reserve=self.reserve
            )
            return part
        return self._spool(part, hashed=not is_archive_name(part.filename))  # a zip is expanded later

    def _part_end(self) -> None:
        if self._expansion is not None and self._part is not None:
            expansion, self._expansion = self._expansion, None
            self._part.members = expansion.close()
            self._stored += expansion.stored
        elif self._part is not None and self._part.filename is not None:
            self._stored += self._part.size
        super()._part_end()

    def cleanup(self) -> None:
        if self._expansion is not None:
            self._expansion.abort()
            self._expansion = None
        super().cleanup()

    @property
    def files(self) -> list[Part]:
        return [p for p in self.parts if p.filename is not None]

    def add_to(self, ingest: Ingest) -> None:
        """Stage the files in ``ingest``, in their order: a tar's members as they were
        expanded on arrival, a zip expanded from its spool, any other file as spooled."""
        for part in self.files:
            if part.members is not None:
                ingest.add_spooled_files(part.members)
            elif part.path is not None:
                ingest.add_spooled(part.filename or "upload", part.path, part.sha256, part.size)

    @property
    def fields(self) -> list[tuple[str, str]]:
        return [(p.name, _decoded(p.value)) for p in self.parts if p.filename is None]


STALE_SPOOL_S = 24 * 3600.0
"""Age after which a request's spool directory is taken for one its API process left behind."""


def remove_stale_spools(parent: Path, *, older_than_s: float = STALE_SPOOL_S) -> int:
    """Delete spool directories that an API process killed mid-request left in ``parent``.

    Every request removes its own spool as it ends; only a process that died mid-request
    leaves one. Directories younger than ``older_than_s`` may belong to a live request of
    another API process sharing the directory, and stay. Returns how many were removed.
    """
    cutoff = time.time() - older_than_s
    removed = 0
    try:
        prefixes = (PartSpool.prefix, FormSpool.prefix, INGEST_PREFIX)
        candidates = [p for p in parent.iterdir() if p.name.startswith(prefixes)]
    except FileNotFoundError:
        return 0
    for path in candidates:
        try:
            if path.is_dir() and path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
        except FileNotFoundError:  # another API process removed it first
            continue
    return removed


def form_boundary(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type.

    Raises:
        MalformedMultipart: it has none.
    """
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary", b"")
    if not boundary:
        raise MalformedMultipart(
            "the Content-Type multipart/form-data has no boundary parameter: let the HTTP client "
            "build the body and its header"
        )
    return boundary


async def spool_body(request: Request, spool: PartSpool) -> list[Part]:
    """Feed ``request``'s body to ``spool`` as it arrives, parsing in a thread a megabyte at
    a time; the parts once the closing boundary has come (see :meth:`PartSpool.finish`).

    Raises:
        StorageFull: the body's declared length would take the spool's disk past its
            reserve (checked before any of it is read), or it did so while arriving.
    """
    declared = request.headers.get("content-length", "")
    if spool.reserve is not None and declared.isdigit():
        spool.reserve.check("the request's body", int(declared))
    pending: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        pending.append(chunk)
        size += len(chunk)
        if size >= FEED_BYTES:
            await run_in_threadpool(spool.feed, b"".join(pending))
            pending, size = [], 0
    if pending:
        await run_in_threadpool(spool.feed, b"".join(pending))
    return spool.finish()
