"""Every value a client sends, checked in one place before anything reads it.

A reply's metric record may only hold the keys a lordba-fl client sends (:data:`REPLY_METRICS`) or
that its method declares (:attr:`lordba_fl.methods.Method.reply_metrics`), each a finite number of
the expected kind and range; ``num-examples`` (the reply's aggregation weight) is positive and
bounded. A reply that breaks any rule is refused with a :class:`ReplyError` naming the rule, and the
round goes on without it: the server never converts an unchecked client value.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass


class ReplyError(ValueError):
    """A client reply broke a rule; the message names the field and what was wrong."""


@dataclass(frozen=True)
class Bound:
    """The accepted values of one reply metric: a finite number in ``[lo, hi]`` (``lo`` excluded when
    ``open_lo``), a whole number when ``integer``."""

    lo: float = -math.inf
    hi: float = math.inf
    integer: bool = False
    open_lo: bool = False

    def check(self, key: str, value) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ReplyError(f"metric {key!r} must be a number; got {type(value).__name__}")
        v = float(value) if not isinstance(value, int) or abs(value) < 2**63 else math.inf
        if not math.isfinite(v):
            raise ReplyError(f"metric {key!r} must be finite; got {value!r}")
        if v < self.lo or v > self.hi or (self.open_lo and v == self.lo):
            side = "(" if self.open_lo else "["
            raise ReplyError(f"metric {key!r} = {value!r} is outside {side}{self.lo:g}, {self.hi:g}]")
        if self.integer and v != int(v):
            raise ReplyError(f"metric {key!r} must be a whole number; got {value!r}")
        return v


MAX_WEIGHT = 2.0**40  # num-examples: more than any device holds, small enough that sums stay exact in float64
MAX_METRICS = 64  # entries in one reply's metric record
_COUNT = Bound(0, 2.0**53, integer=True)
_LOSS = Bound(0, 1e4)
REPLY_METRICS: dict[str, Bound] = {
    "num-examples": Bound(0, MAX_WEIGHT, open_lo=True),
    "held-version": Bound(0, 2**32 - 1, integer=True),
    "partition-id": Bound(0, 2**31 - 1, integer=True),
    "rank": Bound(1, 2**16, integer=True),
    "tier-mismatch": Bound(0, 1, integer=True),
    "client-state-bytes": _COUNT,
    "worker-pid": Bound(0, 2**31 - 1, integer=True),
    "worker-base-loads": _COUNT,
    "worker-clients-served": _COUNT,
    "train_loss": _LOSS,
    "train_examples": _COUNT,
    "steps": _COUNT,
    "eval_loss": _LOSS,
    "perplexity": Bound(0, math.exp(50.0) * 1.01),  # the client caps the exponent at 50
    "eval_tokens": _COUNT,
}


def validate_metrics(raw: Mapping, required: tuple[str, ...] = (), extra: Mapping[str, Bound] | None = None
                     ) -> dict[str, float]:
    """The reply's metrics as floats, every entry checked against :data:`REPLY_METRICS` and ``extra``
    (a method's own keys); raises :class:`ReplyError` on the first bad, unknown or missing entry."""
    if not isinstance(raw, Mapping):
        raise ReplyError(f"the reply's metrics are a {type(raw).__name__}, not a record")
    if len(raw) > MAX_METRICS:
        raise ReplyError(f"the reply carries {len(raw)} metrics; at most {MAX_METRICS} are accepted")
    known = {**REPLY_METRICS, **(extra or {})}
    out = {}
    for key, value in raw.items():
        if key not in known:
            raise ReplyError(f"unknown metric {str(key)[:64]!r} (a lordba-fl client sends {sorted(known)})")
        out[key] = known[key].check(key, value)
    missing = [k for k in required if k not in out]
    if missing:
        raise ReplyError(f"the reply lacks {missing}")
    return out


def cap_weights(weights: list[float], cap: float) -> list[float]:
    """Each weight at most ``cap`` times the median of ``weights`` (``cap`` 0: unchanged), so one client
    claiming a huge ``num-examples`` weighs at most ``cap`` typical clients."""
    if cap <= 0 or not weights:
        return list(weights)
    limit = cap * statistics.median(weights)
    return [min(w, limit) for w in weights]
