"""The frame container both codecs use: header, CRC and bounded inflate."""

import pytest
import zstandard

from lordba_fl.errors import (
    ChecksumError,
    DecompressionBombError,
    FormatVersionError,
    MalformedFrameError,
    TruncatedFrameError,
)
from lordba_fl.methods.lora import LORA_CONTAINER
from lordba_fl.methods.lordba.codec import CONTAINER
from lordba_fl.wire.frame import Container, bounded_inflate

BOX = Container("Test", b"TEST", 3, "<4sHII", total_length=lambda f: BOX.header_bytes + f[0])


def test_seal_then_open_round_trips_and_every_byte_is_covered():
    frame = BOX.seal((5,), [b"ab", b"cde"])
    assert frame[:4] == b"TEST" and len(frame) == BOX.header_bytes + 5
    fields, crc = BOX.open(frame)
    assert fields == (5,) and frame[BOX.header_bytes:] == b"abcde"
    for i in range(6, len(frame)):  # any flipped byte after magic and version is caught by the CRC
        bad = bytearray(frame)
        bad[i] ^= 0x01
        with pytest.raises((ChecksumError, TruncatedFrameError)):
            BOX.open(bytes(bad))


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda f: f[:5], TruncatedFrameError, "less than its 14-byte header"),
        (lambda f: f + b"x", TruncatedFrameError, "its header declares 19"),
        (lambda f: b"ZZZZ" + f[4:], FormatVersionError, "not a lordba-fl frame"),
        (lambda f: f[:4] + (4).to_bytes(2, "little") + f[6:], FormatVersionError, "format version 4; this lordba-fl reads version 3"),
    ],
)
def test_framing_errors_name_what_is_wrong(mutate, error, match):
    with pytest.raises(error, match=match):
        BOX.open(mutate(BOX.seal((5,), [b"abcde"])))


def test_bounded_inflate_refuses_more_than_the_cap():
    data = b"\x00" * 1000
    z = zstandard.ZstdCompressor(write_content_size=True).compress(data)
    assert bounded_inflate(z, 1000, 1000, "s") == data
    with pytest.raises(DecompressionBombError, match="declares 1000 bytes; this adapter's shapes allow at most 999"):
        bounded_inflate(z, 1000, 999, "s")
    with pytest.raises(DecompressionBombError, match="zstd frame declares 1000 bytes"):
        bounded_inflate(z, 10, 999, "s")
    with pytest.raises(MalformedFrameError, match="not a zstd frame"):
        bounded_inflate(b"garbage!", 10, 100, "s")


def test_each_codec_refuses_the_other_formats_frame():
    import numpy as np

    from lordba_fl.methods.lora import decode_lora, encode_lora

    lora = encode_lora(0, 0, 1, 0, b"\x00" * 100, compress=False)
    assert LORA_CONTAINER.open(lora)[0][:4] == (0, 0, 1, 0)
    with pytest.raises(FormatVersionError, match="a LoRDBA frame starts b'LDBA'"):
        CONTAINER.open(lora)
    ldba = CONTAINER.seal((0, 0, b"f" * 16) + (0,) * 17, [])
    with pytest.raises(FormatVersionError, match="a LoRA frame starts b'LORA'"):
        decode_lora(ldba, np.array([4]), (0,))
