"""Value codes every method's frames share: fp16 rounding in a chosen direction, and unsigned
1/2/4/8-bit codes packed into bytes (least significant first)."""

from __future__ import annotations

import numpy as np


def fp16_round(x32: np.ndarray, up: bool) -> np.ndarray:
    """``x32`` to fp16 rounded up (``up``) or down instead of to nearest (inf where it overflows)."""
    with np.errstate(over="ignore"):
        h = x32.astype(np.float16)
    wrong = h.astype(np.float32) < x32 if up else h.astype(np.float32) > x32
    return np.where(wrong, np.nextafter(h, np.float16(np.inf if up else -np.inf)), h)


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``bits``-bit codes (1, 2, 4 or 8 bits) packed little-end first into bytes (the last padded)."""
    per = 8 // bits
    pad = (-q.size) % per
    q = np.concatenate([q.astype(np.uint8), np.zeros(pad, np.uint8)]).reshape(-1, per)  # (bytes, per)
    shifts = (np.arange(per, dtype=np.uint8) * bits)[None, :]
    return np.bitwise_or.reduce(q << shifts, axis=1).astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: the first ``n`` codes."""
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits)[None, :]
    return ((packed[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:n]
