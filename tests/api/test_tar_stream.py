"""Tar uploads expanded while they arrive (api.tar_stream, through api.multipart.FormSpool)."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from api.multipart import FormSpool, form_boundary
from api.tar_stream import PIPE_BYTES
from radq.errors import LimitExceeded, SubmissionError
from tests.archives import tar_of
from tests.conftest import SAMPLES

FUZZ_EXAMPLES = int(os.environ.get("RADQ_FUZZ_EXAMPLES", "200"))
"""Damaged archives tried (more locally: ``RADQ_FUZZ_EXAMPLES=5000``)."""
REAL = {n: (SAMPLES / "real" / n).read_bytes() for n in ("CT_small.dcm", "MR_small.dcm", "CT5N_2062.dcm")}


def _form(files: list[tuple[str, bytes]]) -> tuple[bytes, bytes]:
    request = httpx.Request("POST", "http://radq/v1/jobs", files=[("files", f) for f in files])
    return request.read(), form_boundary(request.headers["content-type"])


def _spool(tmp_path: Path, boundary: bytes, **limits: float) -> FormSpool:
    return FormSpool(
        boundary, tmp_path, max_bytes=int(limits.get("max_bytes", 10**8)),
        max_parts=int(limits.get("max_parts", 1000)), max_ratio=limits.get("max_ratio", 200.0),
    )  # fmt: skip


def _within(seconds: float, action: Callable[[], object]) -> None:
    """Run ``action``; fail (rather than hang the suite) if it has not returned in time."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    if raised:
        raise raised[0]


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_members_are_on_disk_while_the_archive_still_arrives(tmp_path: Path, mode: str) -> None:
    members = {f"study/{i:03d}/{name}": data for i in range(20) for name, data in REAL.items()}
    body, boundary = _form(
        [("scans.tar" if mode == "w" else "scans.tgz", tar_of(members, mode)), ("x.dcm", b"x")]
    )
    spool = _spool(tmp_path, boundary)
    try:
        half = len(body) // 2
        for i in range(0, half, 8192):
            spool.feed(body[i : min(i + 8192, half)])
        # Half of the archive in, and its first members become files before the rest comes.
        deadline = time.monotonic() + 30
        while len([p for p in spool.directory.rglob("*") if p.is_file()]) < 10:
            assert time.monotonic() < deadline, "no members written while the archive arrives"
            time.sleep(0.01)
        spool.feed(body[half:])
        spool.finish()
        tar_part, plain = spool.files
        assert tar_part.path is None, "the archive itself is never written"
        assert tar_part.members is not None
        prefix = tar_part.filename
        assert [m.name for m in tar_part.members] == [f"{prefix}!{n}" for n in members]
        for member, data in zip(tar_part.members, members.values(), strict=True):
            assert member.path.read_bytes() == data
            assert (member.sha256, member.size) == (hashlib.sha256(data).hexdigest(), len(data))
        assert plain.path is not None and plain.path.read_bytes() == b"x"
    finally:
        spool.cleanup()
    assert list(tmp_path.iterdir()) == []


def test_two_tars_in_one_form_keep_their_members_apart(tmp_path: Path) -> None:
    body, boundary = _form(
        [("a.tar", tar_of({"ct.dcm": REAL["CT_small.dcm"]})), ("b.tar", tar_of({"ct.dcm": b"y"}))]
    )
    spool = _spool(tmp_path, boundary)
    spool.feed(body)
    a, b = spool.finish()
    assert a.members and b.members
    assert [(m.name, m.path.read_bytes()) for m in a.members + b.members] == [
        ("a.tar!ct.dcm", REAL["CT_small.dcm"]),
        ("b.tar!ct.dcm", b"y"),
    ]
    spool.cleanup()


def test_a_bomb_is_refused_before_the_upload_ends(tmp_path: Path) -> None:
    bomb = tar_of({"mr.dcm": REAL["MR_small.dcm"], "bomb.dcm": b"\0" * 50_000_000}, mode="w:gz")
    body, boundary = _form([("bomb.tar.gz", bomb), ("after.dcm", b"\1" * 4_000_000)])
    spool = _spool(tmp_path, boundary)
    fed = 0
    with pytest.raises(LimitExceeded, match=r"bomb.tar.gz \(the tar stream, at member bomb.dcm\)"):
        for fed in range(0, len(body), 16384):
            _within(30, lambda: spool.feed(body[fed : fed + 16384]))  # noqa: B023
    assert fed < len(body) - 2_000_000, "refused while the upload still arrived"
    spool.cleanup()
    assert list(tmp_path.iterdir()) == []


def test_members_past_the_upload_limit_are_refused(tmp_path: Path) -> None:
    archive = tar_of({f"{i}.dcm": REAL["CT_small.dcm"] for i in range(8)}, mode="w:gz")
    body, boundary = _form([("many.tar.gz", archive)])
    spool = _spool(tmp_path, boundary, max_bytes=len(body) + 100_000, max_ratio=10**6)
    with pytest.raises(
        LimitExceeded, match=r"many.tar.gz!\d.dcm \(submission total\) is larger .*RADQ_MAX_UPLOAD"
    ):
        spool.feed(body)
        spool.finish()
    spool.cleanup()


def test_too_many_members_are_refused(tmp_path: Path) -> None:
    body, boundary = _form([("many.tar", tar_of({f"{i}.dcm": b"x" for i in range(4)}))])
    spool = _spool(tmp_path, boundary, max_parts=3)
    with pytest.raises(LimitExceeded, match=r"many.tar has more than 3 members \(RADQ_MAX_ARCHIVE_MEMBERS\)"):
        spool.feed(body)
        spool.finish()
    spool.cleanup()


def test_a_file_named_tar_that_is_not_one_is_a_clear_error(tmp_path: Path) -> None:
    body, boundary = _form([("scans.tar", REAL["CT_small.dcm"])])
    spool = _spool(tmp_path, boundary)
    with pytest.raises(SubmissionError, match="scans.tar: not a readable tar archive"):
        spool.feed(body)
        spool.finish()
    spool.cleanup()
    assert list(tmp_path.iterdir()) == []


def test_bytes_after_the_end_of_the_archive_do_not_block_the_upload(tmp_path: Path) -> None:
    archive = tar_of({"ct.dcm": REAL["CT_small.dcm"]}) + b"\0" * (3 * PIPE_BYTES)
    body, boundary = _form([("padded.tar", archive)])
    spool = _spool(tmp_path, boundary)
    _within(30, lambda: spool.feed(body))
    (part,) = spool.finish()
    assert part.members and [m.name for m in part.members] == ["padded.tar!ct.dcm"]
    spool.cleanup()


def test_an_upload_cut_short_mid_archive_stops_the_expansion_and_leaves_nothing(tmp_path: Path) -> None:
    archive = tar_of({f"{i}.dcm": REAL["CT5N_2062.dcm"] for i in range(40)})
    body, boundary = _form([("cut.tar", archive)])
    spool = _spool(tmp_path, boundary)
    spool.feed(body[: len(body) // 2])
    expanding = [t for t in threading.enumerate() if t.name == "radq-tar-expand"]
    assert expanding, "the expansion runs while the part arrives"
    _within(30, spool.cleanup)  # the client went away: the thread, waiting for bytes, is stopped
    assert not any(t.is_alive() for t in expanding)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("cut", "reason"),
    [
        (
            "boundary",
            r"cut.tar: not a readable tar archive \(it stops at byte \d+ without its end-of-archive",
        ),
        ("header", r"cut.tar: not a readable tar archive \(the member header at byte \d+ is damaged or cut"),
        ("gzip", r"cut.tgz: not a readable tar archive \(its gzip header is cut short\)"),
    ],
)
def test_an_archive_cut_short_is_refused_not_read_as_fewer_members(
    tmp_path: Path, cut: str, reason: str
) -> None:
    """tarfile alone takes a tar cut between two members for a shorter archive."""
    whole = tar_of({"a.dcm": REAL["CT_small.dcm"], "b.dcm": REAL["MR_small.dcm"]})
    second = 512 + len(REAL["CT_small.dcm"]) + (-len(REAL["CT_small.dcm"]) % 512)  # b.dcm's header
    name, archive = {
        "boundary": ("cut.tar", whole[:second]),
        "header": ("cut.tar", whole[: second + 100]),
        "gzip": ("cut.tgz", tar_of({"a.dcm": b"x"}, mode="w:gz")[:3]),
    }[cut]
    body, boundary = _form([(name, archive)])
    spool = _spool(tmp_path, boundary)
    with pytest.raises(SubmissionError, match=reason):
        spool.feed(body)
        spool.finish()
    spool.cleanup()


# --- damaged archives: never a hang, never a wrong member -------------------------------

Upload = tuple[str, bytes, int]
"""An archive's name, its bytes, and the chunk size they arrive in."""
FUZZ_TAR = tar_of({f"s/{i}.dcm": data for i, data in enumerate(REAL.values())})
FUZZ_TGZ = tar_of({f"s/{i}.dcm": data for i, data in enumerate(REAL.values())}, mode="w:gz")


@st.composite
def damaged_uploads(draw: st.DrawFn) -> Upload:
    """A real tar or tar.gz, cut short, overwritten or left whole, and the chunk size it arrives in."""
    name, data = draw(st.sampled_from([("s.tar", FUZZ_TAR), ("s.tgz", FUZZ_TGZ)]))
    kind = draw(st.sampled_from(["whole", "cut", "overwrite"]))
    if kind == "cut":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "overwrite":
        at = draw(st.integers(0, len(data) - 1))
        patch = draw(st.binary(min_size=1, max_size=64))
        data = data[:at] + patch + data[at + len(patch) :]
    return name, data, draw(st.sampled_from([1000, 8192, 65536, 1 << 20]))


@settings(max_examples=FUZZ_EXAMPLES, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(upload=damaged_uploads())
def test_a_damaged_archive_gives_its_members_or_a_clear_error(
    tmp_path: Path, upload: tuple[str, bytes, int]
) -> None:
    name, archive, chunk = upload
    body, boundary = _form([(name, archive)])
    spool = _spool(tmp_path, boundary)
    try:

        def feed_all() -> None:
            for i in range(0, len(body), chunk):
                spool.feed(body[i : i + chunk])
            spool.finish()

        try:
            _within(30, feed_all)
        except (SubmissionError, LimitExceeded) as exc:  # LimitExceeded: a size overwritten to be huge
            assert str(exc), "the error says what is wrong"
            event(type(exc).__name__)
            return
        (part,) = spool.files
        assert part.members is not None
        for member in part.members:  # what was kept is what the path says, hashed right
            data = member.path.read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (member.size, member.sha256)
        assert len(part.members) == 3, "no member is dropped without an error"
        event(f"expanded, {len(part.members)} member(s)")
    finally:
        _within(30, spool.cleanup)
