"""radq: bulk CNN inference over DICOM archives."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("radq")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
