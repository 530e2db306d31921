"""Sign-flip budgets, shared by LoRDBA's clients and its server: how many flips a fraction allows,
and the halving schedule of a round's budget."""

from __future__ import annotations

import math


def flip_allowance(n_bits: int, rate: float) -> int:
    """Most sign flips a client may send: ``floor(rate * n)``, the count an honest client keeps.

    Client and server both use this integer, so a client that spends its whole budget is never
    refused by a float comparison. ``rate * n`` is rounded to 6 decimals before the floor, so a
    product like ``0.29 * 100 = 28.999999999999996`` counts as 29.
    """
    return int(math.floor(round(rate * n_bits, 6)))


def halving_budget(budget: float, start: float, server_round: int) -> float:
    """``max(budget, start / 2^(round - 1))``: ``start`` in round 1, halving each round down to
    ``budget`` (``start`` 0 or below ``budget``: ``budget`` every round)."""
    return max(budget, start * 0.5 ** max(server_round - 1, 0))
