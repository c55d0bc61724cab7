"""Archives built in memory for upload tests."""

from __future__ import annotations

import io
import tarfile


def tar_of(members: dict[str, bytes], mode: str = "w") -> bytes:
    """A tar of ``members`` (name: bytes), written with tarfile's ``mode`` (``"w:gz"`` for a tar.gz)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()
