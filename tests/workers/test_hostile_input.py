"""Hostile input: mutated real DICOM files end as model inputs or as a precise reason.

Every file goes through what a worker does to one instance (``workers.prepare``):
:func:`read_header`, :func:`check_image`, then :func:`decode` once per frame policy and
:func:`preprocess` once per model card, with the ``RADQ_MAX_IMAGE_PIXELS`` default. The
property: either every card gets a finite float32 input of its shape, or an
``InstanceError`` leaves with a reason that says what is wrong with the file. Any other
exception (``IndexError``, ``struct.error``, ``RecursionError``, ``MemoryError``...) is
a bug, and so is a reason from a last-resort guard ("unexpected ...").

The fuzz test is derandomized, so CI runs the same examples every time. To search
longer locally: ``RADQ_FUZZ_EXAMPLES=5000 pytest tests/workers/test_hostile_input.py``
(with ``RADQ_FUZZ_RANDOM=1`` for fresh examples on every run).
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, note, settings
from hypothesis import strategies as st
from pydicom.dataelem import DataElement
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, RLELossless

from db.status import InstanceStatus, StorageKind
from db.work import Claimed
from radq.blobs import sha256_of
from radq.errors import (
    ImageTooLarge,
    InstanceError,
    MalformedDicom,
    NoImage,
    NotDicom,
    TruncatedPixelData,
    UndecodablePixels,
)
from radq.model_card import FramePolicy, ModelCard
from radq.settings import BUNDLED_MODEL_DIR, Settings
from tests.conftest import REPO, Stack
from tests.jobwait import wait_done
from tests.workers import hostile_files as hostile
from tests.workers.dicom_files import lut_sequence, write_image
from workers.decode import MAX_FRAMES, check_image, decode
from workers.header import MAX_INFLATED_BYTES, is_storable, is_uid, read_header
from workers.prepare import content_keys, inspect, load
from workers.preprocess import preprocess
from workers.procpool import ProcessPool

MAX_PIXELS: int = Settings.model_fields["max_image_pixels"].default
EXAMPLES = int(os.environ.get("RADQ_FUZZ_EXAMPLES", "1000"))
SOURCES = [hostile.source(path) for path in hostile.REAL]

_bundled = [
    ModelCard.model_validate_json((d / "model.json").read_text()) for d in sorted(BUNDLED_MODEL_DIR.iterdir())
]
_smoke = next(card for card in _bundled if card.name == "radq-smoke")


def _with_frame_policy(card: ModelCard, policy: FramePolicy) -> ModelCard:
    preprocessing = card.preprocessing.model_copy(update={"frame": policy})
    return card.model_copy(update={"name": f"{card.name}-{policy}", "preprocessing": preprocessing})


# The bundled cards use the middle frame and the maximum; these two cover the other policies.
CARDS = _bundled + [_with_frame_policy(_smoke, "all"), _with_frame_policy(_smoke, "first")]

# The reasons per-file failures give; each names what is wrong after the colon.
REASON_STARTS = (
    "empty file",
    "gzip-compressed file",
    "zip archive",
    "not a DICOM file:",
    "malformed DICOM",
    "no image:",
    "truncated pixel data:",
    "invalid image header:",
    "unsupported transfer syntax",
    "image too large:",
    "pixel data is compressed but",
    "pixel data is not encapsulated but",
    "malformed encapsulated pixel data:",
    "could not decode pixel data (",
    "unusable Modality LUT Sequence:",
    "unusable VOI LUT Sequence:",
    "pixel values out of range:",
    "PALETTE COLOR",
)

LAST_RESORT = re.compile(r"unexpected ([A-Z]\w+|error while)")
"""What the last-resort guards say ("unexpected IndexError ..."): each is a bug to fix."""


def process(path: Path) -> list[np.ndarray] | InstanceError:
    """What ``workers.prepare`` does to one file for every card: inputs, or the failure."""
    try:
        ds, meta, notes = read_header(path)
        check_image(ds, meta)
        images = {}
        inputs = []
        for card in CARDS:
            policy = card.preprocessing.frame
            if policy not in images:
                images[policy] = decode(ds, meta, notes, max_pixels=MAX_PIXELS, frame=policy)
            image = images[policy]
            out = preprocess(image, card.input, card.preprocessing)
            frames = image.pixels.shape[0]
            assert 1 <= frames <= (MAX_FRAMES if policy == "all" else 1), (policy, image.pixels.shape)
            assert out.shape == (frames, card.input.channels, card.input.height, card.input.width)
            assert out.dtype == np.float32 and out.flags.c_contiguous
            assert np.isfinite(out).all(), f"{card.name}: non-finite model input"
            inputs.append(out)
        return inputs
    except InstanceError as exc:
        return exc


def assert_precise(exc: InstanceError) -> None:
    """The reason is one line that starts with a known kind of failure and says more."""
    reason = exc.reason
    assert reason and reason == reason.strip() and len(reason) <= 600, reason
    assert is_storable(reason), f"control characters in {reason!r}"  # PostgreSQL refuses NUL
    assert reason.startswith(REASON_STARTS), f"reason of an unknown kind: {reason!r}"
    assert not LAST_RESORT.search(reason), f"a last-resort guard answered: {reason!r}"
    kind, _, detail = reason.partition(":")
    assert len(detail.strip()) >= 5 or kind.startswith(("empty file", "gzip", "zip")), reason
    cause = exc.__context__
    if cause is not None and not isinstance(cause, InstanceError):  # translated: more than the bare message
        assert reason != str(cause).strip(), reason
    assert exc.status == (InstanceStatus.SKIPPED if isinstance(exc, NoImage) else InstanceStatus.FAILED)


def outcome(tmp_path: Path, data: bytes) -> list[np.ndarray] | InstanceError:
    path = tmp_path / "hostile.dcm"
    path.write_bytes(data)
    result = process(path)
    if isinstance(result, InstanceError):
        if currently_in_test_context():
            note(f"{type(result).__name__}: {result.reason}")
        assert_precise(result)
    return result


# --- the fuzz test -------------------------------------------------------------------

_GEOMETRY: dict[str, list[object]] = {
    "Rows": [0, 1, 2, 255, 4096, 65535, None],
    "Columns": [0, 1, 3, 65535, None],
    "NumberOfFrames": ["0", "1", "2", "3", "65", "65535", "2147483647", "-1", None],
    "SamplesPerPixel": [0, 1, 2, 3, 4, 255, 65535, None],
    "BitsAllocated": [0, 1, 7, 8, 12, 16, 24, 32, 64, 128, 65535, None],
    "BitsStored": [0, 1, 8, 12, 16, 17, 32, 64, 65535, None],
    "HighBit": [0, 7, 15, 31, 65535, None],
    "PixelRepresentation": [0, 1, 2, 65535, None],
    "PlanarConfiguration": [0, 1, 2, None],
    "PhotometricInterpretation": ["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL_422",
                                  "YBR_ICT", "HSV", "", None],  # fmt: skip
    "RescaleSlope": ["0", "-1", "1e-30", "1e30", "3.4e38", "1e308", "nan", "inf", "-inf", None],
    "RescaleIntercept": ["-1e308", "1e38", "nan", "inf", "-32768", None],
    "WindowCenter": ["nan", "inf", "1e308", "-1e308", "0", None],
    "WindowWidth": ["0", "-1", "1", "1e-30", "1e308", "nan", "inf", None],
    "VOILUTFunction": ["SIGMOID", "LINEAR_EXACT", "BOGUS", None],
}


_PALETTE = {  # 256 entries of 16 bits declared; the data: red 1 entry, green and blue none
    f"{colour}PaletteColorLookupTableDescriptor": DataElement(0x00281101 + n, "US", [256, 0, 16])
    for n, colour in enumerate(("Red", "Green", "Blue"))
}
_LUTS: list[dict[str, object]] = [
    {"VOILUTSequence": lut_sequence([0, 0, 16], [0, 1])},  # 65536 entries declared, 2 held
    {"VOILUTSequence": lut_sequence([4, 0, 99], [0, 1, 2, 3])},  # 99-bit entries
    {"VOILUTSequence": lut_sequence([4, 65535, 16], None)},  # no LUT Data
    {"VOILUTSequence": Sequence([])},
    {"ModalityLUTSequence": lut_sequence([4096, 0, 16], [7], ModalityLUTType="HU")},
    {"ModalityLUTSequence": lut_sequence([0, 0, 0], [], ModalityLUTType="HU")},
    {"PhotometricInterpretation": "PALETTE COLOR"},  # and no palette
    {"PhotometricInterpretation": "PALETTE COLOR", **_PALETTE, "RedPaletteColorLookupTableData": b"\0\1"},
]
"""Display tables that do not fit their pixels or their own descriptors."""


def _mutated_elements(draw: st.DrawFn, src: hostile.Source, values: dict[str, object] | None = None) -> bytes:
    if values is None:
        chosen = draw(st.lists(st.sampled_from(sorted(_GEOMETRY)), min_size=1, max_size=3, unique=True))
        values = {keyword: draw(st.sampled_from(_GEOMETRY[keyword])) for keyword in chosen}
    note(f"elements set: {values}")
    path = next(p for p in hostile.REAL if p.name == src.name)
    with warnings.catch_warnings():  # pydicom warns on writing invalid values: that is the point
        warnings.simplefilter("ignore")
        try:
            return hostile.set_elements(path, **values)
        except Exception as exc:  # pydicom cannot even write it (a US of 2**32): mutate bytes instead
            note(f"pydicom would not write {values}: {type(exc).__name__}")
            return src.data


def _whole_file(draw: st.DrawFn, src: hostile.Source) -> bytes:
    kind = draw(st.sampled_from(["empty", "random", "text", "gzip", "zip", "preamble", "bare"]))
    note(f"whole file: {kind}")
    if kind == "empty":
        return b""
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=4096))
    if kind == "text":
        return draw(st.text(min_size=1, max_size=500)).encode()
    if kind == "gzip":
        return hostile.gzipped(src.data)
    if kind == "zip":
        return hostile.zipped(src.data)
    if kind == "preamble":  # DICM, then bytes that are no file meta
        return hostile.preamble_then(draw(st.binary(max_size=512)))
    start = src.data.find(b"DICM")
    return src.data[start + 4 :] if start >= 0 else src.data  # the file meta and data set, bare


@st.composite
def hostile_bytes(draw: st.DrawFn) -> bytes:
    """A real file, mutated once structurally and then up to twice more byte by byte."""
    src = draw(st.sampled_from(SOURCES))
    data = src.data
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "length", "big", "elements", "lut",
                                 "codestream", "nest", "whole"]))  # fmt: skip
    note(f"source {src.name}, mutation {kind}")
    if kind == "length":
        which, value = draw(st.integers(0, 10_000)), draw(st.sampled_from(hostile.BIG_VALUES))
        data = hostile.wrong_length(src, which, value)
    elif kind == "elements":
        data = _mutated_elements(draw, src)
    elif kind == "lut":
        data = _mutated_elements(draw, src, draw(st.sampled_from(_LUTS)))
    elif kind == "codestream":
        size = st.sampled_from([0, 1, 7, 4096, 65535, 1 << 20, 0xFFFFFFFF])
        data = hostile.codestream_size(src, draw(size), draw(size))
    elif kind == "nest":
        depth = draw(st.one_of(st.integers(1, 40), st.integers(100, 200), st.integers(1000, 5000)))
        note(f"depth {depth}")
        data = hostile.nest_before_pixels(src, depth)
    elif kind == "whole":
        return _whole_file(draw, src)
    else:
        data = _byte_mutation(draw, data, kind)
    for extra in draw(st.lists(st.sampled_from(["truncate", "flip", "overwrite", "big"]), max_size=2)):
        data = _byte_mutation(draw, data, extra) if data else data
    return data


def _byte_mutation(draw: st.DrawFn, data: bytes, kind: str) -> bytes:
    at = draw(st.integers(0, max(0, len(data) - 1)))
    if kind == "truncate":
        return hostile.truncate(data, at)
    if kind == "flip":
        return hostile.flip_bits(data, draw(st.lists(st.integers(0, 8 * len(data)), min_size=1, max_size=16)))
    if kind == "big":
        value = draw(st.sampled_from(hostile.BIG_VALUES))
        return hostile.overwrite(data, at, value.to_bytes(4, draw(st.sampled_from(["little", "big"]))))
    return hostile.overwrite(data, at, draw(st.binary(min_size=1, max_size=16)))


@settings(
    max_examples=EXAMPLES,
    derandomize=not os.environ.get("RADQ_FUZZ_RANDOM"),
    database=None,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,  # tmp_path: each example overwrites the one file
    ],
)
@given(data=hostile_bytes())
def test_mutated_real_files_end_as_inputs_or_a_precise_reason(tmp_path: Path, data: bytes) -> None:
    result = outcome(tmp_path, data)  # --hypothesis-show-statistics shows how they ended
    event("model inputs" if isinstance(result, list) else type(result).__name__)


def test_the_fuzz_run_kept_memory_bounded(tmp_path: Path) -> None:
    """Across a run of hostile files in this process, the peak grows by less than 1 GiB."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    corpus = [hostile.codestream_size(s, 65535, 65535) for s in SOURCES if s.encapsulated]
    corpus += [hostile.nest_before_pixels(s, 5000) for s in SOURCES[:3]]
    for data in corpus:
        outcome(tmp_path, data)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 1 << 20, f"peak memory grew by {grown_kib // 1024} MiB"


# --- named hostile files, each with its reason ----------------------------------------


def _named(name: str) -> hostile.Source:
    return next(s for s in SOURCES if s.name == name)


def _path(name: str) -> Path:
    return next(p for p in hostile.REAL if p.name == name)


CASES: dict[str, tuple[Callable[[], bytes], type[InstanceError], str]] = {
    "empty": (lambda: b"", NotDicom, "empty file (0 bytes)"),
    "gzip": (lambda: hostile.gzipped(_named("MR_small.dcm").data), NotDicom, "gzip-compressed file"),
    "zip": (lambda: hostile.zipped(_named("MR_small.dcm").data), NotDicom, "zip archive"),
    "text": (lambda: b"hello, not an image\n" * 20, NotDicom, "starts with text 'hello, not an image"),
    "preamble only": (lambda: hostile.preamble_then(b""), MalformedDicom, "malformed DICOM: no data set"),
    "cut in the header": (
        lambda: _named("CT_small.dcm").data[:700],
        MalformedDicom,
        "the 6 byte(s) after element (0008,0070) are no data element (cut short? corrupt?)",
    ),
    "cut in the pixels": (
        lambda: _named("CT_small.dcm").data[:-1000],
        TruncatedPixelData,
        "truncated pixel data: expected 32768 bytes",
    ),
    "sequences 5000 deep": (
        lambda: hostile.nest_before_pixels(_named("CT_small.dcm"), 5000),
        MalformedDicom,
        "malformed DICOM: sequences nested too deeply",
    ),
    "sequences 5000 deep, implicit VR": (
        lambda: hostile.nest_before_pixels(_named("MR_small_implicit.dcm"), 5000),
        MalformedDicom,
        "malformed DICOM: sequences nested too deeply",
    ),
    "65535 x 65535 in 32 KB": (
        lambda: hostile.set_elements(_path("CT_small.dcm"), Rows=65535, Columns=65535),
        TruncatedPixelData,
        "expected 8589672450 bytes, found 32768",
    ),
    "2**31-1 frames, native": (
        lambda: hostile.set_elements(_path("CT_small.dcm"), NumberOfFrames="2147483647"),
        TruncatedPixelData,
        "truncated pixel data: expected 70368744144896 bytes",
    ),
    "2**31-1 frames, JPEG 2000": (
        lambda: hostile.set_elements(_path("JPEG2000.dcm"), NumberOfFrames="2147483647"),
        UndecodablePixels,
        "NumberOfFrames is 2147483647 but the encapsulated pixel data holds 1 fragment",
    ),
    "65535 x 65535 JPEG codestream": (
        lambda: hostile.codestream_size(_named("JPGExtended.dcm"), 65535, 65535),
        UndecodablePixels,
        "JPEG codestream is 65535 rows x 65535 columns x 1 component(s), the header says 1024 x 256 x 1",
    ),
    "60000 x 60000 JPEG 2000 codestream": (
        lambda: hostile.codestream_size(_named("JPEG2000.dcm"), 60000, 60000),
        UndecodablePixels,
        "JPEG 2000 codestream is 60000 rows x 60000 columns x 1 component(s)",
    ),
    "JPEG codestream cut short": (  # libjpeg 9 and libjpeg-turbo decode the rest as blank
        lambda: hostile.cut_codestream(_path("JPGExtended.dcm"), lambda f: len(f) * 3 // 5),
        TruncatedPixelData,
        "truncated pixel data: frame 0's JPEG codestream (JPEG Extended (Process 2 and 4)) stops after 4098 "
        "bytes without its end-of-image marker",
    ),
    "JPEG-LS codestream cut short": (  # CharLS gives back what it decoded, with a warning
        lambda: hostile.cut_codestream(_path("JPEGLSNearLossless_16.dcm"), lambda f: len(f) * 3 // 5),
        TruncatedPixelData,
        "frame 0's JPEG-LS codestream (JPEG-LS Lossy (Near-Lossless) Image Compression) stops after 90 bytes",
    ),
    "JPEG 2000 codestream cut short": (
        lambda: hostile.cut_codestream(_path("examples_jpeg2k.dcm"), lambda f: len(f) * 3 // 5),
        TruncatedPixelData,
        "JPEG 2000 codestream (JPEG 2000 Image Compression (Lossless Only)) stops after 91376 bytes without "
        "its end-of-codestream marker",
    ),
    "JPEG lossless codestream with no scan": (  # decoded as a blank image, before the check
        lambda: hostile.cut_codestream(_path("SC_rgb_jpeg_gdcm.dcm"), lambda f: f.find(b"\xff\xda")),
        UndecodablePixels,
        "frame 0's JPEG codestream holds no image data (its headers end without a start-of-scan marker)",
    ),
    "JPEG 2000 codestream with no data": (
        lambda: hostile.cut_codestream(_path("JPEG2000.dcm"), lambda f: f.find(b"\xff\x93")),
        UndecodablePixels,
        "frame 0's JPEG 2000 codestream holds no image data (its headers end without a start-of-data marker)",
    ),
    "9000 x 9000 from 664 bytes of RLE": (
        lambda: hostile.set_elements(_path("SC_rgb_rle.dcm"), Rows=9000, Columns=9000),
        UndecodablePixels,
        "holds 664 bytes of RLE data, too few for 9000 x 9000 x 3",
    ),
    "16000 x 16000 over the limit": (
        lambda: hostile.set_elements(_path("SC_rgb_rle.dcm"), Rows=16000, Columns=16000),
        ImageTooLarge,
        "image too large: 16000 rows x 16000 columns",
    ),
    "a 4-byte element length of 0xFFFFFFF0": (
        lambda: hostile.wrong_length(_named("CT_small.dcm"), 235, 0xFFFFFFF0),
        MalformedDicom,
        "the file ends at byte 39206, inside element (0043,1028), which declares 4294967280 bytes",
    ),
    "a 2-byte element length of 0xFFFE": (
        lambda: hostile.wrong_length(_named("CT_small.dcm"), 5, 0xFFFE),
        MalformedDicom,
        "the file ends at byte 39206, inside element (0008,0018), which declares 65534 bytes",
    ),
    "BitsStored of 128 values": (  # a 4-byte overwrite of its length, found by the fuzz test
        lambda: hostile.overwrite(_named("CT5N_2062.dcm").data, 2428, (0x10000).to_bytes(4, "big")),
        UndecodablePixels,
        "invalid image header: BitsStored is [16, 40, 258",
    ),
    "Rows of an unknown VR": (
        lambda: _unknown_vr_rows(),
        UndecodablePixels,
        "invalid image header: Rows cannot be read: an element has an invalid value representation",
    ),
    "a UID that swallows the file": (
        lambda: _uid_swallowing_the_file(),
        MalformedDicom,
        "the file ends at byte 2298, inside element (0008,0016), which declares 2100 bytes",
    ),
    "cut between two elements": (  # nothing tells a cut file from a header-only copy
        lambda: _named("CT_small.dcm").data[:694],
        NoImage,
        "no image: CT (CT Image Storage) has no Pixel Data, which it requires (a header-only copy?)",
    ),
}


def _uid_swallowing_the_file() -> bytes:
    """SOP Class UID's length grown by 2 KB: its value runs through the rest of the header."""
    src = _named("CR2_6247.dcm")
    at = src.data.find(b"\x08\x00\x16\x00UI")  # (0008,0016), explicit VR, 2-byte length
    return hostile.overwrite(src.data, at + 6, (2100).to_bytes(2, "little"))


def _unknown_vr_rows() -> bytes:
    src = _named("CT_small.dcm")
    at = src.data.find(b"\x28\x00\x10\x00US")  # (0028,0010) Rows, explicit VR
    return hostile.overwrite(src.data, at + 4, b"QQ")


@pytest.mark.parametrize("case", sorted(CASES))
def test_named_hostile_files_give_their_reason(tmp_path: Path, case: str) -> None:
    make, kind, expected = CASES[case]
    result = outcome(tmp_path, make())
    assert isinstance(result, kind), result
    assert expected in result.reason


def test_deflate_bomb_is_refused_before_inflating(tmp_path: Path) -> None:
    path = tmp_path / "bomb.dcm"
    path.write_bytes(hostile.deflate_bomb(MAX_INFLATED_BYTES + (64 << 20)))
    with pytest.raises(MalformedDicom, match="inflates to more than 1073741824 bytes"):
        read_header(path)


def test_sequences_nested_a_little_are_still_read(tmp_path: Path) -> None:
    result = outcome(tmp_path, hostile.nest_before_pixels(_named("CT_small.dcm"), 30))
    assert not isinstance(result, InstanceError), result.reason


def test_a_deflated_file_within_the_limit_is_still_read(tmp_path: Path) -> None:
    path = write_image(tmp_path / "deflated.dcm", np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path)
    result = process(path)
    assert not isinstance(result, InstanceError), result.reason


def test_an_encapsulated_frame_count_within_its_fragments_decodes(tmp_path: Path) -> None:
    pixels = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8)
    path = write_image(tmp_path / "rle.dcm", pixels, syntax=RLELossless)
    result = process(path)
    assert not isinstance(result, InstanceError), result.reason
    path = write_image(tmp_path / "plain.dcm", pixels, syntax=ExplicitVRLittleEndian)
    assert not isinstance(process(path), InstanceError)


# --- memory: the bombs, in a process of their own -------------------------------------

_CHILD = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a regression fails here, not the host
from pathlib import Path
from radq.errors import InstanceError
from workers.decode import check_image, decode
from workers.header import read_header
reasons = []
for name in sys.argv[2:]:
    try:
        ds, meta, notes = read_header(Path(name))
        check_image(ds, meta)
        for policy in ("middle", "max", "all"):
            decode(ds, meta, notes, max_pixels=int(sys.argv[1]), frame=policy)
        reasons.append(None)
    except InstanceError as exc:
        reasons.append(exc.reason)
# VmHWM: this program's own peak; ru_maxrss would count the forking parent's too (Linux).
status = Path("/proc/self/status")
if status.exists():
    peak = int(next(l for l in status.read_text().splitlines() if l.startswith("VmHWM")).split()[1])
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"reasons": reasons, "peak_kib": peak}))
"""


def test_bombs_are_refused_before_any_allocation(tmp_path: Path) -> None:
    """Files declaring gigabytes they do not hold: a fresh process's peak stays small.

    Each was a real allocation before it was refused: 16 GB for the JPEG, 20 GB for the
    JPEG 2000, 243 MB for the RLE, a list of 2**31 frame numbers, a 1 GiB inflate.
    """
    corpus = {
        "jpeg": hostile.codestream_size(_named("JPGExtended.dcm"), 65535, 65535),
        "jpeg-ls": hostile.codestream_size(_named("SC_rgb_jls_lossy_line.dcm"), 65535, 65535),
        "jpeg2000": hostile.codestream_size(_named("JPEG2000.dcm"), 60000, 60000),
        "jpeg2000-rgb": hostile.codestream_size(_named("examples_jpeg2k.dcm"), 0xFFFFFFFF, 0xFFFFFFFF),
        "rle": hostile.set_elements(_path("SC_rgb_rle.dcm"), Rows=9000, Columns=9000),
        "frames": hostile.set_elements(_path("JPEG2000.dcm"), NumberOfFrames="2147483647"),
        "deflate": hostile.deflate_bomb(2 * MAX_INFLATED_BYTES),
    }
    paths = []
    for name, data in corpus.items():
        paths.append(tmp_path / f"{name}.dcm")
        paths[-1].write_bytes(data)
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(MAX_PIXELS), *map(str, paths)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(report["reasons"]), dict(zip(corpus, report["reasons"], strict=True))
    assert report["peak_kib"] < 512 << 10, f"peak {report['peak_kib'] >> 10} MiB: {report['reasons']}"


# --- the worker's own wrappers, in its decode threads ---------------------------------

KEY = b"hostile-input-test-pseudonym-key"
COLUMNS = {  # db.models.Instance: the columns metadata goes to, and their sizes
    "patient_pseudonym": 64,
    "sop_instance_uid": 64,
    "study_instance_uid": 64,
    "series_instance_uid": 64,
    "modality": 16,
    "body_part": 64,
    "series_description": 100_000,
    "notes": 100_000,
}


def test_the_worker_phases_record_each_hostile_file_with_its_reason(tmp_path: Path) -> None:
    """``content_keys``, ``inspect`` and ``load`` as the engine runs them: in its decode processes."""
    settings = Settings(home=tmp_path / "home")
    files = [make() for make, _, _ in CASES.values()] + list(_db_hostile_files().values())
    files += [hostile.truncate(s.data, len(s.data) // 2) for s in SOURCES]
    claimed = []
    for n, data in enumerate(files):
        path = tmp_path / f"{n}.dcm"
        path.write_bytes(data)
        claimed.append(Claimed(n, "job", path.name, StorageKind.PATH, str(path), 1))
    with ProcessPool(2, task_timeout=120, preload=("workers.prepare",)) as pool:
        keys = pool.submit(content_keys, [(c, Path(c.location)) for c in claimed]).result()
        for item, key in zip(claimed, keys, strict=True):  # a UID or none, never junk; the hash always
            assert key.sha256 == sha256_of(Path(item.location)), item.location
            assert key.sop_instance_uid is None or is_uid(key.sop_instance_uid), (item.location, key)
        headers = [pool.submit(inspect, c, Path(c.location), KEY) for c in claimed]
        loads = [
            pool.submit(load, c, Path(c.location), KEY, CARDS, settings.max_image_pixels) for c in claimed
        ]
        outcomes = []
        for header, loaded in zip(headers, loads, strict=True):
            first, second = header.result(), loaded.result()
            if first.status:  # what fails the header check fails the full read the same way
                assert (second.status, second.reason) == (first.status, first.reason)
            outcomes.append((second.status, second.reason, second.metadata))
    for item, (status, reason, metadata) in zip(claimed, outcomes, strict=True):
        # what the worker writes to its database columns: storable, and within their sizes
        for column, limit in COLUMNS.items():
            value = metadata.get(column)
            assert value is None or (isinstance(value, str) and len(value) <= limit and is_storable(value)), (
                item.location, column, value
            )  # fmt: skip
        if status is None:  # it decoded: every card has its input
            continue
        assert status in (InstanceStatus.FAILED, InstanceStatus.SKIPPED), (item.location, status)
        assert reason and reason.startswith(REASON_STARTS) and is_storable(reason), (item.location, reason)
        assert not LAST_RESORT.search(reason) and "file not readable" not in reason, reason
    assert sum(status is not None for status, _, _ in outcomes) >= len(CASES)


# --- end to end: a real worker process, its database, PostgreSQL included -------------


def _db_hostile_files() -> dict[str, bytes]:
    """Files whose header text a database refuses as is: NUL bytes, values past a column."""
    ct = _path("CT_small.dcm")
    with warnings.catch_warnings():  # pydicom warns on writing invalid values: that is the point
        warnings.simplefilter("ignore")
        return {
            "uid 300 long": hostile.set_elements(ct, SOPInstanceUID="1.2." + "3" * 300),
            "modality 40 long": hostile.set_elements(ct, Modality="X" * 40),
            "NUL in description": hostile.set_elements(ct, SeriesDescription="head\x00neck"),
            "NUL in photometric": hostile.set_elements(ct, PhotometricInterpretation="MONO\x00CHROME2"),
        }


def test_a_worker_process_survives_hostile_files_and_records_each(stack: Stack, tmp_path: Path) -> None:
    files = {name: make() for name, (make, _, _) in CASES.items()}
    files |= _db_hostile_files()
    files["intact"] = _named("CT_small.dcm").data
    paths = []
    for n, data in enumerate(files.values()):
        paths.append(tmp_path / f"{n:02d}.dcm")
        paths[-1].write_bytes(data)
    job = wait_done(stack.client, stack.client.upload(paths, models=["radq-smoke"])["id"], timeout=90)
    instances = {i["file_name"]: i for i in stack.client.instances(job["id"])}
    assert len(instances) == len(files)
    for (name, _), path in zip(files.items(), paths, strict=True):
        instance = instances[path.name]
        assert instance["status"] in ("done", "failed", "skipped"), (name, instance)
        if instance["status"] != "done":
            assert instance["reason"] and instance["reason"].startswith(REASON_STARTS), (name, instance)
            assert not LAST_RESORT.search(instance["reason"]), (name, instance)
    assert instances[paths[-1].name]["status"] == "done"
    assert instances[paths[-2].name]["status"] == "failed"  # NUL in Photometric Interpretation
    assert stack.worker.poll() is None, "the worker process died"
