"""What every method's messages share: the frame container (header, CRC, bounded inflate), value
codes, byte metering of Flower messages and the checks every client reply passes. Each method's own
wire format lives in its package (e.g. :mod:`lordba_fl.methods.lordba.codec`).

Below it: :mod:`lordba_fl.errors`."""
