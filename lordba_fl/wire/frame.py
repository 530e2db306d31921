"""The one frame container every message body uses (LoRDBA frames, LoRA baseline frames).

A frame is a fixed little-endian header followed by its sections::

    magic (4 bytes) | format version (u16) | ... format-specific fields ... | CRC-32 (u32) | sections

The CRC-32 covers the header up to the CRC field, then every section. :meth:`Container.open` checks,
in order, the length against the header, the magic, the format version, the declared total length
and the CRC, before anything is decompressed; :func:`bounded_inflate` then inflates a zstd section
only up to a cap the receiver computes from its own shapes. Every failure is one
:class:`~lordba_fl.errors.CodecError` subclass naming what was wrong.
"""

from __future__ import annotations

import functools
import struct
import zlib
from collections.abc import Callable, Sequence

import zstandard

ZSTD_LEVELS = range(-7, 23)  # every frame's compression level (codec.level): -7 fastest .. 22 smallest


def check_zstd_level(level) -> int:
    """``level`` if it is a zstd level (:data:`ZSTD_LEVELS`), else a ValueError naming ``codec.level``."""
    if isinstance(level, bool) or not isinstance(level, int) or level not in ZSTD_LEVELS:
        raise ValueError(f"codec.level must be an integer in [-7, 22] (zstd levels; 3 is zstd's default); got {level!r}")
    return level

from lordba_fl.errors import (
    ChecksumError,
    DecompressionBombError,
    FormatVersionError,
    MalformedFrameError,
    TruncatedFrameError,
)


class Container:
    """A frame format: ``name`` (for messages), ``magic``, ``version`` and the header ``layout``
    (a :class:`struct.Struct` starting ``4sH`` = magic, version and ending ``I`` = CRC-32).

    ``total_length(fields)`` gives the frame length the header declares (fields without magic,
    version and CRC)."""

    def __init__(self, name: str, magic: bytes, version: int, layout: str,
                 total_length: Callable[[tuple], int], hint: str = ""):
        self.name, self.magic, self.version = name, magic, version
        self.header = struct.Struct(layout)
        if not layout.lstrip("<").startswith("4sH") or not layout.endswith("I"):
            raise ValueError("a frame header starts with magic (4s) and version (H) and ends with the CRC (I)")
        self.total_length = total_length
        self.hint = hint

    @property
    def header_bytes(self) -> int:
        return self.header.size

    def seal(self, fields: Sequence, sections: Sequence[bytes]) -> bytes:
        """The frame of ``fields`` (between version and CRC) and ``sections``, CRC filled in."""
        head = self.header.pack(self.magic, self.version, *fields, 0)[:-4]
        crc = zlib.crc32(head)
        for sec in sections:
            crc = zlib.crc32(sec, crc)
        return b"".join([head, crc.to_bytes(4, "little"), *sections])

    def open(self, buf: bytes | bytearray | memoryview) -> tuple[tuple, int]:
        """Check ``buf``'s framing; returns (the fields between version and CRC, the CRC)."""
        n = self.header.size
        if len(buf) < n:
            raise TruncatedFrameError(f"{self.name} frame has {len(buf)} bytes, less than its {n}-byte header")
        magic, version, *fields, crc = self.header.unpack_from(buf, 0)
        if bytes(magic) != self.magic:
            raise FormatVersionError(f"not a lordba-fl frame (magic {bytes(magic)!r}; a {self.name} frame starts "
                                     f"{self.magic!r})")
        if version != self.version:
            raise FormatVersionError(f"{self.name} frame format version {version}; this lordba-fl reads version "
                                     f"{self.version}{self.hint}")
        fields = tuple(fields)
        total = self.total_length(fields)
        if len(buf) != total:
            raise TruncatedFrameError(f"{self.name} frame has {len(buf)} bytes; its header declares {total}")
        got = zlib.crc32(buf[n:], zlib.crc32(buf[: n - 4]))
        if got != crc:
            raise ChecksumError(f"{self.name} frame CRC-32 is {got:#010x}, header says {crc:#010x}: the frame is corrupt")
        return fields, crc


@functools.lru_cache(maxsize=8)
def _decompressor(dictionary: bytes | None) -> zstandard.ZstdDecompressor:
    return zstandard.ZstdDecompressor(dict_data=zstandard.ZstdCompressionDict(bytes(dictionary)) if dictionary else None)


def bounded_inflate(section: bytes, raw_len: int, cap: int, what: str, dictionary: bytes | None = None) -> bytes:
    """Inflate a zstd section declared to hold ``raw_len`` bytes, never beyond ``cap``; errors are CodecErrors."""
    if raw_len > cap:
        raise DecompressionBombError(f"{what} declares {raw_len} bytes; this adapter's shapes allow at most {cap}")
    try:
        content = zstandard.frame_content_size(section)
    except zstandard.ZstdError as e:
        raise MalformedFrameError(f"{what} is not a zstd frame ({e})") from None
    if content < 0:
        raise MalformedFrameError(f"{what}'s zstd frame does not declare its size; lordba-fl always writes it")
    if content > cap:
        raise DecompressionBombError(f"{what}'s zstd frame declares {content} bytes; this adapter allows at most {cap}")
    if content != raw_len:
        raise MalformedFrameError(f"{what}'s zstd frame declares {content} bytes; the header says {raw_len}")
    try:
        # one zstd frame and nothing after it: trailing bytes or a second frame are refused
        out = _decompressor(dictionary).decompress(section, max_output_size=cap, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise MalformedFrameError(f"{what} failed to decompress ({e})") from None
    if len(out) != raw_len:
        raise MalformedFrameError(f"{what} decompressed to {len(out)} bytes; the header says {raw_len}")
    return out
