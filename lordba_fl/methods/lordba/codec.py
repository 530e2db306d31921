"""Bit-packing of sign carriers and the framed wire format of the federated protocol.

**Bit order** (fixed, part of the file and wire formats): each row of a ``(rows, cols)`` sign matrix is
packed on its own into ``ceil(cols / 8)`` bytes; element ``c`` of a row lives in byte ``c // 8`` at
bit ``c % 8`` (least significant bit first). A set bit means ``-1``, a clear bit ``+1``, so an
all-zero buffer is the all-``+1`` matrix (``sign(0) = +1``) and a flip mask is a plain XOR of two
packed buffers. Padding bits at the end of each row are zero, and unpacking rejects set padding bits.
Packing is vectorized (numpy on CPU tensors, torch on any other device).

**Frames.** One message carries one frame per kind (:class:`FrameKind`): a client's *update* (flip
mask of its signs against the broadcast, plus scale deltas), or the server's *state*, full (signs +
fp16 scales) or a *delta* against a version the receiver holds (flip mask + fp16 scale bits XOR the
held version's). A frame is::

    header (92 bytes, little-endian, see _HEADER)   magic "LDBA", format version, kind, flags,
                                                    16-byte model fingerprint, round, version,
                                                    base version, zstd dictionary id, layer count,
                                                    sign/scale encodings, scale set, bit and flip
                                                    counts, raw and compressed section lengths, CRC-32
    layer table   (zstd)  per layer: name, in, out, r, carrier offset, scale offset (AdapterSpec.table_bytes)
    sign section  (zstd)  the carrier stream (see lordba_fl.methods.lordba.layout): PACKED = bit-packed LSB first,
                          or GAPS = run lengths between set bits, each as k bytes of 255 then one byte
                          < 255 (sum = gap), chosen when sparser and smaller (flip masks usually are)
    scale section (zstd)  FP16 = fp16 values, low bytes then high bytes; Q8 = one fp16 step per
                          (layer, scale kind), then int8 values in [-127, 127], value = q * step;
                          FP16_XOR (state deltas) = fp16 bits XOR the base version's fp16 bits,
                          low bytes then high bytes; a state delta may instead carry Q8/Q4/Q2
                          codes of the difference to the receiver's scales (rounded to nearest)

The CRC-32 covers the header (with the CRC field zeroed) and every section. Decoding checks, in
order: length, magic, format version, CRC, kind, model fingerprint, dictionary, declared sizes
against caps computed from the receiver's own :class:`AdapterSpec` (nothing is decompressed or
allocated beyond them), the layer table, then the sections' contents (padding, run lengths, NaN/Inf).
Each failure raises one :class:`CodecError` subclass; decoders return new objects and never touch
the caller's state, so a rejected frame changes nothing.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, fields

import numpy as np
import torch
import zstandard

from lordba_fl.adapter.packing import pack_bits, pack_signs, packed_row_bytes, unpack_bits, unpack_signs  # noqa: F401  (re-exported)
from lordba_fl.errors import (  # noqa: F401  (re-exported: the codec's errors)
    BaseVersionError,
    ChecksumError,
    CodecError,
    DecompressionBombError,
    FormatVersionError,
    MalformedFrameError,
    ModelMismatchError,
    NonFiniteError,
    ShapeMismatchError,
    TruncatedFrameError,
)
from lordba_fl.wire.codes import fp16_round, pack_codes, unpack_codes  # noqa: F401  (re-exported)
from lordba_fl.wire.frame import Container, bounded_inflate, check_zstd_level
from lordba_fl.methods.lordba.layout import UNVERSIONED, AdapterSpec, AdapterState

# --------------------------------------------------------------------------------------------------
# Frames

MAGIC = b"LDBA"
FRAME_FORMAT_VERSION = 1
# fields between version and CRC: kind, flags, fingerprint, round, version, base version, dictionary id,
# layers, sign encoding, scale encoding, scale mask, reserved, bits, set bits, then raw / compressed
# lengths of the table, sign and scale sections (indices 14..19)
CONTAINER = Container(
    "LoRDBA", MAGIC, FRAME_FORMAT_VERSION, "<4sHBB16sIIIIIBBBBQQIIIIIII",
    total_length=lambda f: CONTAINER.header_bytes + f[15] + f[17] + f[19],
    hint=": run the same lordba-fl release on server and clients",
)
HEADER_BYTES = CONTAINER.header_bytes  # 92
_FLAG_DICTIONARY = 1
_ESCAPE = 255  # GAPS: a byte of 255 adds 255 to the current gap; any other byte ends it
_SPARSE_DENSITY = 0.125  # above this GAPS is never smaller than PACKED


class FrameKind(enum.IntEnum):
    UPDATE = 1  # client -> server: flip mask vs the broadcast + scale deltas
    STATE_FULL = 2  # server -> client: signs + fp16 scales
    STATE_DELTA = 3  # server -> client: flip mask vs a base version + fp16 scales


class SignEncoding(enum.IntEnum):
    PACKED = 0
    GAPS = 1


class ScaleEncoding(enum.IntEnum):
    FP16 = 0
    Q8 = 1
    FP16_XOR = 2  # state deltas: the fp16 bit patterns XOR those of the base version's scales
    Q4 = 3  # like Q8 with 4-bit codes in [-7, 7], two per byte
    Q2 = 4  # like Q8 with 2-bit codes in [-1, 1], four per byte
    Q3 = 5  # like Q8 with codes in [-3, 3] in 4-bit fields, two per byte (zstd's entropy stage takes the spare bit)


_SCALE_ENCODINGS = {"fp16": ScaleEncoding.FP16, "q8": ScaleEncoding.Q8, "q4": ScaleEncoding.Q4,
                    "q3": ScaleEncoding.Q3, "q2": ScaleEncoding.Q2}
# quantized scale encodings: (bits of a packed field, L: codes in [-L, L])
_QUANT = {ScaleEncoding.Q8: (8, 127), ScaleEncoding.Q4: (4, 7), ScaleEncoding.Q3: (4, 3), ScaleEncoding.Q2: (2, 1)}
SCALE_ROUNDINGS = ("stochastic", "nearest")


@dataclass(frozen=True)
class CodecOptions:
    """Wire codec settings; every party of a federation must use the same ``dictionary``.

    Parameters
    ----------
    level : int
        zstd compression level (-7 fastest ... 22 smallest); 3 is zstd's default.
    scale_encoding : str
        Uplink scale deltas as ``"fp16"``, ``"q8"``, ``"q4"``, ``"q3"`` or ``"q2"`` (codes in
        ``[-L, L]``, L = 127 / 7 / 3 / 1, in 8 / 4 / 4 / 2-bit fields, one fp16 step per layer and
        scale kind, rounded as ``scale_rounding`` says).
    dictionary : bytes, optional
        A zstd dictionary (:func:`train_dictionary`) used for every section.
    state_mantissa_bits : int
        Mantissa bits kept of each broadcast (state) scale, 1..10 (10: plain fp16); fewer make the
        downlink's XOR deltas cheaper (7 is bfloat16's precision). Rounded to nearest even, in full
        and delta frames alike, so every receiver holds the same values.
    scale_rounding : str
        How ``q8`` / ``q4`` / ``q3`` / ``q2`` uplink codes round: ``"stochastic"`` (the no-clip step
        ``max|x| / L``, unbiased) or ``"nearest"`` (the step, among ``max|x| / L`` times
        ``2^(-j/2)``, j = 0..8, with the least squared error per layer and scale kind; codes clip at
        ``L``; biased toward zero, so pair it with the client's error feedback). Receivers decode
        both alike.
    state_scale_encoding : str
        Broadcast scales of a *delta* frame: ``"fp16"`` (the exact fp16 bits XOR the base's) or
        ``"q8"`` / ``"q4"`` / ``"q3"`` / ``"q2"``: codes in ``[-L, L]`` of the difference to the receiver's
        scales, rounded to nearest, one fp16 step per layer and scale kind chosen to minimise the
        squared error (steps above ``L`` clip); the receiver holds ``base + q * step`` rounded to
        ``state_mantissa_bits``, which the sender reproduces by decoding its own frame. Full frames
        are always fp16.
    scale_fraction : float
        In (0, 1]: the share of the ``in`` / ``out`` scale entries whose deltas an update, or a
        quantized state delta, carries. Whole (layer, scale kind) segments go in order of their
        mean squared delta, largest first, until the share is reached; the others are sent as zero
        codes (nearly free after zstd), and ``mid`` scales always go. The sender keeps what waits:
        a client's error feedback, the server's copy of each node's scales. 1: every segment.
    """

    level: int = 3
    scale_encoding: str = "fp16"
    dictionary: bytes | None = None
    state_mantissa_bits: int = 10
    state_scale_encoding: str = "fp16"
    scale_rounding: str = "stochastic"
    scale_fraction: float = 1.0

    def __post_init__(self):
        check_zstd_level(self.level)
        if isinstance(self.scale_fraction, bool) or not 0.0 < self.scale_fraction <= 1.0:  # NaN fails too
            raise ValueError(f"scale_fraction must be a number in (0, 1] (1: every scale segment); got {self.scale_fraction!r}")
        if self.scale_rounding not in SCALE_ROUNDINGS:
            raise ValueError(f"scale_rounding must be one of {list(SCALE_ROUNDINGS)}; got {self.scale_rounding!r}")
        if self.scale_encoding not in _SCALE_ENCODINGS:
            raise ValueError(f"scale_encoding must be one of {sorted(_SCALE_ENCODINGS)}; got {self.scale_encoding!r}")
        if self.state_scale_encoding not in _SCALE_ENCODINGS:
            raise ValueError(f"state_scale_encoding must be one of {sorted(_SCALE_ENCODINGS)}; "
                             f"got {self.state_scale_encoding!r}")
        if isinstance(self.state_mantissa_bits, bool) or self.state_mantissa_bits not in range(1, 11):
            raise ValueError(f"state_mantissa_bits must be an integer in 1..10 (10: fp16); got {self.state_mantissa_bits!r}")
        if self.dictionary is not None and not isinstance(self.dictionary, (bytes, bytearray)):
            raise ValueError("dictionary must be the bytes of a zstd dictionary (see train_dictionary) or None")

    @classmethod
    def from_dict(cls, d: dict) -> CodecOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown codec option(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    @property
    def dict_id(self) -> int:
        return _zstd_dict(self.dictionary).dict_id() if self.dictionary else 0


@functools.lru_cache(maxsize=8)
def _zstd_dict(data: bytes) -> zstandard.ZstdCompressionDict:
    return zstandard.ZstdCompressionDict(bytes(data))


@functools.lru_cache(maxsize=8)
def _compressor(level: int, dictionary: bytes | None) -> zstandard.ZstdCompressor:
    d = _zstd_dict(dictionary) if dictionary else None
    return zstandard.ZstdCompressor(level=level, dict_data=d, write_content_size=True, write_checksum=False)


def train_dictionary(samples: list[bytes], size: int = 16384) -> bytes:
    """Train a zstd dictionary on example frames' sections (e.g. earlier rounds' updates)."""
    if len(samples) < 8:
        raise ValueError(f"training a zstd dictionary needs at least 8 samples; got {len(samples)}")
    return zstandard.train_dictionary(size, list(samples)).as_bytes()


@dataclass(frozen=True)
class FrameHeader:
    """The parsed fixed header of a frame (see the module docstring)."""

    format_version: int
    kind: int
    flags: int
    fingerprint: bytes
    round: int
    version: int
    base_version: int
    dict_id: int
    n_layers: int
    sign_encoding: int
    scale_encoding: int
    scale_mask: int
    reserved: int
    n_bits: int
    n_set: int
    table_raw: int
    table_comp: int
    sign_raw: int
    sign_comp: int
    scale_raw: int
    scale_comp: int
    crc: int

    @property
    def total_bytes(self) -> int:
        return HEADER_BYTES + self.table_comp + self.sign_comp + self.scale_comp


@dataclass
class Update:
    """A client's round result in flat layout (:mod:`lordba_fl.methods.lordba.layout`).

    ``flips`` is the bool carrier-stream mask of signs the client flipped against the broadcast it
    trained from (``version``); ``scale_delta`` is ``s_k - s^t`` (fp32, ``(n_scales,)``).
    """

    round: int
    version: int
    flips: torch.Tensor
    scale_delta: torch.Tensor

    @property
    def flip_rate(self) -> float:
        return float(self.flips.float().mean()) if self.flips.numel() else 0.0


def _scale_mask(scales: tuple[str, ...]) -> int:
    return sum(1 << i for i, k in enumerate(("in", "mid", "out")) if k in scales)


def _u32(name: str, value: int) -> int:
    if not isinstance(value, int) or not 0 <= value < UNVERSIONED:
        raise ValueError(f"{name} must be an integer in [0, {UNVERSIONED - 1}]; got {value!r}")
    return value


def _as_numpy_bits(bits: torch.Tensor, n: int, what: str) -> np.ndarray:
    if bits.dtype != torch.bool or bits.shape != (n,):
        raise ValueError(f"{what} must be a bool tensor of shape ({n},) in carrier-stream layout; got {bits.dtype} {tuple(bits.shape)}")
    return bits.detach().cpu().contiguous().numpy()


def _as_numpy_f32(values: torch.Tensor, n: int, what: str) -> np.ndarray:
    if values.shape != (n,) or not values.is_floating_point():
        raise ValueError(f"{what} must be a float tensor of shape ({n},) in scale-stream layout; got {tuple(values.shape)}")
    out = values.detach().float().cpu().contiguous().numpy()
    if not np.isfinite(out).all():
        bad = int(np.flatnonzero(~np.isfinite(out))[0])
        raise ValueError(f"{what} has a non-finite value at index {bad}; a diverged client must not send it")
    return out


# ---- sign section -----------------------------------------------------------------------------


def _popcount(packed: np.ndarray) -> int:
    """Set bits in a uint8 array (64 bits at a time)."""
    head = packed.size // 8 * 8
    total = int(np.bitwise_count(packed[:head].view("<u8")).sum()) if head else 0
    return total + int(np.bitwise_count(packed[head:]).sum())


def _set_positions(bits: np.ndarray, packed: np.ndarray, n_set: int) -> np.ndarray:
    """Sorted indices of the set bits (``np.flatnonzero(bits)``), faster when very sparse."""
    if n_set * 256 > bits.size:
        return np.flatnonzero(bits)
    # very sparse: look only inside the few non-zero 64-bit words
    head = packed.size // 8 * 8
    words = np.flatnonzero(packed[:head].view("<u8"))  # (W,)
    sub = np.unpackbits(packed[:head].view("<u8")[words].view(np.uint8), bitorder="little").view(np.bool_)  # (64 W,)
    idx = np.flatnonzero(sub)
    pos = words[idx >> 6] * 64 + (idx & 63)
    tail = np.flatnonzero(bits[head * 8 :]) + head * 8
    return np.concatenate([pos, tail]) if tail.size else pos


def encode_bits(bits: np.ndarray) -> tuple[int, int, bytes]:
    """(encoding, number of set bits, raw section) for a flat bool array."""
    n = bits.size
    packed = np.packbits(bits, bitorder="little")  # (ceil(n / 8),)
    n_set = _popcount(packed)
    if n_set <= _SPARSE_DENSITY * n:
        pos = _set_positions(bits, packed, n_set)  # (n_set,)
        gaps = np.empty_like(pos)  # zeros before each set bit
        gaps[:1] = pos[:1]
        np.subtract(pos[1:], pos[:-1] + 1, out=gaps[1:])
        if n_set and int(gaps.max()) < _ESCAPE:  # common when p >~ 0.03: one byte per gap
            return SignEncoding.GAPS, n_set, gaps.astype(np.uint8).tobytes()
        counts = gaps // _ESCAPE + 1  # bytes per gap
        total = int(counts.sum())
        if total <= packed.size:
            stream = np.full(total, _ESCAPE, dtype=np.uint8)
            stream[np.cumsum(counts) - 1] = (gaps % _ESCAPE).astype(np.uint8)
            return SignEncoding.GAPS, n_set, stream.tobytes()
    return SignEncoding.PACKED, n_set, packed.tobytes()


def decode_bits(encoding: int, raw: bytes, n: int, n_set: int) -> np.ndarray:
    """Flat bool array of ``n`` bits from a raw sign section; every inconsistency raises."""
    if encoding == SignEncoding.PACKED:
        if len(raw) != (n + 7) // 8:
            raise ShapeMismatchError(f"packed sign section has {len(raw)} bytes; {n} signs need {(n + 7) // 8}")
        packed = np.frombuffer(raw, dtype=np.uint8)
        if n % 8 and packed[-1] >> (n % 8):
            raise MalformedFrameError("packed sign section has set padding bits past the last sign")
        if _popcount(packed) != n_set:
            raise MalformedFrameError(f"sign section has {_popcount(packed)} set bits; header says {n_set}")
        return np.unpackbits(packed, count=n, bitorder="little").view(np.bool_)
    if encoding == SignEncoding.GAPS:
        stream = np.frombuffer(raw, dtype=np.uint8)
        if stream.size and stream[-1] == _ESCAPE:
            raise MalformedFrameError("run-length sign section ends inside a run (trailing 255 bytes)")
        is_end = stream != _ESCAPE  # (S,) one terminator per set bit
        ends = np.cumsum(is_end)  # (S,) terminators so far
        if stream.size and int(ends[-1]) != n_set or not stream.size and n_set:
            raise MalformedFrameError(f"run-length sign section codes {int(ends[-1]) if stream.size else 0} set bits; header says {n_set}")
        # a run's bytes sum to its gap, so the i-th set bit sits at (sum of bytes so far) + i
        pos = np.cumsum(stream, dtype=np.int64)
        pos += ends
        pos -= 1
        if stream.size and pos[-1] >= n:
            raise MalformedFrameError(f"run-length sign section points at bit {int(pos[-1])}; the stream has {n}")
        pos[~is_end] = n  # escape bytes write into a spare slot
        bits = np.zeros(n + 1, dtype=np.bool_)
        bits[pos] = True
        return bits[:n]
    raise MalformedFrameError(f"unknown sign encoding {encoding}; known: {[e.name for e in SignEncoding]}")


# ---- scale section ----------------------------------------------------------------------------


def _encode_fp16(values: np.ndarray, what: str) -> bytes:
    with np.errstate(over="ignore"):
        h = values.astype(np.float16)
    if not np.isfinite(h).all():
        bad = int(np.flatnonzero(~np.isfinite(h))[0])
        raise ValueError(f"{what}[{bad}] = {values[bad]:g} overflows fp16 (|x| > 65504); rescale or reset the adapter")
    return h.view(np.uint8).reshape(-1, 2).T.tobytes()  # low bytes, then high bytes: compresses better


def _decode_fp16(raw: bytes, n: int) -> np.ndarray:
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(2, n)
    values = np.ascontiguousarray(planes.T).view(np.float16).reshape(n).astype(np.float32)
    if not np.isfinite(values).all():
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise NonFiniteError(f"scale section has a non-finite value at index {bad} (NaN or Inf)")
    return values


def _fp16_bits(values: np.ndarray, what: str, mantissa_bits: int = 10) -> np.ndarray:
    """The fp16 bit patterns of ``values`` (n,), rounded to ``mantissa_bits`` (nearest, ties to even)."""
    planes = np.frombuffer(_encode_fp16(values, what), dtype=np.uint8).reshape(2, -1)
    bits = np.ascontiguousarray(planes.T).view(np.uint16).reshape(-1)  # (n,)
    drop = 10 - mantissa_bits
    if drop == 0:
        return bits
    b = bits.astype(np.uint32)
    rounded = (b + ((1 << (drop - 1)) - 1) + ((b >> drop) & 1)) & ~np.uint32((1 << drop) - 1)
    overflow = (rounded & 0x7C00) == 0x7C00  # rounded up past 65504: truncate instead
    return np.where(overflow, b & ~np.uint32((1 << drop) - 1), rounded).astype(np.uint16)


def _planes(bits: np.ndarray) -> bytes:
    return bits.view(np.uint8).reshape(-1, 2).T.tobytes()  # low bytes, then high bytes


def _encode_fp16_xor(values: np.ndarray, base: np.ndarray, what: str, mantissa_bits: int = 10) -> bytes:
    """fp16 bits of ``values`` XOR fp16 bits of ``base``, as byte planes: exact against any held
    version, and a scale that did not change (or changed in its last mantissa bits only) costs
    (almost) nothing after zstd, since its high byte XORs to zero."""
    return _planes(_fp16_bits(values, what, mantissa_bits) ^ _fp16_bits(base, "base.scales", mantissa_bits))


def _decode_fp16_xor(raw: bytes, base: np.ndarray, n: int, mantissa_bits: int = 10) -> np.ndarray:
    """Inverse of :func:`_encode_fp16_xor` with the same ``mantissa_bits``: the base is rounded as the
    sender rounded it (a seeded version 0 need not have ``mantissa_bits``-bit values)."""
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(2, n)
    x = np.ascontiguousarray(planes.T).view(np.uint16).reshape(n) ^ _fp16_bits(base, "base.scales", mantissa_bits)
    values = x.view(np.float16).astype(np.float32)
    if not np.isfinite(values).all():
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise NonFiniteError(f"scale section decodes to a non-finite value at index {bad} (NaN or Inf)")
    return values


def _encode_q(values: np.ndarray, segments: np.ndarray, rng: np.random.Generator, enc: ScaleEncoding) -> bytes:
    bits, levels = _QUANT[enc]  # symmetric codes in [-L, L], so a zero delta is exactly 0
    starts = np.concatenate([[0], np.cumsum(segments)[:-1]])  # (S,)
    amax = np.maximum.reduceat(np.abs(values), starts)  # (S,)
    step = fp16_round(amax / levels, up=True)  # rounded up: |x| / step <= levels, nothing clips
    if not np.isfinite(step).all():
        raise ValueError(f"a scale delta exceeds {levels} * 65504 and cannot be sent as {enc.name.lower()}; "
                         "use scale_encoding='fp16'")
    full = np.repeat(step.astype(np.float32), segments)  # (n,)
    x = np.divide(values, full, out=np.zeros_like(values), where=full > 0)
    q = np.floor(x + rng.random(values.size, dtype=np.float32))  # stochastic rounding: E[q] = x
    q = np.clip(q, -levels, levels)
    codes = q.astype(np.int8).tobytes() if bits == 8 else pack_codes((q + levels).astype(np.uint8), bits).tobytes()
    return step.tobytes() + codes


# candidate steps of a nearest-rounded delta: the no-clip step (max |x| / L) times 2^(-j/2), j = 0..8
_STEP_FRACTIONS = 2.0 ** (-np.arange(9) / 2.0)


def _encode_q_nearest(values: np.ndarray, segments: np.ndarray, enc: ScaleEncoding) -> bytes:
    """``values`` as ``enc``'s codes rounded to nearest, per segment the fp16 step (among
    :data:`_STEP_FRACTIONS` of the no-clip one) with the least squared error, codes clipped to
    ``[-L, L]``; the layout of :func:`_encode_q`, so :func:`_decode_q` reads it. Deterministic."""
    bits, levels = _QUANT[enc]
    starts = np.concatenate([[0], np.cumsum(segments)[:-1]])  # (S,)
    seg = np.repeat(np.arange(segments.size), segments)  # (n,) the segment of each value
    amax = np.maximum.reduceat(np.abs(values), starts)  # (S,)

    def rounded(step):  # (codes, squared error per segment) at one step per segment
        full = np.repeat(step.astype(np.float32), segments)
        q = np.clip(np.rint(np.divide(values, full, out=np.zeros_like(values), where=full > 0)), -levels, levels)
        return q, np.bincount(seg, weights=(values - q * full).astype(np.float64) ** 2, minlength=segments.size)

    best_step, best_err = None, None
    for f in _STEP_FRACTIONS:
        step = fp16_round((amax / levels * f).astype(np.float32), up=True)
        if not np.isfinite(step).all():
            raise ValueError(f"a broadcast scale delta exceeds {levels} * 65504 and cannot be sent as {enc.name.lower()}; "
                             "use codec.state-scale-encoding='fp16'")
        _, err = rounded(step)
        if best_step is None:
            best_step, best_err = step, err
        else:
            better = err < best_err
            best_step, best_err = np.where(better, step, best_step), np.where(better, err, best_err)
    q, _ = rounded(best_step)
    codes = q.astype(np.int8).tobytes() if bits == 8 else pack_codes((q + levels).astype(np.uint8), bits).tobytes()
    return best_step.astype(np.float16).tobytes() + codes


def _decode_q(raw: bytes, segments: np.ndarray, enc: ScaleEncoding) -> np.ndarray:
    (bits, levels), name = _QUANT[enc], ScaleEncoding(enc).name.lower()
    s, n = segments.size, int(segments.sum())
    step = np.frombuffer(raw[: 2 * s], dtype=np.float16)
    if not np.isfinite(step).all():
        raise NonFiniteError(f"{name} scale section has a NaN or infinite quantization step")
    if (step < 0).any():
        raise MalformedFrameError(f"{name} scale section has a negative quantization step")
    if bits == 8:
        q = np.frombuffer(raw[2 * s :], dtype=np.int8)
        if (q == -128).any():
            raise MalformedFrameError("q8 scale section has the value -128, outside the coded range [-127, 127]")
    else:
        packed = np.frombuffer(raw[2 * s :], dtype=np.uint8)
        codes = unpack_codes(packed, bits, n)
        if (codes > 2 * levels).any() or (n % (8 // bits) and packed[-1] >> (bits * (n % (8 // bits)))):
            raise MalformedFrameError(f"{name} scale section has a code outside [-{levels}, {levels}] or padding set")
        q = codes.astype(np.int16) - levels
    return q.astype(np.float32) * np.repeat(step.astype(np.float32), segments)


def carried_entries(values: np.ndarray, spec: AdapterSpec, fraction: float) -> np.ndarray | None:
    """Which scale entries a frame carries under ``CodecOptions.scale_fraction`` (bool ``(n_scales,)``;
    None: all): every ``mid`` segment, then ``in`` / ``out`` segments by mean squared value, largest
    first (ties in wire order), while their entries stay within ``fraction`` of all ``in`` / ``out``
    entries (at least one segment)."""
    if fraction >= 1.0:
        return None
    seg = spec.scale_segments
    ranked = np.tile(np.array([k != "mid" for k in spec.scales]), len(spec.layers))  # (S,)
    starts = np.concatenate([[0], np.cumsum(seg)[:-1]])
    mean_sq = np.add.reduceat(values.astype(np.float64) ** 2, starts) / seg
    order = np.flatnonzero(ranked)[np.argsort(-mean_sq[ranked], kind="stable")]
    within = np.searchsorted(np.cumsum(seg[order]), fraction * seg[ranked].sum(), side="right")
    keep = ~ranked
    keep[order[: max(1, within)]] = True
    return np.repeat(keep, seg)


def _carried(values: np.ndarray, spec: AdapterSpec, fraction: float) -> np.ndarray:
    """``values`` with the entries a frame leaves out (:func:`carried_entries`) set to zero."""
    keep = carried_entries(values, spec, fraction)
    return values if keep is None else np.where(keep, values, np.float32(0)).astype(np.float32)


def _encode_uplink_scales(values: np.ndarray, spec: AdapterSpec, options: CodecOptions, rng) -> bytes:
    """An update's scale section: fp16, or ``q8`` / ``q4`` / ``q3`` / ``q2`` codes rounded as
    ``options.scale_rounding`` says (``rng``: the source of the stochastic rounding), of the
    segments ``options.scale_fraction`` carries."""
    values = _carried(values, spec, options.scale_fraction)
    enc = _SCALE_ENCODINGS[options.scale_encoding]
    if enc not in _QUANT:
        return _encode_fp16(values, "update.scale_delta")
    if options.scale_rounding == "nearest":
        return _encode_q_nearest(values, spec.scale_segments, enc)
    return _encode_q(values, spec.scale_segments, np.random.default_rng(rng), enc)


def scale_roundtrip(delta, spec: AdapterSpec, options: CodecOptions, rng) -> np.ndarray:
    """The scale delta a receiver decodes from :func:`encode_update` with the same ``rng`` (its
    rounding and the segments ``options.scale_fraction`` leaves out included): what a client keeps
    the difference of for error feedback."""
    values = _as_numpy_f32(delta, spec.n_scales, "scale delta")
    enc = _SCALE_ENCODINGS[options.scale_encoding]
    if enc in _QUANT:
        return _decode_q(_encode_uplink_scales(values, spec, options, rng), spec.scale_segments, enc)
    return _carried(values, spec, options.scale_fraction).astype(np.float16).astype(np.float32)


def _scale_raw_bytes(spec: AdapterSpec, encoding: int) -> int:
    if encoding in (ScaleEncoding.FP16, ScaleEncoding.FP16_XOR):
        return 2 * spec.n_scales
    if encoding in _QUANT:
        return 2 * spec.scale_segments.size + (spec.n_scales * _QUANT[encoding][0] + 7) // 8
    raise MalformedFrameError(f"unknown scale encoding {encoding}; known: {[e.name for e in ScaleEncoding]}")


# ---- framing ----------------------------------------------------------------------------------


def _build(
    kind: FrameKind,
    spec: AdapterSpec,
    options: CodecOptions,
    *,
    round: int,
    version: int,
    base_version: int,
    bits: np.ndarray,
    scale_encoding: ScaleEncoding,
    scale_raw: bytes,
) -> bytes:
    comp = _compressor(options.level, options.dictionary)
    sign_enc, n_set, sign_raw = encode_bits(bits)
    table_raw = spec.table_bytes()
    sections = [comp.compress(table_raw), comp.compress(sign_raw), comp.compress(scale_raw)]
    fields = (
        int(kind),
        _FLAG_DICTIONARY if options.dictionary else 0,
        spec.fingerprint,
        _u32("round", round),
        _u32("version", version),
        base_version,
        options.dict_id,
        len(spec.layers),
        int(sign_enc),
        int(scale_encoding),
        _scale_mask(spec.scales),
        0,
        spec.n_bits,
        n_set,
        len(table_raw),
        len(sections[0]),
        len(sign_raw),
        len(sections[1]),
        len(scale_raw),
        len(sections[2]),
    )
    return CONTAINER.seal(fields, sections)


def read_header(buf: bytes | bytearray | memoryview) -> FrameHeader:
    """Parse and check a frame's header and CRC (length, magic, version, checksum); no decompression."""
    buf = memoryview(buf).cast("B") if not isinstance(buf, bytes) else buf
    fields, crc = CONTAINER.open(buf)
    return FrameHeader(FRAME_FORMAT_VERSION, *fields, crc)


def bounded_decompress(section: bytes, raw_len: int, cap: int, options: CodecOptions, what: str) -> bytes:
    """:func:`lordba_fl.wire.frame.bounded_inflate` with the options' zstd dictionary."""
    return bounded_inflate(section, raw_len, cap, what, options.dictionary)


def _parse(
    buf: bytes, spec: AdapterSpec, options: CodecOptions, kinds: tuple[FrameKind, ...]
) -> tuple[FrameHeader, np.ndarray, bytes]:
    """Validate a frame against ``spec`` and return (header, carrier bits, raw scale section)."""
    buf = bytes(buf)
    h = read_header(buf)
    if h.kind not in [int(k) for k in kinds]:
        names = {int(k): k.name for k in FrameKind}
        raise MalformedFrameError(
            f"frame kind is {names.get(h.kind, h.kind)}; expected {' or '.join(k.name for k in kinds)}"
        )
    if h.fingerprint != spec.fingerprint:
        raise ModelMismatchError(
            f"frame was made for model fingerprint {h.fingerprint.hex()}, this adapter is "
            f"{spec.fingerprint.hex()}: load the same base model and LoRDBA alpha/rank on both sides"
        )
    if h.flags & ~_FLAG_DICTIONARY or h.reserved:
        raise MalformedFrameError(f"frame has flags {h.flags:#x} and reserved field {h.reserved}; this lordba-fl knows "
                                  f"flag {_FLAG_DICTIONARY:#x} only and writes reserved 0: run the same release everywhere")
    if h.dict_id != options.dict_id or bool(h.flags & _FLAG_DICTIONARY) != bool(options.dictionary):
        raise ModelMismatchError(
            f"frame was compressed with zstd dictionary id {h.dict_id}, this decoder uses {options.dict_id}: "
            "configure the same codec dictionary on every party"
        )
    if h.n_layers != len(spec.layers) or h.n_bits != spec.n_bits or h.scale_mask != _scale_mask(spec.scales):
        raise ShapeMismatchError(
            f"frame has {h.n_layers} layers, {h.n_bits} signs, scale set mask {h.scale_mask}; this adapter has "
            f"{len(spec.layers)} layers, {spec.n_bits} signs, mask {_scale_mask(spec.scales)} ({','.join(spec.scales)})"
        )
    if h.n_set > h.n_bits:
        raise MalformedFrameError(f"header says {h.n_set} of {h.n_bits} bits are set")
    expected_table = spec.table_bytes()
    o1 = HEADER_BYTES + h.table_comp
    o2 = o1 + h.sign_comp
    table = bounded_decompress(buf[HEADER_BYTES:o1], h.table_raw, len(expected_table), options, "layer table")
    if table != expected_table:
        raise ShapeMismatchError(f"frame's layer table differs from this adapter's: {spec.describe_table(table)}")
    sign_raw = bounded_decompress(buf[o1:o2], h.sign_raw, (spec.n_bits + 7) // 8, options, "sign section")
    bits = decode_bits(h.sign_encoding, sign_raw, spec.n_bits, h.n_set)
    scale_cap = _scale_raw_bytes(spec, h.scale_encoding)
    scale_raw = bounded_decompress(buf[o2:], h.scale_raw, scale_cap, options, "scale section")
    if len(scale_raw) != scale_cap:
        raise ShapeMismatchError(f"scale section has {len(scale_raw)} bytes; this adapter's scales need {scale_cap}")
    return h, bits, scale_raw


# ---- public API -------------------------------------------------------------------------------


def encode_update(
    update: Update,
    spec: AdapterSpec,
    options: CodecOptions | None = None,
    *,
    rng: np.random.Generator | int | None = None,
) -> bytes:
    """Encode a client's :class:`Update` as one frame.

    Parameters
    ----------
    update : Update
        Flip mask ``(n_bits,)`` bool and scale deltas ``(n_scales,)`` in :mod:`lordba_fl.methods.lordba.layout` order.
    spec : AdapterSpec
        The federation's adapter layout.
    options : CodecOptions, optional
        Compression level, scale encoding (fp16, q8, q4, q2) and rounding, and dictionary.
    rng : numpy Generator or int, optional
        Source of the stochastic rounding of quantized scale deltas (seed it for reproducible runs).
    """
    options = options or CodecOptions()
    bits = _as_numpy_bits(update.flips, spec.n_bits, "update.flips")
    delta = _as_numpy_f32(update.scale_delta, spec.n_scales, "update.scale_delta")
    enc = _SCALE_ENCODINGS[options.scale_encoding]
    raw = _encode_uplink_scales(delta, spec, options, rng)
    return _build(
        FrameKind.UPDATE,
        spec,
        options,
        round=update.round,
        version=update.version,
        base_version=UNVERSIONED,
        bits=bits,
        scale_encoding=enc,
        scale_raw=raw,
    )


def decode_update(buf: bytes, spec: AdapterSpec, options: CodecOptions | None = None) -> Update:
    """Decode and fully validate an update frame; raises a :class:`CodecError` subclass on any defect."""
    options = options or CodecOptions()
    h, bits, scale_raw = _parse(buf, spec, options, (FrameKind.UPDATE,))
    if h.scale_encoding in _QUANT:
        delta = _decode_q(scale_raw, spec.scale_segments, ScaleEncoding(h.scale_encoding))
    else:
        delta = _decode_fp16(scale_raw, spec.n_scales)
    return Update(h.round, h.version, torch.from_numpy(bits), torch.from_numpy(delta))


def encode_state(
    state: AdapterState,
    spec: AdapterSpec,
    options: CodecOptions | None = None,
    *,
    round: int = 0,
    base: AdapterState | None = None,
) -> bytes:
    """Encode the broadcast state, in full or as a delta against ``base`` (a version the receiver holds).

    Scales travel as fp16 in a full frame. A delta frame sends their fp16 bits XOR those of
    ``base.scales`` (``FP16_XOR``), so it reconstructs exactly what a full frame would, provided the
    receiver holds ``base`` as it was broadcast; with ``options.state_scale_encoding`` q8 / q4 / q3 / q2 it
    sends the difference to ``base.scales`` in nearest-rounded codes instead, and the receiver holds
    an approximation of ``state.scales`` (of the segments ``options.scale_fraction`` carries; the
    others stay as in ``base``): :func:`decode_state` of the frame says which.
    """
    options = options or CodecOptions()
    neg = _as_numpy_bits(state.negative, spec.n_bits, "state.negative")
    values = _as_numpy_f32(state.scales, spec.n_scales, "state.scales")
    m = options.state_mantissa_bits
    if base is None:
        kind, bits, base_version = FrameKind.STATE_FULL, neg, UNVERSIONED
        enc, raw = ScaleEncoding.FP16, _planes(_fp16_bits(values, "state.scales", m))
    else:
        base_neg = _as_numpy_bits(base.negative, spec.n_bits, "base.negative")
        kind, bits, base_version = FrameKind.STATE_DELTA, neg ^ base_neg, _u32("base.version", base.version)
        base_values = _as_numpy_f32(base.scales, spec.n_scales, "base.scales")
        enc = _SCALE_ENCODINGS[options.state_scale_encoding]
        if enc in _QUANT:
            diff = _carried(values - base_values, spec, options.scale_fraction)
            raw = _encode_q_nearest(diff, spec.scale_segments, enc)
        else:
            enc, raw = ScaleEncoding.FP16_XOR, _encode_fp16_xor(values, base_values, "state.scales", m)
    return _build(
        kind,
        spec,
        options,
        round=round,
        version=state.version,
        base_version=base_version,
        bits=bits,
        scale_encoding=enc,
        scale_raw=raw,
    )


def decode_state(
    buf: bytes,
    spec: AdapterSpec,
    options: CodecOptions | None = None,
    *,
    base: AdapterState | None = None,
) -> AdapterState:
    """Decode a state frame into a new :class:`AdapterState` (``base`` is read, never modified).

    A delta frame needs ``base`` at the frame's base version; otherwise :class:`BaseVersionError`
    says to request the full state.
    """
    options = options or CodecOptions()
    h, bits, scale_raw = _parse(buf, spec, options, (FrameKind.STATE_FULL, FrameKind.STATE_DELTA))
    allowed = ((ScaleEncoding.FP16, ScaleEncoding.FP16_XOR, *_QUANT) if h.kind == FrameKind.STATE_DELTA
               else (ScaleEncoding.FP16,))
    if h.scale_encoding not in allowed:
        raise MalformedFrameError(f"{FrameKind(h.kind).name} frames carry {' or '.join(e.name for e in allowed)} "
                                  f"scales; this one declares encoding {h.scale_encoding}")
    if h.kind == FrameKind.STATE_DELTA:
        if base is None or base.version != h.base_version:
            held = "no state" if base is None else f"version {base.version}"
            raise BaseVersionError(
                f"frame is a delta against version {h.base_version}, the receiver holds {held}: request the full state"
            )
        negative = torch.from_numpy(_as_numpy_bits(base.negative, spec.n_bits, "base.negative") ^ bits)
    else:
        negative = torch.from_numpy(bits)
    if h.scale_encoding == ScaleEncoding.FP16_XOR:
        base_values = _as_numpy_f32(base.scales, spec.n_scales, "base.scales")
        scales = torch.from_numpy(_decode_fp16_xor(scale_raw, base_values, spec.n_scales, options.state_mantissa_bits))
    elif h.scale_encoding in _QUANT:  # the held scales plus the codes, rounded as the sender's state is
        base_values = _as_numpy_f32(base.scales, spec.n_scales, "base.scales")
        with np.errstate(over="ignore", invalid="ignore"):
            values = base_values + _decode_q(scale_raw, spec.scale_segments, ScaleEncoding(h.scale_encoding))
        if not (np.abs(values) <= 65504).all():  # NaN compares False
            bad = int(np.flatnonzero(~(np.abs(values) <= 65504))[0])
            raise NonFiniteError(f"scale delta frame takes scale {bad} to {values[bad]:g}, outside fp16's range")
        bits16 = _fp16_bits(values, "state.scales", options.state_mantissa_bits)
        scales = torch.from_numpy(bits16.view(np.float16).astype(np.float32))
    else:
        scales = torch.from_numpy(_decode_fp16(scale_raw, spec.n_scales))
    return AdapterState(h.version, negative, scales)
