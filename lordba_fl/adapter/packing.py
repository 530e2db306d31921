"""Bit-packing of sign carriers: row-wise, LSB first, negative -> 1 (the packed file and the wire share it)."""

from __future__ import annotations

import numpy as np
import torch

from lordba_fl.errors import CodecError

_BIT_WEIGHTS_CACHE: dict[torch.device, torch.Tensor] = {}


def _bit_weights(device: torch.device) -> torch.Tensor:
    w = _BIT_WEIGHTS_CACHE.get(device)
    if w is None:
        w = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)
        _BIT_WEIGHTS_CACHE[device] = w
    return w


def packed_row_bytes(cols: int) -> int:
    """Bytes of one packed row of ``cols`` signs."""
    return (cols + 7) // 8


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a 2-D boolean tensor row-wise, LSB first; returns uint8 ``(rows, ceil(cols / 8))`` on its device."""
    if bits.dim() != 2:
        raise ValueError(f"pack_bits expects a 2-D (rows, cols) tensor; got shape {tuple(bits.shape)}")
    if bits.device.type == "cpu":
        b = bits.detach().to(torch.bool).contiguous().numpy()
        return torch.from_numpy(np.packbits(b, axis=1, bitorder="little"))
    return _pack_bits_torch(bits)


def _pack_bits_torch(bits: torch.Tensor) -> torch.Tensor:
    rows, cols = bits.shape
    pad = (-cols) % 8
    b = bits.to(torch.uint8)
    if pad:
        b = torch.nn.functional.pad(b, (0, pad))  # (rows, cols + pad)
    b = b.view(rows, (cols + pad) // 8, 8)  # (rows, nbytes, 8)
    return (b * _bit_weights(b.device)).sum(dim=-1, dtype=torch.uint8)  # (rows, nbytes); bits never overlap


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``(rows, ceil(cols / 8))`` -> bool ``(rows, cols)`` on its device."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise CodecError(f"packed signs must be a 2-D uint8 tensor; got {packed.dtype} of shape {tuple(packed.shape)}")
    if packed.shape[1] != packed_row_bytes(cols):
        raise CodecError(
            f"packed signs have {packed.shape[1]} bytes per row but {cols} columns need {packed_row_bytes(cols)}"
        )
    if packed.device.type == "cpu":
        bits = torch.from_numpy(np.unpackbits(packed.contiguous().numpy(), axis=1, bitorder="little").view(np.bool_))
    else:
        bits = (packed.unsqueeze(-1) & _bit_weights(packed.device)) != 0  # (rows, nbytes, 8)
        bits = bits.view(packed.shape[0], packed.shape[1] * 8)  # (rows, nbytes * 8)
    if bits.shape[1] > cols and bool(bits[:, cols:].any()):
        raise CodecError("packed signs have set padding bits: the buffer is corrupt or was packed with another width")
    return bits[:, :cols]


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """Pack a ``(rows, cols)`` sign (or latent) tensor: negative entries -> bit 1, others (incl. 0) -> bit 0."""
    return pack_bits(signs < 0)


def unpack_signs(packed: torch.Tensor, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unpack to a ``(rows, cols)`` tensor of ``+1`` / ``-1`` in ``dtype``."""
    bits = unpack_bits(packed, cols)
    return 1.0 - 2.0 * bits.to(dtype)
