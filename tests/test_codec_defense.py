"""Defensive decoding: every defect raises one CodecError subclass, nothing beyond the caps is allocated,
and a rejected frame changes no state."""

import zlib

import numpy as np
import pytest
import torch
import zstandard

from lordba_fl.methods.lordba import codec
from lordba_fl.methods.lordba.codec import (
    HEADER_BYTES,
    ChecksumError,
    CodecError,
    CodecOptions,
    DecompressionBombError,
    FormatVersionError,
    MalformedFrameError,
    ModelMismatchError,
    NonFiniteError,
    ShapeMismatchError,
    TruncatedFrameError,
    Update,
    decode_state,
    decode_update,
    encode_state,
    encode_update,
    read_header,
)
from lordba_fl.methods.lordba.layout import AdapterSpec, AdapterState, LayerSpec

SPEC = AdapterSpec(
    (LayerSpec("a.q", 13, 7, 3), LayerSpec("a.v", 8, 21, 3), LayerSpec("b.q", 16, 16, 3)), ("in", "mid", "out"), b"m" * 16
)
FIELDS = [f.name for f in codec.FrameHeader.__dataclass_fields__.values()]
_CODES = [c for c in codec.CONTAINER.header.format.lstrip("<").replace("16s", "F").replace("4s", "") if not c.isdigit()]
WIDTH = {name: {"H": 0xFFFF, "B": 0xFF, "I": 0xFFFFFFFF, "Q": 2**64 - 1, "F": None}[c] for name, c in zip(FIELDS, _CODES)}


def _update(p=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Update(2, 1, torch.rand(SPEC.n_bits, generator=g) < p, torch.randn(SPEC.n_scales, generator=g) * 1e-2)


def _sections(frame: bytes) -> list[bytes]:
    h = read_header(frame)
    o1 = HEADER_BYTES + h.table_comp
    o2 = o1 + h.sign_comp
    return [frame[HEADER_BYTES:o1], frame[o1:o2], frame[o2:]]


def reframe(frame: bytes, sections: list[bytes] | None = None, **fields) -> bytes:
    """Rebuild ``frame`` with replaced header fields / sections and a *valid* CRC (a crafted frame)."""
    h = read_header(frame)
    sections = sections if sections is not None else _sections(frame)
    values = {name: getattr(h, name) for name in FIELDS}
    values.update(table_comp=len(sections[0]), sign_comp=len(sections[1]), scale_comp=len(sections[2]), crc=0)
    values.update(fields)
    header = codec.CONTAINER.header.pack(fields.pop("magic", codec.MAGIC), *[values[n] for n in FIELDS])
    crc = zlib.crc32(header[:-4])  # the CRC is the header's last field
    for s in sections:
        crc = zlib.crc32(s, crc)
    return header[:-4] + crc.to_bytes(4, "little") + b"".join(sections)


def _z(data: bytes, **kw) -> bytes:
    return zstandard.ZstdCompressor(level=3, **kw).compress(data)


def test_reframe_helper_is_faithful():
    frame = encode_update(_update(), SPEC)
    assert reframe(frame) == frame


def test_truncated_and_extended():
    frame = encode_update(_update(), SPEC)
    for cut in (0, 10, HEADER_BYTES - 1, HEADER_BYTES, len(frame) // 2, len(frame) - 1):
        with pytest.raises(TruncatedFrameError):
            decode_update(frame[:cut], SPEC)
    with pytest.raises(TruncatedFrameError, match="declares"):
        decode_update(frame + b"\0", SPEC)


def test_corrupted_byte_fails_checksum():
    frame = bytearray(encode_update(_update(), SPEC))
    for pos in (30, HEADER_BYTES + 1, len(frame) - 1):
        bad = bytearray(frame)
        bad[pos] ^= 0x10
        with pytest.raises(ChecksumError, match="corrupt"):
            decode_update(bytes(bad), SPEC)


def test_wrong_version_and_magic():
    frame = encode_update(_update(), SPEC)
    with pytest.raises(FormatVersionError, match="same lordba-fl release"):
        decode_update(reframe(frame, format_version=2), SPEC)
    with pytest.raises(FormatVersionError, match="not a lordba-fl frame"):
        decode_update(b"PK\3\4" + frame[4:], SPEC)


def test_wrong_model_and_wrong_shapes():
    frame = encode_update(_update(), SPEC)
    other_model = AdapterSpec(SPEC.layers, SPEC.scales, b"x" * 16)
    with pytest.raises(ModelMismatchError, match="same base model"):
        decode_update(frame, other_model)
    # same model, rank 4 instead of 3 on one layer
    other_rank = AdapterSpec((SPEC.layers[0], LayerSpec("a.v", 8, 21, 4), SPEC.layers[2]), SPEC.scales, SPEC.fingerprint)
    with pytest.raises(ShapeMismatchError):
        decode_update(frame, other_rank)
    # same sizes, another layer name: the table says which
    renamed = AdapterSpec((LayerSpec("a.k", 13, 7, 3), *SPEC.layers[1:]), SPEC.scales, SPEC.fingerprint)
    with pytest.raises(ShapeMismatchError, match="'a.q'.*expected 'a.k'"):
        decode_update(frame, renamed)
    fewer_scales = AdapterSpec(SPEC.layers, ("mid", "out"), SPEC.fingerprint)
    with pytest.raises(ShapeMismatchError, match="mask"):
        decode_update(frame, fewer_scales)


def test_wrong_kind():
    state = AdapterState(0, torch.zeros(SPEC.n_bits, dtype=torch.bool), torch.ones(SPEC.n_scales))
    with pytest.raises(MalformedFrameError, match="expected UPDATE"):
        decode_update(encode_state(state, SPEC), SPEC)
    with pytest.raises(MalformedFrameError, match="STATE_FULL or STATE_DELTA"):
        decode_state(encode_update(_update(), SPEC), SPEC)


def test_nan_and_inf_scales_rejected():
    frame = encode_update(_update(), SPEC)
    table, signs, _ = _sections(frame)
    for bad in (np.nan, np.inf, -np.inf):
        values = np.zeros(SPEC.n_scales, dtype=np.float16)
        values[5] = bad
        scales = _z(values.view(np.uint8).reshape(-1, 2).T.tobytes())
        with pytest.raises(NonFiniteError, match="index 5"):
            decode_update(reframe(frame, [table, signs, scales]), SPEC)
    q8 = encode_update(_update(), SPEC, CodecOptions(scale_encoding="q8"))
    raw = bytearray(zstandard.ZstdDecompressor().decompress(_sections(q8)[2]))
    raw[0:2] = np.float16(np.nan).tobytes()
    with pytest.raises(NonFiniteError, match="step"):
        decode_update(reframe(q8, [*_sections(q8)[:2], _z(bytes(raw))]), SPEC, CodecOptions(scale_encoding="q8"))


def test_decompression_bombs_are_refused_before_allocation():
    frame = encode_update(_update(), SPEC)
    table, signs, scales = _sections(frame)
    cap = (SPEC.n_bits + 7) // 8
    # declared by our header
    with pytest.raises(DecompressionBombError, match="at most"):
        decode_update(reframe(frame, sign_raw=cap + 1), SPEC)
    # declared by the zstd frame: 1 GiB of zeros compresses to a few KiB; it must never be inflated
    bomb = zstandard.ZstdCompressor(level=1).compress(b"\0" * (1 << 20))  # 1 MiB stand-in
    content = bytearray(bomb)
    with pytest.raises(DecompressionBombError, match="zstd frame declares"):
        decode_update(reframe(frame, [table, bytes(content), scales]), SPEC)
    # a zstd frame that hides its size is refused too (we never decompress without a bound)
    hidden = _z(b"\0" * cap, write_content_size=False)
    with pytest.raises(MalformedFrameError, match="does not declare"):
        decode_update(reframe(frame, [table, hidden, scales], sign_raw=cap, sign_encoding=0), SPEC)


def test_lying_zstd_content_size_is_caught():
    frame = encode_update(_update(p=0.5), SPEC)  # packed signs
    table, signs, scales = _sections(frame)
    h = read_header(frame)
    raw = zstandard.ZstdDecompressor().decompress(signs)
    longer = _z(raw + b"\0" * 10)  # more data than the shapes need, declared honestly -> over the cap
    with pytest.raises(DecompressionBombError):
        decode_update(reframe(frame, [table, longer, scales], sign_raw=h.sign_raw + 10), SPEC)
    shorter = _z(raw[:-1])
    with pytest.raises(ShapeMismatchError):
        decode_update(reframe(frame, [table, shorter, scales], sign_raw=h.sign_raw - 1), SPEC)


def test_malformed_sign_sections():
    frame = encode_update(_update(p=0.01), SPEC)
    table, _, scales = _sections(frame)
    n = SPEC.n_bits
    cases = [
        (dict(sign_encoding=7), _z(b"\0"), "unknown sign encoding"),
        (dict(sign_encoding=1, n_set=1), _z(b"\xff\xff"), "ends inside a run"),
        (dict(sign_encoding=1, n_set=2), _z(b"\x01"), "header says 2"),
        (dict(sign_encoding=1, n_set=1), _z(b"\xff" * (n // 255) + b"\xfe"), "points at bit"),
        (dict(sign_encoding=0, n_set=0), _z(b"\0" * (n // 8) + b"\xff"), "padding bits"),
        (dict(sign_encoding=0, n_set=5), _z(b"\0" * ((n + 7) // 8)), "header says 5"),
        (dict(n_set=n + 1), _z(b""), "bits are set"),
    ]
    assert n % 8  # the padding case needs a partial last byte
    for fields, section, match in cases:
        bad = reframe(frame, [table, section, scales], sign_raw=len(zstandard.ZstdDecompressor().decompress(section)), **fields)
        with pytest.raises(MalformedFrameError, match=match):
            decode_update(bad, SPEC)


def test_rejected_frames_leave_client_state_untouched():
    g = torch.Generator().manual_seed(0)
    held = AdapterState(4, torch.rand(SPEC.n_bits, generator=g) < 0.5, torch.randn(SPEC.n_scales, generator=g))
    snapshot = held.clone()
    new = AdapterState(5, held.negative ^ (torch.rand(SPEC.n_bits, generator=g) < 0.1), torch.randn(SPEC.n_scales, generator=g))
    frame = encode_state(new, SPEC, base=held)
    table, signs, _ = _sections(frame)
    bad_scales = held.scales.numpy().astype(np.float16)  # a delta frame's scales are fp16 bits XOR the held ones
    bad_scales[-1] = np.nan
    bad_scales = bad_scales.view(np.uint16) ^ held.scales.numpy().astype(np.float16).view(np.uint16)
    corrupt = [
        frame[:-3],
        frame[:50] + bytes([frame[50] ^ 1]) + frame[51:],
        reframe(frame, [table, signs, _z(bad_scales.view(np.uint8).reshape(-1, 2).T.tobytes())]),
    ]
    for bad in corrupt:
        with pytest.raises(CodecError):
            decode_state(bad, SPEC, base=held)
        assert held.equals(snapshot)
    assert decode_state(frame, SPEC, base=held).version == 5 and held.equals(snapshot)


def _valid_result(out, spec) -> bool:
    if isinstance(out, Update):
        return out.flips.shape == (spec.n_bits,) and bool(torch.isfinite(out.scale_delta).all())
    return out.negative.shape == (spec.n_bits,) and bool(torch.isfinite(out.scales).all())


def test_fuzz_only_codec_errors():
    """>= 10,000 mutated and random buffers; half of the mutations get a valid CRC so parsing goes deep."""
    rng = np.random.default_rng(1234)
    g = torch.Generator().manual_seed(0)
    base = AdapterState(1, torch.rand(SPEC.n_bits, generator=g) < 0.5, torch.randn(SPEC.n_scales, generator=g))
    state = AdapterState(2, base.negative ^ (torch.rand(SPEC.n_bits, generator=g) < 0.02), base.scales + 1)
    q8 = CodecOptions(scale_encoding="q8")
    seeds = [
        (encode_update(_update(0.02), SPEC), "update", CodecOptions()),
        (encode_update(_update(0.5), SPEC, q8), "update", q8),
        (encode_state(state, SPEC), "state", CodecOptions()),
        (encode_state(state, SPEC, base=base), "state", CodecOptions()),
    ]
    outcomes = {"ok": 0}
    for i in range(10_400):
        frame, kind, opts = seeds[i % len(seeds)]
        buf = bytearray(frame)
        op = rng.integers(0, 6)
        if op == 0:  # random bytes
            buf = bytearray(rng.integers(0, 256, rng.integers(0, 400), dtype=np.uint8).tobytes())
        elif op == 1:  # flip bytes
            for _ in range(rng.integers(1, 4)):
                buf[rng.integers(0, len(buf))] ^= int(rng.integers(1, 256))
        elif op == 2:  # truncate or extend
            buf = buf[: rng.integers(0, len(buf))] if rng.random() < 0.5 else buf + rng.bytes(rng.integers(1, 20))
        else:  # crafted: mutate header fields or section bytes, then fix the CRC
            h = read_header(frame)
            secs = [bytearray(s) for s in _sections(frame)]
            fields = {}
            if op == 3:
                name = FIELDS[rng.integers(0, len(FIELDS) - 1)]  # any field but the CRC
                if name == "fingerprint":
                    fields[name] = rng.bytes(16)
                else:
                    v = getattr(h, name)
                    v = v + int(rng.integers(-3, 4)) if rng.random() < 0.7 else int(rng.integers(0, 2**40))
                    fields[name] = max(0, v) & WIDTH[name]
            else:
                sec = secs[rng.integers(0, 3)]
                if len(sec):
                    for _ in range(rng.integers(1, 4)):
                        sec[rng.integers(0, len(sec))] ^= int(rng.integers(1, 256))
            buf = bytearray(reframe(frame, [bytes(s) for s in secs], **fields))
        try:
            out = decode_update(bytes(buf), SPEC, opts) if kind == "update" else decode_state(bytes(buf), SPEC, opts, base=base)
        except CodecError as e:
            outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
            continue
        assert _valid_result(out, SPEC)
        outcomes["ok"] += 1
    assert sum(outcomes.values()) >= 10_000
    # the crafted half reaches every layer of checks, not just the CRC
    deep = {"ModelMismatchError", "ShapeMismatchError", "MalformedFrameError", "DecompressionBombError", "NonFiniteError"}
    assert deep <= set(outcomes), outcomes


def test_frames_are_strict_trailing_data_second_zstd_frame_reserved_and_flags():
    frame = encode_update(_update(p=0.5), SPEC)  # packed signs, zstd sections
    table, signs, scales = _sections(frame)
    assert decode_update(reframe(frame, [table, signs, scales]), SPEC).flips.shape == (SPEC.n_bits,)
    with pytest.raises(MalformedFrameError, match="unused data"):  # bytes after the zstd frame
        decode_update(reframe(frame, [table, signs + b"\0\0\0", scales]), SPEC)
    raw = zstandard.ZstdDecompressor().decompress(signs)
    with pytest.raises(MalformedFrameError, match="unused data"):  # a second zstd frame after the first
        decode_update(reframe(frame, [table, signs + _z(raw), scales]), SPEC)
    with pytest.raises(MalformedFrameError, match="reserved field 7"):
        decode_update(reframe(frame, reserved=7), SPEC)
    with pytest.raises(MalformedFrameError, match="flags 0x4"):
        decode_update(reframe(frame, flags=4), SPEC)


def test_a_replayed_lordba_frame_of_another_round_is_rejected():
    from lordba_fl.methods.lordba.aggregation import collect_updates

    frame = encode_update(_update(), SPEC)  # round 2, version 1
    got, bad = collect_updates([(frame, 1.0)], SPEC, version=1, round=2)
    assert len(got) == 1 and not bad
    got, bad = collect_updates([(frame, 1.0)], SPEC, version=1, round=3)
    assert not got and "round 2 replayed in round 3" in bad[0][1]


def _lora_frame(kind=0, bits=0, rnd=1, version=0, reserved=0, payload=None, segments=None, compress=False):
    from lordba_fl.methods.lora import encode_lora

    segments = np.array([3, 3, 5, 5]) if segments is None else segments
    payload = np.zeros(int(segments.sum()), np.float16).tobytes() if payload is None else payload
    return encode_lora(kind, bits, rnd, version, payload, compress=compress, reserved=reserved), segments


def test_lora_frames_are_strict():
    from lordba_fl.methods.lora import decode_lora

    frame, seg = _lora_frame()
    assert decode_lora(frame, seg, (0,))[3] == 0
    for bad, match in [(_lora_frame(reserved=9)[0], "reserved field is 9"), (_lora_frame(bits=2)[0], "2 bits"),
                       (_lora_frame(kind=5)[0], "kind 5")]:
        with pytest.raises(MalformedFrameError, match=match):
            decode_lora(bad, seg, (0,))
    # a compressed payload with bytes after its zstd frame (valid CRC and lengths)
    body = _z(np.zeros(16, np.float16).tobytes()) + b"\0"
    from lordba_fl.methods.lora import LORA_CONTAINER

    crafted = LORA_CONTAINER.seal((0, 0, 1, 0, 0, 32, len(body)), [body])
    with pytest.raises(MalformedFrameError, match="unused data"):
        decode_lora(crafted, seg, (0,))


def test_fuzz_lora_and_flora_frames_only_codec_errors():
    """Mutated LoRA (fp16, 2-bit) and FLoRA stack frames, CRC fixed for half: only CodecErrors, and
    whatever decodes has the receiver's shapes."""
    from lordba_fl.methods.lora import LORA_CONTAINER, decode_lora, quantize_channels
    from lordba_fl.methods.lora.flora import Group, decode_stack, encode_stack

    rng = np.random.default_rng(7)
    seg = np.array([3, 3, 5, 5])
    n = int(seg.sum())
    sizes = lambda rank: n * rank // 2  # noqa: E731 - a rank-2 group holds n values here
    q = quantize_channels(rng.standard_normal(n).astype(np.float32), seg, 2, rng)
    seeds = [
        (_lora_frame(payload=rng.standard_normal(n).astype(np.float16).tobytes())[0], "fp16"),
        (_lora_frame(kind=1, bits=2, payload=q, compress=True)[0], "q2"),
        (encode_stack([Group(1, 2, 0.5, rng.standard_normal(n).astype(np.float16)),
                       Group(2, 2, 0.25, rng.standard_normal(n).astype(np.float16))], 3, 2, 0), "stack"),
    ]
    outcomes = {"ok": 0}
    for i in range(3_000):
        frame, kind = seeds[i % len(seeds)]
        buf = bytearray(frame)
        op = rng.integers(0, 4)
        if op == 0:
            buf = bytearray(rng.integers(0, 256, rng.integers(0, 120), dtype=np.uint8).tobytes())
        elif op == 1:
            for _ in range(rng.integers(1, 4)):
                buf[rng.integers(0, len(buf))] ^= int(rng.integers(1, 256))
        else:  # crafted: mutate a header field or body byte, then a valid CRC
            fields = list(LORA_CONTAINER.header.unpack_from(frame, 0)[2:-1])
            body = bytearray(frame[LORA_CONTAINER.header_bytes :])
            if op == 2:
                j = int(rng.integers(0, len(fields)))
                fields[j] = int(rng.integers(0, 2**8 if j < 2 else 2**32))
            elif len(body):
                body[rng.integers(0, len(body))] ^= int(rng.integers(1, 256))
            try:
                buf = bytearray(LORA_CONTAINER.seal(fields, [bytes(body)]))
            except Exception:  # noqa: BLE001 - a field past its struct width: not a frame anyone can send
                continue
        try:
            if kind == "stack":
                _, _, groups = decode_stack(bytes(buf), sizes)
                assert all(g.values.size == sizes(g.rank) for g in groups)
            else:
                values = decode_lora(bytes(buf), seg, (0,) if kind == "fp16" else (1,))[4]
                assert len(values) in (2 * n, 4 * seg.size + (2 * n + 7) // 8)
        except CodecError as e:
            outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
            continue
        outcomes["ok"] += 1
    assert sum(outcomes.values()) >= 2_500 and outcomes["ok"] > 0
    assert {"ChecksumError", "MalformedFrameError"} <= set(outcomes), outcomes
