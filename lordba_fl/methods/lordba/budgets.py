"""Sign-flip budgets, shared by LoRDBA's clients and its server: how many flips a fraction allows,
the halving schedule of a round's budget, and the clients' flip settings (``flip.*``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lordba_fl.options import option


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


FLIP_SELECTS = ("latent", "gradient")


@dataclass(frozen=True)
class FlipControl:
    """How a LoRDBA client's sign flips are made rare and earned (DESIGN.md §3).

    Parameters
    ----------
    m0 : float
        Latent magnitude the broadcast signs are loaded with: a sign flips only after its latent
        travels ``m0``.
    latent_lr : float
        Learning rate of the sign latents (0 freezes the signs: scales-only training).
    flip_budget : float
        Largest fraction of sign bits a client may flip per round; the top ones by latent
        pressure ``|L|`` are kept, the rest revert (1.0 = no budget).
    budget_start : float
        The budget of round 1 when larger than ``flip_budget`` (0: no schedule); it halves every
        round until it reaches ``flip_budget`` (:func:`halving_budget`), so early rounds, where the
        signs have most to learn, may flip more.
    every_step : bool
        Project the latents onto the budget after every local step (flips beyond the budget's top
        ``|L|`` go back to the broadcast sign at the smallest magnitude), so the client trains its
        scales on the signs it will send rather than on flips the budget reverts at the end.
    select : str
        How a client picks its flips. ``latent``: the latents train with the scales (AdamW) and the
        signs whose latents crossed are kept, largest ``|L|`` first. ``gradient``: the latents stay
        out of the optimizer at ``+-m0`` and their straight-through gradients add up over the round's
        steps; a sign flips where the summed gradient pushes its latent across, the largest
        ``|sum g|`` first (the budget's largest first-order loss decreases). AdamW moves every
        latent whose gradient kept its sign by the same ``steps * lr``, so after a few local steps
        ``|L|`` ranks consistent signs, not strong ones; the summed gradient keeps their size.
    """

    m0: float = option(0.002, "flip.m0", "latent magnitude of broadcast signs (below E * lr: clients can flip)")
    latent_lr: float = option(1e-3, "flip.latent-lr", "0 freezes the signs")
    flip_budget: float = option(0.0, "flip.budget",
        "the client budget's floor: the most signs a client flips per round once flip.budget-start has halved down to it (0: down to none)")
    budget_start: float = option(0.08, "flip.budget-start",
        "round 1's client budget, halving each round down to flip.budget (0: no schedule; off under dp.mode=local)")
    every_step: bool = option(True, "flip.every-step",
        "apply the flip budget after every local step, not only before sending: the scales train on the signs that are sent")
    select: str = option("latent", "flip.select",
        "latent (AdamW-trained latents, largest |L|) | gradient (summed straight-through gradients, largest first-order gain)")

    def __post_init__(self):
        if not self.m0 > 0:
            raise ValueError(f"flip.m0 must be positive; got {self.m0}")
        if self.latent_lr < 0:
            raise ValueError(f"flip.latent-lr must be >= 0 (0 freezes the signs); got {self.latent_lr}")
        if not 0.0 <= self.flip_budget <= 1.0:
            raise ValueError(f"flip.budget must be a fraction in [0, 1]; got {self.flip_budget}")
        if not 0.0 <= self.budget_start <= 1.0:
            raise ValueError(f"flip.budget-start must be a fraction in [0, 1] (0: no schedule); got {self.budget_start}")
        if self.select not in FLIP_SELECTS:
            raise ValueError(f"flip.select must be one of {FLIP_SELECTS}; got {self.select!r}")

    def budget_at(self, server_round: int) -> float:
        """The client flip budget of ``server_round`` (:func:`halving_budget`)."""
        return halving_budget(self.flip_budget, self.budget_start, server_round)
