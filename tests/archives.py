"""Archives built in memory for upload tests."""

from __future__ import annotations

import io
import tarfile
import zipfile


def tar_of(members: dict[str, bytes], mode: str = "w") -> bytes:
    """A tar of ``members`` (name: bytes), written with tarfile's ``mode`` (``"w:gz"`` for a tar.gz)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def damaged_zip(good: bytes, damaged: bytes) -> bytes:
    """A zip of ``good.dcm`` then ``damaged.dcm`` (stored, not deflated), one byte of the
    second's data flipped so that it no longer matches its CRC-32."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("good.dcm", good)
        zf.writestr("damaged.dcm", damaged)
    data = bytearray(buf.getvalue())
    data[data.rfind(damaged[100:200])] ^= 0xFF
    return bytes(data)
