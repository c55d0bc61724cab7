"""Small DICOM files made on the fly for worker tests: sizes and encodings the samples lack."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)


def write_image(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    modality: str = "OT",
    syntax: UID = ExplicitVRLittleEndian,
    **elements: object,
) -> Path:
    """Write ``pixels`` ((F,) H, W[, 3], integer) as a DICOM file and return its path.

    Args:
        path: where to write.
        pixels: the stored values; a leading axis makes a multi-frame object.
        photometric: the Photometric Interpretation.
        bits_stored: Bits Stored (default: the dtype's width).
        modality: the Modality; ``CR`` also sets the CR Image Storage SOP class.
        syntax: a transfer syntax to compress to with pydicom's installed encoders.
        **elements: further elements, by keyword.
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ComputedRadiographyImageStorage if modality == "CR" else SecondaryCaptureImageStorage
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = modality
    ds.set_pixel_data(pixels, photometric, bits_stored or 8 * pixels.dtype.itemsize)
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    if syntax != ExplicitVRLittleEndian:
        ds.compress(syntax, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_float_image(path: Path, values: np.ndarray, *, modality: str = "OT", **elements: object) -> Path:
    """Write float32 or float64 ``values`` (H, W) as Float or Double Float Pixel Data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = modality
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8 * values.dtype.itemsize
    keyword = "FloatPixelData" if values.dtype == np.float32 else "DoubleFloatPixelData"
    setattr(ds, keyword, values.astype(values.dtype.newbyteorder("<")).tobytes())
    for name, value in elements.items():
        setattr(ds, name, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def lut_sequence(descriptor: list[int], data: list[int] | None, **elements: object) -> Sequence:
    """A one-item LUT sequence (VOI or Modality), its descriptor and data as given."""
    item = Dataset()
    item.add_new(0x00283002, "US", descriptor)
    if data is not None:
        item.add_new(0x00283006, "US", data)
    for keyword, value in elements.items():
        setattr(item, keyword, value)
    return Sequence([item])
