"""The LoRA baselines' wire format: one framed buffer (``LORA`` container: header, CRC, optional
zstd) holding a flat vector in the layout per layer ``A`` (``(r, in)``, row-major) then ``Bᵀ``
(``(r, out)``, row-major), so each rank-1 component's input and output vectors are contiguous
*channels*; fp16 values, or per-channel 2/4-bit codes (min-max affine, fp16 offset and step per
channel, stochastic rounding)."""

from __future__ import annotations

import numpy as np
import torch
import zstandard

from lordba_fl.errors import DecompressionBombError, MalformedFrameError, NonFiniteError, ShapeMismatchError
from lordba_fl.wire.codes import fp16_round, pack_codes, unpack_codes
from lordba_fl.wire.frame import Container, bounded_inflate

# magic, version | kind, bits, round, state version, reserved, raw length, compressed length (0: stored) | crc
LORA_CONTAINER = Container("LoRA", b"LORA", 1, "<4sHBBIIQIII",
                           total_length=lambda f: LORA_CONTAINER.header_bytes + (f[6] or f[5]))
FP16, QUANT = 0, 1
DELTAS = 6  # LORA frame kind: the quantized global deltas of versions base+1..version (lora-q2-both)
STATE_KEY = "lora.held"  # context.state: the values and version a lora-q2-both node holds



def quantize_channels(values: np.ndarray, segments: np.ndarray, bits: int, rng: np.random.Generator) -> bytes:
    """Per-channel min-max quantization with stochastic rounding: fp16 (lo, step) per channel + packed codes."""
    starts = np.concatenate([[0], np.cumsum(segments)[:-1]])
    hi32 = np.maximum.reduceat(values, starts)
    lo = fp16_round(np.minimum.reduceat(values, starts), up=False)  # lo down, step up: every value fits
    levels = (1 << bits) - 1
    step = fp16_round((hi32 - lo.astype(np.float32)) / levels, up=True)
    if not (np.isfinite(lo).all() and np.isfinite(step).all()):
        raise ValueError("a LoRA update is outside fp16 range; lower the learning rate")
    lo_full = np.repeat(lo.astype(np.float32), segments)
    step_full = np.repeat(step.astype(np.float32), segments)
    x = np.divide(values - lo_full, step_full, out=np.zeros_like(values), where=step_full > 0)
    q = np.clip(np.floor(x + rng.random(values.size, dtype=np.float32)), 0, levels).astype(np.uint8)
    return lo.tobytes() + step.tobytes() + pack_codes(q, bits).tobytes()


def dequantize_channels(raw: bytes, segments: np.ndarray, bits: int) -> np.ndarray:
    s = segments.size
    n = int(segments.sum())
    lo = np.frombuffer(raw[: 2 * s], np.float16).astype(np.float32)
    step = np.frombuffer(raw[2 * s : 4 * s], np.float16).astype(np.float32)
    if not (np.isfinite(lo).all() and np.isfinite(step).all()) or (step < 0).any():
        raise NonFiniteError("LoRA update has a non-finite or negative channel offset/step")
    q = unpack_codes(np.frombuffer(raw[4 * s :], np.uint8), bits, n).astype(np.float32)
    return np.repeat(lo, segments) + q * np.repeat(step, segments)


def raw_size(kind: int, bits: int, segments: np.ndarray) -> int:
    n = int(segments.sum())
    if kind != QUANT:  # fp16 values (every other kind)
        return 2 * n
    return 4 * segments.size + (n * bits + 7) // 8


def encode_lora(kind: int, bits: int, round: int, version: int, payload: bytes, compress: bool, reserved: int = 0,
                level: int = 3) -> bytes:
    """A LoRA frame; ``reserved`` is the base version of a FLoRA stack (:mod:`lordba_fl.methods.lora.flora`);
    ``level``: zstd's (``codec.level``) when ``compress``."""
    body = zstandard.ZstdCompressor(level=level).compress(payload) if compress else payload
    return LORA_CONTAINER.seal((kind, bits, round, version, reserved, len(payload), len(body) if compress else 0), [body])


def decode_lora(frame: bytes, segments: np.ndarray, kinds: tuple[int, ...]) -> tuple[int, int, int, int, bytes]:
    """Validate a LoRA frame against the receiver's layout; returns (kind, bits, round, version, raw payload)."""
    (kind, bits, rnd, version, reserved, raw_len, comp_len), _ = LORA_CONTAINER.open(frame)
    if kind not in kinds or (kind == QUANT and bits not in (2, 4)) or (kind != QUANT and bits):
        raise MalformedFrameError(f"LoRA frame kind {kind} / {bits} bits is not what this method sends")
    if reserved:
        raise MalformedFrameError(f"LoRA frame's reserved field is {reserved}; lordba-fl writes 0")
    want = raw_size(kind, bits, segments)
    if raw_len != want:
        raise (DecompressionBombError if raw_len > want else ShapeMismatchError)(
            f"LoRA payload declares {raw_len} bytes; this adapter's shapes need {want}"
        )
    body = frame[LORA_CONTAINER.header_bytes :]
    if comp_len:
        body = bounded_inflate(body, raw_len, want, "LoRA payload")
    return kind, bits, rnd, version, body


def save_peft_factors(out, names: list[str], factors: list[tuple[torch.Tensor, torch.Tensor]], alpha: float) -> None:
    """Write a PEFT LoRA directory ``out`` from per-layer ``(A (r, in), B (out, r))`` of the modules
    ``names`` (a method whose product is not PEFT's own layout exports through this)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    tensors = {}
    for name, (a, b) in zip(names, factors):
        tensors[f"{name}.lora_A.weight"] = a.float().contiguous()
        tensors[f"{name}.lora_B.weight"] = b.float().contiguous()
    out.mkdir(parents=True, exist_ok=True)
    targets = sorted({n.rsplit(".", 1)[-1] for n in names})
    LoraConfig(r=factors[0][0].shape[0], lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none",
               task_type="CAUSAL_LM").save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def note_version(node_versions: dict[int, int], node_id: int, version: int | None, current: int) -> None:
    """Record that ``node_id`` holds ``version`` (forgotten when unknown or newer than the server's
    ``current``: the node then gets what a node holding nothing gets)."""
    if version is None or version > current:
        node_versions.pop(node_id, None)
    else:
        node_versions[node_id] = version


def fp16_values(raw: bytes) -> np.ndarray:
    values = np.frombuffer(raw, np.float16).astype(np.float32)
    if not np.isfinite(values).all():
        raise NonFiniteError("LoRA frame carries NaN or Inf values")
    return values
