"""A deterministic DICOM corpus: 512x512 CT series and 1024x1024 CR pairs.

Headers come from real sample files (``CT_small.dcm`` and ``CR2_6247.dcm`` from
pydicom's test data); pixels are synthetic anatomy (body outline, fat, lungs, heart,
spine, detector noise) so decoding and windowing do the work real images cause. The
same seed and label give the same bytes and the same UIDs.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid

SAMPLES = Path(__file__).resolve().parent.parent / "radq" / "samples" / "real"
CT_TEMPLATE = SAMPLES / "CT_small.dcm"
CR_TEMPLATE = SAMPLES / "CR2_6247.dcm"
CT_SIZE = 512
"""Rows and columns of a generated CT slice."""
CR_SIZE = 1024
"""Rows and columns of a generated CR image."""
SLICES_PER_STUDY = 50
"""CT slices per study (one series each); the last study takes the remainder."""
CR_VIEWS = 2
"""CR images per study (PA and lateral)."""
CR_SHARE = 0.125
"""Share of CR images in a corpus of N files."""
_STALE = ("SmallestImagePixelValue", "LargestImagePixelValue")  # their VR follows PixelRepresentation


@dataclass(frozen=True)
class Corpus:
    """Where a generated corpus lies and what it holds."""

    root: Path
    ct_files: int
    cr_files: int
    studies: int
    total_bytes: int
    seed: int

    @property
    def files(self) -> int:
        return self.ct_files + self.cr_files

    def describe(self) -> dict[str, object]:
        """What a report needs to say about the DICOM used."""
        return {
            "files": self.files,
            "studies": self.studies,
            "total_mb": round(self.total_bytes / 1e6, 1),
            "seed": self.seed,
            "transfer_syntax": "Explicit VR Little Endian (uncompressed)",
            "ct": {
                "files": self.ct_files,
                "image": f"{CT_SIZE}x{CT_SIZE} int16 MONOCHROME2, RescaleSlope 1, RescaleIntercept -1024, "
                "WC/WW 40/400",
                "slices_per_study": SLICES_PER_STUDY,
                "template": CT_TEMPLATE.name,
            },
            "cr": {
                "files": self.cr_files,
                "image": f"{CR_SIZE}x{CR_SIZE} uint16 (12 bits stored) MONOCHROME1, RescaleSlope 0.684, "
                "RescaleIntercept 200, WC/WW 1600/2800",
                "views_per_study": CR_VIEWS,
                "template": CR_TEMPLATE.name,
            },
        }


def split(n: int) -> tuple[int, int]:
    """``(ct_files, cr_files)`` for a corpus of ``n`` files, CR in whole pairs where possible."""
    cr = min(n, CR_VIEWS * round(n * CR_SHARE / CR_VIEWS)) if n >= 2 else 0
    return n - cr, cr


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    return axis[np.newaxis, :], axis[:, np.newaxis]


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    return ((x - np.float32(cx)) / np.float32(a)) ** 2 + ((y - np.float32(cy)) / np.float32(b)) ** 2 <= 1


def _ct_pixels(z: float, jitter: float, rng: np.random.Generator) -> np.ndarray:
    """One axial chest slice in stored values (HU + 1024); ``z`` in [0, 1] runs head to feet."""
    x, y = _grid(CT_SIZE)
    lung = math.sqrt(max(math.sin(math.pi * z), 0.0))
    body_b = 0.6 + 0.05 * math.sin(math.pi * z) + jitter
    hu = np.full((CT_SIZE, CT_SIZE), -1000.0, dtype=np.float32)
    hu[_ellipse(x, y, 0, 0.05, 0.88 + jitter, body_b)] = -90.0  # subcutaneous fat
    inner = _ellipse(x, y, 0, 0.05, 0.8 + jitter, body_b - 0.07)
    hu = np.where(inner, 40.0 + 20.0 * x + 15.0 * y, hu)  # soft tissue with a smooth gradient
    for side in (-1, 1):
        hu[_ellipse(x, y, side * 0.38, -0.02, 0.27 * lung + 1e-3, 0.38 * lung + 1e-3)] = -850.0
    hu[_ellipse(x, y, 0.12, 0.05, 0.22 * (1 - 0.5 * z), 0.2 * (1 - 0.5 * z))] = 45.0  # heart
    hu[_ellipse(x, y, -0.05, 0.3, 0.06, 0.06)] = 180.0  # contrast-filled aorta
    hu[_ellipse(x, y, 0, 0.5, 0.09, 0.08)] = 650.0  # vertebral cortex
    hu[_ellipse(x, y, 0, 0.5, 0.06, 0.05)] = 250.0  # marrow
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(18.0)
    return np.clip(np.rint(hu + 1024.0), -1024, 4000).astype(np.int16)


def _cr_pixels(view: int, jitter: float, rng: np.random.Generator) -> np.ndarray:
    """One chest radiograph in stored values; MONOCHROME1, so bright anatomy is low."""
    x, y = _grid(CR_SIZE)
    bright = np.zeros((CR_SIZE, CR_SIZE), dtype=np.float32)  # direct exposure displays black
    body = _ellipse(x, y, 0, 0.1, 0.8 - 0.25 * view + jitter, 0.95)
    bright = np.where(body, 0.45 + 0.1 * y, bright)
    lungs = np.zeros_like(body)
    for side in (-1, 1) if view == 0 else (0,):
        lungs |= _ellipse(x, y, side * 0.33 + jitter, -0.05, 0.25, 0.55)
    ribs = np.sin((y * 18 + 2 * x**2) * np.float32(math.pi)) > 0.6
    bright = np.where(lungs, np.where(ribs, 0.3, 0.18), bright)
    bright[_ellipse(x, y, 0.03, 0.0, 0.14, 0.6)] = 0.7  # mediastinum
    bright[np.broadcast_to((np.abs(x) < 0.06), bright.shape) & body] = 0.85  # spine
    bright += rng.standard_normal(bright.shape, dtype=np.float32) * np.float32(0.02)
    return np.clip(np.rint((1.0 - bright) * 4095.0), 0, 4095).astype(np.uint16)


def _uid(*parts: object) -> UID:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _template(path: Path) -> Dataset:
    ds = pydicom.dcmread(path)
    for keyword in _STALE:
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def _write(ds: Dataset, path: Path, sop_uid: UID) -> int:
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path.stat().st_size


def _write_ct(root: Path, count: int, seed: int, label: str, rng: np.random.Generator) -> tuple[int, int]:
    ds = _template(CT_TEMPLATE)
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelSpacing = [0.66, 0.66]
    ds.BodyPartExamined = "CHEST"
    ds.StudyDescription = "CT CHEST WITH CONTRAST (synthetic)"
    ds.SeriesDescription = "AXIAL 5mm (synthetic)"
    total, studies = 0, math.ceil(count / SLICES_PER_STUDY)
    for study in range(studies):
        slices = min(SLICES_PER_STUDY, count - study * SLICES_PER_STUDY)
        ds.StudyInstanceUID = _uid(label, seed, "ct-study", study)
        ds.SeriesInstanceUID = _uid(label, seed, "ct-series", study)
        ds.FrameOfReferenceUID = _uid(label, seed, "ct-frame", study)
        ds.PatientID, ds.PatientName = f"BENCH-CT-{study:03d}", f"Bench^CT{study:03d}"
        ds.AccessionNumber = ds.StudyID = f"{label}{study:03d}"
        jitter = float(rng.uniform(-0.04, 0.04))
        for i in range(slices):
            ds.set_pixel_data(_ct_pixels(i / max(slices - 1, 1), jitter, rng), "MONOCHROME2", 16,
                              generate_instance_uid=False)  # fmt: skip
            ds.InstanceNumber = i + 1
            ds.ImagePositionPatient = [-169.0, -169.0, -5.0 * i]
            ds.SliceLocation = -5.0 * i
            path = root / "ct" / f"study{study:03d}" / f"IM{i + 1:04d}.dcm"
            total += _write(ds, path, _uid(label, seed, "ct-sop", study, i))
    return total, studies


def _write_cr(root: Path, count: int, seed: int, label: str, rng: np.random.Generator) -> tuple[int, int]:
    ds = _template(CR_TEMPLATE)
    ds.BodyPartExamined = "CHEST"
    ds.StudyDescription = "XR CHEST 2 VIEWS (synthetic)"
    ds.ImagerPixelSpacing = [0.35, 0.35]
    total, studies = 0, math.ceil(count / CR_VIEWS)
    for study in range(studies):
        ds.StudyInstanceUID = _uid(label, seed, "cr-study", study)
        ds.PatientID, ds.PatientName = f"BENCH-CR-{study:03d}", f"Bench^CR{study:03d}"
        ds.AccessionNumber = ds.StudyID = f"{label}R{study:03d}"
        jitter = float(rng.uniform(-0.03, 0.03))
        for view in range(min(CR_VIEWS, count - study * CR_VIEWS)):
            ds.SeriesInstanceUID = _uid(label, seed, "cr-series", study, view)
            ds.SeriesNumber, ds.InstanceNumber = view + 1, 1
            ds.ViewPosition = ("PA", "LL")[view % 2]
            ds.SeriesDescription = f"CHEST {ds.ViewPosition} (synthetic)"
            ds.set_pixel_data(_cr_pixels(view % 2, jitter, rng), "MONOCHROME1", 12,
                              generate_instance_uid=False)  # fmt: skip
            path = root / "cr" / f"study{study:03d}" / f"view{view + 1}.dcm"
            total += _write(ds, path, _uid(label, seed, "cr-sop", study, view))
    return total, studies


def generate(root: Path, *, ct_files: int, cr_files: int, seed: int, label: str = "bench") -> Corpus:
    """Write ``ct_files`` CT slices and ``cr_files`` CR images under ``root``.

    Args:
        root: an empty or missing folder; files land in ``root/ct/studyNNN`` and ``root/cr/studyNNN``.
        ct_files: CT slices, in studies of :data:`SLICES_PER_STUDY`.
        cr_files: CR images, in studies of :data:`CR_VIEWS`.
        seed: seeds the pixels; with ``label`` it also fixes every UID.
        label: keeps UIDs of different corpora (timed run, warm-up) apart.

    Returns:
        What was written.
    """
    if ct_files < 0 or cr_files < 0:
        raise ValueError(f"file counts must not be negative, got ct_files={ct_files}, cr_files={cr_files}")
    rng = np.random.default_rng([seed, zlib.crc32(label.encode())])
    ct_bytes, ct_studies = _write_ct(root, ct_files, seed, label, rng)
    cr_bytes, cr_studies = _write_cr(root, cr_files, seed, label, rng)
    return Corpus(root, ct_files, cr_files, ct_studies + cr_studies, ct_bytes + cr_bytes, seed)


def files_of(corpus: Corpus) -> list[Path]:
    """The corpus's files, sorted by path."""
    return sorted(corpus.root.rglob("*.dcm"))
