"""workers.header: dataset, metadata and notes from the packaged DICOM files."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement

import radq
from radq.errors import NotDicom
from tests.workers.dicom_files import write_image
from workers.header import read_header

SAMPLES = Path(radq.__file__).resolve().parent / "samples"
BROKEN = sorted(p.relative_to(SAMPLES).as_posix() for p in (SAMPLES / "broken").iterdir() if p.is_file())

# Broken only in their pixels or for lack of them: the header still reads.
HEADER_READS = [
    "broken/CT_declares_4096_carries_10_bytes.dcm",
    "broken/MR_small_cut_in_pixels.dcm",
    "broken/structured_report_no_image.dcm",
    "broken/waveform_no_image.dcm",
]


@pytest.mark.parametrize("name", HEADER_READS)
def test_metadata_survives_a_failed_decode(name: str) -> None:
    ds, meta, notes = read_header(SAMPLES / name)
    assert meta.sop_instance_uid == ds.SOPInstanceUID
    assert meta.study_instance_uid and meta.modality


@pytest.mark.parametrize("name", sorted(set(BROKEN) - set(HEADER_READS)))
def test_other_broken_files_are_refused_before_any_pixels(name: str) -> None:
    # their exact reasons are checked end to end in test_decode
    with pytest.raises(NotDicom):
        read_header(SAMPLES / name)


def test_tolerant_read_records_what_it_tolerated() -> None:
    _, meta, notes = read_header(SAMPLES / "tolerant/no_meta_no_preamble.dcm")
    assert meta.modality == "CT"
    assert meta.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    assert "read without DICM preamble/file meta (tolerated)" in notes
    assert "skipped 1 stray byte(s) before the dataset (tolerated)" in notes
    assert any("assumed Explicit VR Little Endian" in note for note in notes)


@pytest.mark.parametrize("name", ["ExplVR_LitEndNoMeta.dcm", "ExplVR_BigEndNoMeta.dcm"])
def test_bare_datasets_without_preamble_are_read(name: str) -> None:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} not bundled with this pydicom")
    ds, meta, notes = read_header(Path(path))
    assert meta.sop_instance_uid == ds.SOPInstanceUID
    assert notes[0] == "read without DICM preamble/file meta (tolerated)"


def test_header_of_a_huge_file_leaves_its_pixels_in_the_file(tmp_path: Path) -> None:
    path = write_image(tmp_path / "huge.dcm", np.zeros((4096, 4096), dtype=np.uint16))  # 32 MiB
    tracemalloc.start()
    try:
        ds, meta, _ = read_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"read_header allocated {peak} bytes"
    element = ds.get_item("PixelData", keep_deferred=True)
    assert isinstance(element, RawDataElement)  # left as read: not converted, not loaded
    assert element.value is None and element.length == 4096 * 4096 * 2
    assert meta.sop_instance_uid == ds.SOPInstanceUID
