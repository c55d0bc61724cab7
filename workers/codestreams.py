"""What an encoded frame's codestream declares, read before any codec allocates for it.

Codecs trust their codestream: a 1 KB JPEG that declares 65535 x 65535 makes one
allocate 8 GB, and a frame cut short is decoded with its missing part blank, mostly
without an error. :func:`check_codestream` reads the main header of a JPEG, JPEG-LS or
JPEG 2000 codestream (and bounds what RLE can expand to) and refuses such frames with a
reason a person can act on.
"""

from __future__ import annotations

from dataclasses import dataclass

import pydicom.uid as uids

from radq.errors import TruncatedPixelData, UndecodablePixels

_JPEG_SOF = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7}  # SOF0-15 (not DHT, JPG, DAC); JPEG-LS SOF55
_JPEG_STANDALONE = {*range(0xD0, 0xD8), 0x01}  # RSTn, TEM: markers without a length
_JPEG_SOS = 0xDA
_J2K_SOD = 0x93
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_RLE_MAX_EXPANSION = 64  # a 2-byte replicate run decodes to at most 128 bytes (PS3.5 G.3.1)


def _u16(data: bytes, pos: int) -> int:
    return int.from_bytes(data[pos : pos + 2], "big")


@dataclass(frozen=True)
class _Codestream:
    """What a codestream's main header declares, and where its coded data begins."""

    rows: int
    columns: int
    components: int
    data_at: int | None  # the first start-of-scan (JPEG) or start-of-data (JPEG 2000); None: none


def _jpeg_header(frame: bytes) -> _Codestream | None:
    """The start-of-frame segment of a JPEG or JPEG-LS codestream and its first scan."""
    if frame[:2] != b"\xff\xd8":
        return None
    pos, sof = 2, None
    while pos + 4 <= len(frame):
        if frame[pos] != 0xFF:
            break
        marker = frame[pos + 1]
        if marker == 0xFF or marker in _JPEG_STANDALONE:  # fill byte, or no length follows
            pos += 1 if marker == 0xFF else 2
            continue
        if marker == _JPEG_SOS:
            break
        if marker in _JPEG_SOF and sof is None:
            if pos + 10 > len(frame):
                return None
            sof = pos
        length = _u16(frame, pos + 2)
        if length < 2:
            break
        pos += 2 + length
    if sof is None:
        return None
    # Decoders skip stray bytes between segments, so look on for the marker past any.
    scan = frame.find(b"\xff\xda", pos)
    return _Codestream(_u16(frame, sof + 5), _u16(frame, sof + 7), frame[sof + 9], None if scan < 0 else scan)


def _j2k_header(frame: bytes) -> _Codestream | None:
    """The SIZ segment of a JPEG 2000 codestream, in or out of a JP2 file, and its first tile's data."""
    pos = 0
    if frame.startswith(_JP2_SIGNATURE):  # not what DICOM asks for, but pydicom reads it
        while True:
            if pos + 8 > len(frame):
                return None
            length, kind, header = int.from_bytes(frame[pos : pos + 4], "big"), frame[pos + 4 : pos + 8], 8
            if length == 1:  # the length follows as 8 bytes
                length, header = int.from_bytes(frame[pos + 8 : pos + 16], "big"), 16
            if kind == b"jp2c":
                pos += header
                break
            if length < header:  # 0 ("to the end") for anything but the codestream
                return None
            pos += length
    if frame[pos : pos + 4] != b"\xff\x4f\xff\x51" or pos + 42 > len(frame):
        return None
    xsiz, ysiz, xosiz, yosiz = (int.from_bytes(frame[pos + i : pos + i + 4], "big") for i in range(8, 24, 4))
    components = _u16(frame, pos + 40)
    at = pos + 2  # marker segments (SIZ, COD, QCD, ..., SOT and the tile-part's own) up to SOD
    while at + 4 <= len(frame) and frame[at] == 0xFF and frame[at + 1] != _J2K_SOD:
        at += 2 + _u16(frame, at + 2)
    data = frame.find(b"\xff\x93", at)
    return _Codestream(ysiz - yosiz, xsiz - xosiz, components, None if data < 0 else data)


def check_codestream(frame: bytes, index: int, ts: uids.UID, geometry: tuple[int, ...]) -> None:
    """Check one encoded frame against the DICOM header before any codec decodes it.

    Args:
        frame: the frame's bytes, as pydicom hands them to a codec.
        index: its frame number, for the reason.
        ts: the transfer syntax, an encapsulated one.
        geometry: rows, columns, samples per pixel and bits allocated from the header.

    Raises:
        UndecodablePixels: it is not a codestream of its transfer syntax, declares another
            size than the header, or holds no coded data.
        TruncatedPixelData: a JPEG, JPEG-LS or JPEG 2000 codestream stops before its end
            marker.
    """
    rows, cols, samples, bits = geometry
    if ts in uids.RLETransferSyntaxes:
        needed = rows * cols * samples * max(1, bits // 8)
        if needed > _RLE_MAX_EXPANSION * len(frame):
            raise UndecodablePixels(
                f"could not decode pixel data ({ts.name}): frame {index} holds {len(frame)} bytes of "
                f"RLE data, too few for {rows} x {cols} x {samples} sample(s) of {bits} bits"
            )
        return
    if ts in uids.JPEG2000TransferSyntaxes:
        found, kind, data, end = _j2k_header(frame), "JPEG 2000", "start-of-data", "end-of-codestream"
    elif ts in uids.JPEGTransferSyntaxes or ts in uids.JPEGLSTransferSyntaxes:
        kind = "JPEG-LS" if ts in uids.JPEGLSTransferSyntaxes else "JPEG"
        found, data, end = _jpeg_header(frame), "start-of-scan", "end-of-image"
    else:
        return  # no decoder in pydicom 3.0 beyond these
    if found is None:
        raise UndecodablePixels(
            f"could not decode pixel data ({ts.name}): frame {index} is not a {kind} codestream "
            "(no start-of-image and frame header where they belong)"
        )
    if found.rows * found.columns * found.components != rows * cols * samples:
        raise UndecodablePixels(
            f"could not decode pixel data ({ts.name}): frame {index}'s {kind} codestream is "
            f"{found.rows} rows x {found.columns} columns x {found.components} component(s), the header "
            f"says {rows} x {cols} x {samples}: refused before decoding"
        )
    # Decoders fill what a codestream lacks with zeros, often without an error: a frame cut
    # short would reach the models part blank. The end marker cannot occur inside coded
    # data (byte stuffing), and searching backwards finds it among the last bytes.
    if found.data_at is None:
        raise UndecodablePixels(
            f"could not decode pixel data ({ts.name}): frame {index}'s {kind} codestream holds no image "
            f"data (its headers end without a {data} marker)"
        )
    if frame.rfind(b"\xff\xd9", found.data_at) < 0:
        raise TruncatedPixelData(
            f"truncated pixel data: frame {index}'s {kind} codestream ({ts.name}) stops after "
            f"{len(frame)} bytes without its {end} marker (cut short or damaged; decoded, part "
            "of the image would be blank)"
        )
