"""radq's exception hierarchy: one root, permanent and transient faults kept apart."""

from __future__ import annotations


class RadqError(Exception):
    """Root of every error radq raises on purpose."""


class ConfigurationError(RadqError):
    """Raised when settings or a model directory cannot be used as given."""


class SubmissionError(RadqError):
    """Raised when a submission is refused; the message says what to change."""


class LimitExceeded(SubmissionError):
    """Raised when a submission passes a configured limit (size, members)."""


class PathNotAllowed(SubmissionError):
    """Raised when a path submission points outside ``RADQ_ALLOWED_ROOTS``."""


class ModelError(ConfigurationError):
    """Raised when a model card or its weights are missing, invalid or do not match."""


class InstanceError(RadqError):
    """Raised for one file that cannot be processed; permanent for that file.

    ``reason`` is the human-readable explanation recorded in the database.
    """

    status = "failed"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotDicom(InstanceError):
    """Raised when a file is not a DICOM dataset at all."""


class MalformedDicom(InstanceError):
    """Raised when a DICOM file's structure is corrupt: cut short, wrong lengths, bad values."""


class TruncatedPixelData(InstanceError):
    """Raised when Pixel Data holds fewer bytes than the header declares."""


class UnsupportedTransferSyntax(InstanceError):
    """Raised when no installed codec decodes the file's transfer syntax."""


class ImageTooLarge(InstanceError):
    """Raised when declared dimensions pass ``RADQ_MAX_IMAGE_PIXELS``."""


class UndecodablePixels(InstanceError):
    """Raised when a codec fails on the file's pixel data for another reason."""


class DecoderCrashed(InstanceError):
    """Raised when the process decoding a file dies while reading it (segfault, abort, OOM kill)."""


class DecoderTimeout(InstanceError):
    """Raised when reading a file runs past ``RADQ_DECODE_TIMEOUT`` and its process is stopped."""


class NoImage(InstanceError):
    """Raised for a valid DICOM object with nothing to infer on (SR, waveform)."""

    status = "skipped"


class TransientError(RadqError):
    """Raised when a service (database, broker) is unreachable; the work is retried."""


class BrokerUnavailable(TransientError):
    """Raised when a message cannot be published because the broker is unreachable."""


class DatabaseUnavailable(TransientError):
    """Raised when the database cannot be reached."""


class BlobMissing(InstanceError):
    """Raised when an instance's uploaded file is no longer in the blob store (retention, deletion)."""


class StorageFull(TransientError):
    """Raised when this host's disk (or quota) has no room for what a submission must write."""


class BlobStoreUnavailable(TransientError):
    """Raised when the blob store (S3) cannot be reached or refuses a request; retried later."""
