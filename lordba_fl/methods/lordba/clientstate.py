"""Compact per-client state for stateful simulated devices (what lives in Flower's ``context.state``).

A stateful LoRDBA client keeps, between the rounds it is sampled in:

* the global adapter it holds: the signs bit-packed with the scales in a ``STATE_FULL`` frame
  (:mod:`lordba_fl.methods.lordba.codec`), needed anyway to decode the next downlink delta;
* optionally its latent magnitudes ``|L|`` (the signs come from the broadcast), and
* optionally its AdamW moments (``exp_avg`` and ``sqrt(exp_avg_sq)``) and step counts.

Float streams are stored as one of :data:`STATE_DTYPES`, in blocks of :data:`BLOCK` values:

``fp32``
    raw little-endian floats (exact).
``fp16``
    each block divided by its absolute maximum (kept as fp32) then cast to fp16: relative error
    ``<= 2^-11`` for values within ``2^14`` of the block maximum, and no fp16 underflow of small
    optimizer moments.
``q8``
    one byte per value: a level of ``log2|x|`` spread over the block's ``[min, max]`` of
    ``log2|x|`` (two fp32 per block), 255 levels for a stream with no negative value (magnitudes,
    ``sqrt(v)``; a leading flag byte says which), else a sign bit and 127 levels; exact zeros stay
    zero. The error is relative: ``|log2|x_hat| - log2|x|| <= (hi - lo) / (2 (levels - 1))`` in a
    block. A logarithmic code keeps both the large and the tiny magnitudes (a linear one would zero
    the small ``sqrt(v)`` and blow up Adam's step ``m / sqrt(v)``).

The records are a Flower ``ConfigRecord`` of bytes fields, so their size is what ``context.state``
costs (:func:`lordba_fl.wire.metering.recorddict_bytes` reports it every round). A client that is not
sampled is never called, so its state costs memory only.
"""

from __future__ import annotations

import numpy as np
import torch

from lordba_fl.train import PlainAdamW

STATE_DTYPES = ("fp32", "fp16", "q8")
STATE_KINDS = ("none", "latent", "latent+optimizer")
BLOCK = 1024
_LEVELS = {False: 127, True: 255}  # q8 levels of a signed / non-negative stream; code 0 is an exact zero


class StateError(ValueError):
    """A stored client state that cannot be read back (wrong size, unknown dtype)."""


def _blocks(x: np.ndarray) -> np.ndarray:
    """``x`` (n,) zero-padded to whole blocks, as (n_blocks, BLOCK)."""
    pad = (-len(x)) % BLOCK
    return np.concatenate([x, np.zeros(pad, x.dtype)]).reshape(-1, BLOCK)


def encoded_size(n: int, dtype: str) -> int:
    """Bytes :func:`pack_floats` produces for ``n`` values."""
    n_blocks = -(-n // BLOCK)
    return {"fp32": 4 * n, "fp16": 2 * n + 4 * n_blocks, "q8": 1 + n + 8 * n_blocks}[_check_dtype(dtype)]


def _check_dtype(dtype: str) -> str:
    if dtype not in STATE_DTYPES:
        raise ValueError(f"client state dtype must be one of {STATE_DTYPES}; got {dtype!r}")
    return dtype


def pack_floats(x: torch.Tensor, dtype: str) -> bytes:
    """A flat float tensor ``(n,)`` as ``dtype`` bytes (see module docstring); NaN/inf refused."""
    _check_dtype(dtype)
    v = x.detach().reshape(-1).to("cpu", torch.float64).numpy()  # (n,)
    if not np.isfinite(v).all():
        raise StateError("client state holds NaN or inf; the local training diverged (lower the learning rate)")
    if dtype == "fp32":
        return v.astype("<f4").tobytes()
    blocks = _blocks(v)  # (n_blocks, BLOCK)
    n = len(v)
    if dtype == "fp16":
        amax = np.abs(blocks).max(axis=1).astype("<f4")  # (n_blocks,)
        safe = np.where(amax > 0, amax, 1.0).astype(np.float64)[:, None]
        half = (blocks / safe).astype("<f2").reshape(-1)[:n]
        return amax.tobytes() + half.tobytes()
    unsigned = not np.signbit(v).any()
    levels = _LEVELS[unsigned]
    mag = np.abs(blocks)
    nz = mag > 0
    logs = np.log2(np.where(nz, mag, 1.0))  # (n_blocks, BLOCK)
    lo = np.where(nz, logs, np.inf).min(axis=1)
    hi = np.where(nz, logs, -np.inf).max(axis=1)
    empty = ~np.isfinite(lo)
    lo, hi = np.where(empty, 0.0, lo).astype("<f4"), np.where(empty, 0.0, hi).astype("<f4")
    span = (hi.astype(np.float64) - lo)[:, None]
    t = np.where(span > 0, (logs - lo.astype(np.float64)[:, None]) / np.where(span > 0, span, 1.0), 0.0)
    level = np.rint(t * (levels - 1)).astype(np.uint8) + 1  # 1..levels
    sign = np.zeros_like(level) if unsigned else np.signbit(blocks).astype(np.uint8) << 7
    code = np.where(nz, level | sign, 0).astype(np.uint8)
    return bytes([unsigned]) + lo.tobytes() + hi.tobytes() + code.reshape(-1)[:n].tobytes()


def unpack_floats(buf: bytes, n: int, dtype: str) -> torch.Tensor:
    """Inverse of :func:`pack_floats`: an fp32 tensor ``(n,)``."""
    _check_dtype(dtype)
    want = encoded_size(n, dtype)
    if len(buf) != want:
        raise StateError(f"client state stream has {len(buf)} bytes; {n} values as {dtype} need {want}")
    n_blocks = -(-n // BLOCK)
    if dtype == "fp32":
        out = np.frombuffer(buf, "<f4").astype(np.float32)
    elif dtype == "fp16":
        amax = np.frombuffer(buf, "<f4", n_blocks).astype(np.float64)
        half = np.frombuffer(buf, "<f2", offset=4 * n_blocks).astype(np.float64)
        out = (_blocks(half) * amax[:, None]).reshape(-1)[:n].astype(np.float32)
    else:
        if buf[0] not in (0, 1):
            raise StateError(f"q8 client state starts with flag {buf[0]}; expected 0 or 1 (state corrupted)")
        unsigned = bool(buf[0])
        lo = np.frombuffer(buf, "<f4", n_blocks, offset=1).astype(np.float64)[:, None]
        hi = np.frombuffer(buf, "<f4", n_blocks, offset=1 + 4 * n_blocks).astype(np.float64)[:, None]
        code = _blocks(np.frombuffer(buf, np.uint8, offset=1 + 8 * n_blocks))  # (n_blocks, BLOCK)
        level = (code if unsigned else code & 0x7F).astype(np.float64)
        mag = np.exp2(lo + (level - 1) / (_LEVELS[unsigned] - 1) * (hi - lo))
        val = mag if unsigned else np.where(code & 0x80, -mag, mag)
        out = np.where(level > 0, val, 0.0).reshape(-1)[:n].astype(np.float32)
    return torch.from_numpy(out.copy())


# --------------------------------------------------------------------------------------------------
# Optimizer moments


def _adam_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW | PlainAdamW):
        raise ValueError(
            f"client.state=latent+optimizer keeps Adam moments; {type(optimizer).__name__} has none "
            "(set train.optimizer=adamw or client.state=latent)"
        )
    return [p for g in optimizer.param_groups for p in g["params"]]


def pack_optimizer(optimizer: torch.optim.Optimizer, dtype: str) -> dict[str, bytes | int]:
    """AdamW moments of every parameter (group order, flattened) as compact ``dtype`` streams.

    Parameters that never stepped are stored as zero moments with step 0.
    """
    params = _adam_params(optimizer)
    m, r, steps = [], [], []
    for p in params:
        st = optimizer.state.get(p, {})
        m.append(st["exp_avg"].reshape(-1) if st else torch.zeros(p.numel()))
        r.append(st["exp_avg_sq"].reshape(-1).sqrt() if st else torch.zeros(p.numel()))
        steps.append(int(st["step"]) if st else 0)
    return {
        "exp-avg": pack_floats(torch.cat([t.float().cpu() for t in m]), dtype),
        "exp-avg-sq-root": pack_floats(torch.cat([t.float().cpu() for t in r]), dtype),
        "steps": np.asarray(steps, "<i4").tobytes(),
    }


def load_optimizer_(optimizer: torch.optim.Optimizer, record, dtype: str) -> None:
    """Inverse of :func:`pack_optimizer`, into a freshly built optimizer over the same parameters."""
    params = _adam_params(optimizer)
    sizes = [p.numel() for p in params]
    total = sum(sizes)
    steps = np.frombuffer(record["steps"], "<i4")
    if len(steps) != len(params):
        raise StateError(f"stored optimizer state covers {len(steps)} parameters; this optimizer has {len(params)}")
    m = unpack_floats(record["exp-avg"], total, dtype).split(sizes)
    r = unpack_floats(record["exp-avg-sq-root"], total, dtype).split(sizes)
    for p, mi, ri, step in zip(params, m, r, steps):
        if step == 0:
            continue
        optimizer.state[p] = {
            "step": torch.tensor(float(step)),
            "exp_avg": mi.view_as(p).to(p.device, p.dtype).clone(),
            "exp_avg_sq": ri.square().view_as(p).to(p.device, p.dtype),
        }
