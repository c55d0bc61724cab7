"""Benchmark DICOM: axial head CT slices and chest radiographs with real headers, and a real
ultrasound cine.

CT and CR headers come from real sample files (``CT_small.dcm`` and ``CR2_6247.dcm`` from
pydicom's test data); their pixels are synthetic anatomy (skull, brain, ventricles; body
outline, lungs, ribs, mediastinum, spine) plus detector noise, so decoding, windowing
and codecs do the work real images cause. The ultrasound cine is pydicom's
``examples_ybr_color.dcm`` as recorded: 30 frames of JPEG baseline YBR_FULL_422 from a
SonoSite scanner. :mod:`bench.inputs` writes corpora of them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
from pydicom import examples
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, JPEGLosslessSV1, generate_uid

SAMPLES = Path(__file__).resolve().parent.parent / "radq" / "samples" / "real"
CT_TEMPLATE = SAMPLES / "CT_small.dcm"
CR_TEMPLATE = SAMPLES / "CR2_6247.dcm"
CT_SIZE = 512
"""Rows and columns of a generated CT slice."""
CR_SHAPE = (2500, 2048)
"""Rows and columns of a generated CR image (a 43x35 cm detector at 0.17 mm)."""
_STALE = ("SmallestImagePixelValue", "LargestImagePixelValue")  # their VR follows PixelRepresentation


def _grid(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.linspace(-1.0, 1.0, cols, dtype=np.float32)[np.newaxis, :]
    y = np.linspace(-1.0, 1.0, rows, dtype=np.float32)[:, np.newaxis]
    return x, y


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    return ((x - np.float32(cx)) / np.float32(a)) ** 2 + ((y - np.float32(cy)) / np.float32(b)) ** 2 <= 1


def head_ct_pixels(z: float, jitter: float, rng: np.random.Generator) -> np.ndarray:
    """One axial head slice in stored values (HU + 1024); ``z`` in [0, 1] runs skull base to vertex."""
    x, y = _grid(CT_SIZE, CT_SIZE)
    scale = 0.75 + 0.25 * math.sin(math.pi * (0.25 + 0.6 * z))  # widest a little above the middle
    a, b = (0.72 + jitter) * scale, 0.88 * scale
    hu = np.full((CT_SIZE, CT_SIZE), -1000.0, dtype=np.float32)
    hu[_ellipse(x, y, 0, 0, a + 0.05, b + 0.05)] = 20.0  # scalp
    hu[_ellipse(x, y, 0, 0, a, b)] = 1100.0  # skull
    brain = _ellipse(x, y, 0, 0, a - 0.05, b - 0.05)
    hu = np.where(brain, 32.0 + 6.0 * (x**2 + y**2), hu)  # grey matter rim brighter than white matter
    ventricles = math.sin(math.pi * z) * scale
    for side in (-1, 1):
        hu[_ellipse(x, y, side * 0.09 * scale, -0.05, 0.05 * ventricles + 1e-3, 0.2 * ventricles + 1e-3)] = (
            5.0
        )
    hu[_ellipse(x, y, 0.25 * scale, 0.3 * scale, 0.05, 0.04) & brain] = 65.0  # a small hyperdense focus
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(4.0)
    return np.clip(np.rint(hu + 1024.0), -1024, 4000).astype(np.int16)


def cr_pixels(view: int, jitter: float, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """One chest radiograph in 12-bit stored values; MONOCHROME1, so bright anatomy is low."""
    x, y = _grid(*shape)
    bright = np.zeros(shape, dtype=np.float32)  # direct exposure displays black
    body = _ellipse(x, y, 0, 0.1, 0.8 - 0.25 * view + jitter, 0.95)
    bright = np.where(body, 0.45 + 0.1 * y, bright)
    lungs = np.zeros_like(body)
    for side in (-1, 1) if view == 0 else (0,):
        lungs |= _ellipse(x, y, side * 0.33 + jitter, -0.05, 0.25, 0.55)
    ribs = np.sin((y * 18 + 2 * x**2) * np.float32(math.pi)) > 0.6
    bright = np.where(lungs, np.where(ribs, 0.3, 0.18), bright)
    bright[_ellipse(x, y, 0.03, 0.0, 0.14, 0.6)] = 0.7  # mediastinum
    bright[np.broadcast_to((np.abs(x) < 0.06), bright.shape) & body] = 0.85  # spine
    bright += rng.standard_normal(bright.shape, dtype=np.float32) * np.float32(0.01)  # ~41 of 4095
    return np.clip(np.rint((1.0 - bright) * 4095.0), 0, 4095).astype(np.uint16)


def uid(*parts: object) -> UID:
    """A UID fixed by ``parts`` (the same parts, the same UID)."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _template(path: Path) -> Dataset:
    ds = pydicom.dcmread(path)
    for keyword in _STALE:
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def head_ct_dataset(pixels: np.ndarray) -> Dataset:
    """A head CT slice: ``CT_small.dcm``'s header, these pixels, Explicit VR Little Endian."""
    ds = _template(CT_TEMPLATE)
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = 40, 80
    ds.PixelSpacing = [0.45, 0.45]
    ds.BodyPartExamined = "HEAD"
    ds.StudyDescription = "CT HEAD WITHOUT CONTRAST (synthetic)"
    ds.SeriesDescription = "AXIAL 5mm (synthetic)"
    ds.set_pixel_data(pixels, "MONOCHROME2", 16, generate_instance_uid=False)
    return ds


def cr_dataset(pixels: np.ndarray, view: int) -> Dataset:
    """A chest radiograph: ``CR2_6247.dcm``'s header (RescaleSlope 0.684, Intercept 200,
    WC/WW 1600/2800), these 12-bit MONOCHROME1 pixels, Explicit VR Little Endian."""
    ds = _template(CR_TEMPLATE)
    ds.BodyPartExamined = "CHEST"
    ds.StudyDescription = "XR CHEST 2 VIEWS (synthetic)"
    ds.ImagerPixelSpacing = [0.17, 0.17]
    ds.ViewPosition = ("PA", "LL")[view % 2]
    ds.SeriesDescription = f"CHEST {ds.ViewPosition} (synthetic)"
    ds.set_pixel_data(pixels, "MONOCHROME1", 12, generate_instance_uid=False)
    return ds


def us_cine_dataset() -> Dataset:
    """A real ultrasound cine: 30 frames of 240x320 JPEG baseline YBR_FULL_422, its codestreams
    as the scanner wrote them (pydicom's ``examples_ybr_color.dcm``)."""
    return pydicom.dcmread(examples.get_path("ybr_color"))


def compress_jpeg_lossless(ds: Dataset, pixels: np.ndarray) -> None:
    """Re-encode ``ds`` (unsigned ``pixels``, its BitsStored) as JPEG lossless SV1, by libjpeg-turbo
    through imagecodecs: the lossless syntax PACS archives use most for CR and DX."""
    import imagecodecs

    stream = imagecodecs.jpeg8_encode(pixels, lossless=True, predictor=1, bitspersample=int(ds.BitsStored))
    ds.PixelData = encapsulate([bytes(stream)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
