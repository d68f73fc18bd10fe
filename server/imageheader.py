"""Image sizes read from file headers, before anything is decoded.

A 48 KB PNG can declare 20000 x 20000 pixels (1.2 GB decoded); the server checks the declared
size against its limit first. Only the formats the service accepts are recognised: PNG, JPEG,
BMP and WebP.
"""

from __future__ import annotations

import struct

FORMATS = "JPEG, PNG, WebP or BMP"


def declared_size(data: bytes) -> tuple[str, int, int] | None:
    """(format, width, height) from the header, or None when the bytes are none of the four
    formats or the header is cut short."""
    try:
        if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR":
            width, height = struct.unpack(">II", data[16:24])
            return "PNG", width, height
        if data.startswith(b"\xff\xd8"):
            return _jpeg(data)
        if data.startswith(b"BM"):
            return _bmp(data)
        if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
            return _webp(data)
    except struct.error:
        return None
    return None


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg(data: bytes) -> tuple[str, int, int] | None:
    offset = 2
    while offset + 4 <= len(data):
        if data[offset] != 0xFF:
            return None
        marker = data[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            offset += 2
            continue
        (length,) = struct.unpack(">H", data[offset + 2:offset + 4])
        if marker in _SOF:
            height, width = struct.unpack(">HH", data[offset + 5:offset + 9])
            return "JPEG", width, height
        offset += 2 + length
    return None


def _bmp(data: bytes) -> tuple[str, int, int]:
    (header,) = struct.unpack("<I", data[14:18])
    if header == 12:
        width, height = struct.unpack("<hh", data[18:22])
    else:
        width, height = struct.unpack("<ii", data[18:26])
    return "BMP", abs(width), abs(height)


def _webp(data: bytes) -> tuple[str, int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", data[26:30])
        return "WebP", width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        (bits,) = struct.unpack("<I", data[21:25])
        return "WebP", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return "WebP", width, height
    return None


def jpeg_is_complete(data: bytes) -> bool:
    """Whether a JPEG's end-of-image marker follows its frame header (a cut-off stream
    would otherwise decode into a partly grey picture)."""
    end = data.rfind(b"\xff\xd9")
    return end > 2 and end > data.find(b"\xff\xc0", 2) and end > data.find(b"\xff\xc2", 2)
