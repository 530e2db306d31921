"""Byzantine attacks: what a faulty client sends instead of its honest update (``faults.attack``).

An attack is one :class:`Attack`, registered by name in :data:`lordba_fl.registry.ATTACKS` (a
user's by import path, ``faults.attack = "mypkg.attacks:MINE"``). Each method applies the form that
matches what its frames carry: sign flips and scale deltas (LoRDBA), a dense update against the
broadcast (LoRA), fresh factors (FLoRA) or seed coefficients (FedKSeed); a method asks for the form
with :meth:`Attack.form` and gets an error naming the attack when it has none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Attack:
    """The forms of one attack (each optional).

    signs : (flips, scale_delta) -> (flips, scale_delta)
        LoRDBA: a bool flip mask over every sign bit and the scale deltas.
    update : (start, update) -> update
        LoRA-style methods: the dense update ``trained - start`` (numpy float32) given the broadcast.
    factors : (A, B^T) -> (A, B^T)
        Methods that send fresh factors whose product is the update (FLoRA).
    coefficient : float -> float
        Zeroth-order seed methods: each seed's coefficient.
    replays : bool
        Method-independent: resend the first frame this client sent (:mod:`lordba_fl.federation.faults`).
    """

    signs: Callable | None = None
    update: Callable | None = None
    factors: Callable | None = None
    coefficient: Callable | None = None
    replays: bool = False

    def form(self, kind: str, name: str) -> Callable:
        fn = getattr(self, kind)
        if fn is None:
            raise ValueError(f"attack {name!r} has no {kind!r} form, which this method's frames need")
        return fn


def _invert_signs(flips, delta):
    return ~flips, delta  # every sign it did not flip


def _all_signs(flips, delta):
    return torch.ones_like(flips), delta


def _explode_signs(flips, delta):
    return flips, delta * 1e4


INVERT_FLIPS = Attack(signs=_invert_signs, update=lambda start, u: -u, factors=lambda a, bt: (a, -bt),
                      coefficient=lambda c: -c)  # the reversed update
FLIP_ALL = Attack(signs=_all_signs, update=lambda start, u: -(start + u) - start, factors=lambda a, bt: (-a, -bt),
                  coefficient=lambda c: -c)  # every value's sign (LoRA: -trained; FLoRA: the product is unchanged)
EXPLODE_SCALES = Attack(signs=_explode_signs, update=lambda start, u: u * 1e4, factors=lambda a, bt: (a, bt * 1e4),
                        coefficient=lambda c: c * 1e4)
REPLAY = Attack(replays=True)
