"""Patient pseudonyms: a keyed HMAC-SHA256 of the PatientID, so the database holds no identifier.

The same key gives the same pseudonym for the same PatientID, so studies of one patient
can be grouped without storing who the patient is; without the key the pseudonym cannot
be reversed or recomputed from a guessed PatientID. Every worker must use the same key.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import tempfile
from pathlib import Path

from radq.errors import ConfigurationError
from radq.settings import Settings

KEY_FILE = "pseudonym.key"
"""Development only: the generated key's file name in RADQ_HOME."""


def pseudonymise(key: bytes, patient_id: str) -> str:
    """The pseudonym of ``patient_id``: HMAC-SHA256 over its UTF-8 bytes, hex."""
    return hmac.new(key, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()


def pseudonym_key(settings: Settings) -> bytes:
    """The HMAC key: ``RADQ_PSEUDONYM_KEY``, or in development a key generated once into RADQ_HOME.

    Raises:
        ConfigurationError: production without a key, or the key file cannot be read or written.
    """
    if settings.pseudonym_key is not None:
        return settings.pseudonym_key.get_secret_value().encode("utf-8")
    if settings.env == "production":
        raise ConfigurationError("RADQ_PSEUDONYM_KEY is not set (required with RADQ_ENV=production)")
    path = settings.home.resolve() / KEY_FILE
    try:
        return _read_or_create(path)
    except OSError as exc:
        raise ConfigurationError(f"cannot read or create the pseudonym key {path}: {exc}") from None


def _read_or_create(path: Path) -> bytes:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written aside, then linked into place: link() fails if another process won the race,
        # so every process ends up with the one key, never a half-written file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".pseudonym-")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32))
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
    key = path.read_text(encoding="utf-8").strip()
    if not key:
        raise ConfigurationError(
            f"the pseudonym key file {path} is empty; delete it or set RADQ_PSEUDONYM_KEY"
        )
    return key.encode("utf-8")
