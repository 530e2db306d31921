"""The wire: the flat adapter layout every message uses, the frame codec (bit-packed, zstd-compressed
sign flips and scale deltas; header, CRC and bounded inflate), client-state packing and byte metering.

Below it: :mod:`lordba_fl.adapter`, :mod:`lordba_fl.base`, :mod:`lordba_fl.errors`."""
