"""Errors of every byte format the library reads (packed files, wire frames): one base class,
:class:`CodecError`, and one subclass per kind of failure, so callers can catch them precisely."""

from __future__ import annotations


class CodecError(ValueError):
    """A packed buffer or frame could not be decoded; the message says what was wrong."""


class TruncatedFrameError(CodecError):
    """The frame is shorter (or longer) than its header declares."""


class ChecksumError(CodecError):
    """The CRC-32 does not match: the frame was corrupted in transit or storage."""


class FormatVersionError(CodecError):
    """The frame was written by an incompatible codec version (or is not a lordba-fl frame)."""


class ModelMismatchError(CodecError):
    """The frame was made for another base model, adapter scaling, or zstd dictionary."""


class ShapeMismatchError(CodecError):
    """The frame's layer table, scale set or stream sizes differ from the receiver's adapter."""


class NonFiniteError(CodecError):
    """Scale values or quantization steps in the frame are NaN or infinite."""


class DecompressionBombError(CodecError):
    """A section declares or produces more bytes than the receiver's shapes allow."""


class MalformedFrameError(CodecError):
    """The frame is structurally invalid (unknown kind or encoding, bad run lengths, set padding bits)."""


class BaseVersionError(CodecError):
    """A state delta refers to a version the receiver does not hold; it must ask for the full state."""
