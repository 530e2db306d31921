"""Client-level differential privacy for LoRDBA uplinks (``dp.*`` run-config keys; off by default).

Threat model: the server (and anyone on the wire) is not trusted, so every client privatizes its own
uplink before it leaves the device (local DP). One client-round's release is

- its **scale delta** ``d``, clipped to L2 norm ``C = dp.clip`` and sent with Gaussian noise
  ``N(0, (z C)^2 I)`` added, ``z = dp.noise-multiplier``;
- its **flip mask** ``F`` (at most ``k = floor(flip.budget * n)`` ones, as every honest client keeps)
  after binary randomized response: each bit is flipped with probability ``p = 1 / (1 + e^eps_b)``,
  ``eps_b = dp.flip-epsilon``; ``dp.flip-epsilon = 0`` sends an empty mask instead (no flips, no cost).

Neighbouring datasets are any two datasets of the same client (replace-one), so the delta's L2
sensitivity is ``2C`` (a Gaussian mechanism of noise multiplier ``z / 2``) and two honest masks differ
in at most ``min(n, 2k)`` bits (that many composed ``eps_b``-randomized responses). The round event is
their composition; a client's budget is that event composed over the rounds it took part in. The
accountant is Google's ``dp-accounting`` RDP accountant (``RdpAccountant``, REPLACE_ONE). Its PLD
accountant is not used: in dp-accounting 0.6.0 it ignores the count of a self-composed randomized
response (``tests/test_privacy.py`` pins the RDP one against the basic composition bound).

The server only post-processes: it debiases the vote (``E[F~] = p + (1 - 2p) F``), weights every
client equally (``num_examples`` is data), and reports ``dp_epsilon`` for the client that took part
most often so far, at ``dp_delta``. Client replies then carry no training metrics (they are data too).
"""

from __future__ import annotations

import functools
import math
import secrets
from dataclasses import dataclass

import torch

from lordba_fl.methods.lordba.budgets import flip_allowance
from lordba_fl.options import option

DP_MODES = ("off", "local")


@dataclass(frozen=True)
class DPConfig:
    """``dp.*`` keys. ``target_epsilon > 0`` calibrates ``noise_multiplier`` (it is then ignored) so a
    client sampled in every one of the run's rounds ends at ``target_epsilon``."""

    mode: str = option("off", "dp.mode", "off | local: clients clip + noise scale deltas, randomized response on flips")
    clip: float = option(0.01, "dp.clip", "L2 bound C on a client's scale delta")
    noise_multiplier: float = option(1.0, "dp.noise-multiplier", "Gaussian noise std = this x dp.clip")
    flip_epsilon: float = option(0.0, "dp.flip-epsilon", "randomized response epsilon per flip bit (0: no flips sent)")
    delta: float = option(1e-5, "dp.delta", "delta of the (epsilon, delta) guarantee.")
    target_epsilon: float = option(0.0, "dp.target-epsilon",
        "> 0: calibrate dp.noise-multiplier to reach this over the run's rounds")

    def __post_init__(self):
        if self.mode not in DP_MODES:
            raise ValueError(f"dp.mode must be one of {DP_MODES}; got {self.mode!r}")
        for key, value, ok, accepted in (
            ("dp.clip", self.clip, self.clip > 0 and math.isfinite(self.clip), "> 0 (L2 bound on a scale delta)"),
            ("dp.noise-multiplier", self.noise_multiplier, self.noise_multiplier >= 0, ">= 0"),
            ("dp.flip-epsilon", self.flip_epsilon, self.flip_epsilon >= 0, ">= 0 (0: no flips sent)"),
            ("dp.delta", self.delta, 0 < self.delta < 1, "in (0, 1)"),
            ("dp.target-epsilon", self.target_epsilon, self.target_epsilon >= 0, ">= 0 (0: use dp.noise-multiplier)"),
        ):
            if not ok:
                raise ValueError(f"run config {key!r} must be {accepted}; got {value!r}")

    @property
    def on(self) -> bool:
        return self.mode != "off"

    @property
    def flip_noise(self) -> float:
        """``p``, the probability randomized response flips a bit (0 when flips are not sent)."""
        return rr_flip_probability(self.flip_epsilon) if self.flip_epsilon > 0 else 0.0


def rr_flip_probability(flip_epsilon: float) -> float:
    """``p = 1 / (1 + e^eps_b)``: binary randomized response at ``eps_b`` per bit."""
    return 1.0 / (1.0 + math.exp(flip_epsilon))


def differing_bits(n_bits: int, budget: float) -> int:
    """How many bits two honest flip masks can differ in: ``min(n, 2 floor(budget n))``."""
    return min(n_bits, 2 * flip_allowance(n_bits, budget))  # the integer every honest client keeps


def _round_event(noise_multiplier: float, flip_epsilon: float, bits: int):
    import dp_accounting as dpa

    if noise_multiplier <= 0:
        return dpa.NonPrivateDpEvent()
    events = [dpa.GaussianDpEvent(noise_multiplier / 2.0)]  # sensitivity 2C, noise std z C
    if flip_epsilon > 0 and bits > 0:
        # dp-accounting's noise parameter: the chance the answer is uniform over the 2 buckets = 2p
        rr = dpa.RandomizedResponseDpEvent(2.0 * rr_flip_probability(flip_epsilon), 2)
        events.append(dpa.SelfComposedDpEvent(rr, bits))
    return dpa.ComposedDpEvent(events)


@functools.lru_cache(maxsize=256)
def epsilon(noise_multiplier: float, flip_epsilon: float, bits: int, participations: int, delta: float) -> float:
    """ε at ``delta`` of a client that sent ``participations`` privatized uplinks (``inf`` without noise)."""
    import dp_accounting as dpa
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    if participations <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    acc = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    acc.compose(_round_event(noise_multiplier, flip_epsilon, bits), participations)
    return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=64)
def calibrate(target_epsilon: float, flip_epsilon: float, bits: int, rounds: int, delta: float) -> float:
    """The smallest noise multiplier ``z`` (to 0.1%) for which ``rounds`` participations stay within
    ``target_epsilon``; refuses a target the flip randomized response alone already exceeds."""
    hi = 1.0
    while epsilon(hi, flip_epsilon, bits, rounds, delta) > target_epsilon:
        hi *= 2.0
        if hi > 1e6:
            raise ValueError(
                f"dp.target-epsilon={target_epsilon} cannot be met over {rounds} rounds: randomized response on "
                f"{bits} flip bits at dp.flip-epsilon={flip_epsilon} costs more alone; lower dp.flip-epsilon "
                "(0 sends no flips) or raise dp.target-epsilon")
    lo = 0.0
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if epsilon(mid, flip_epsilon, bits, rounds, delta) > target_epsilon else (lo, mid)
    return hi


def noise_multiplier(dp: DPConfig, n_bits: int, budget: float, rounds: int) -> float:
    """``dp.noise-multiplier``, or the one calibrated to ``dp.target-epsilon``."""
    if dp.target_epsilon > 0:
        return calibrate(dp.target_epsilon, dp.flip_epsilon, differing_bits(n_bits, budget), rounds, dp.delta)
    return dp.noise_multiplier


def privatize(flips: torch.Tensor, delta: torch.Tensor, dp: DPConfig, z: float,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The release of one client-round: (randomized-response flips, clipped + noised scale delta).

    ``generator`` is for tests only: by default the noise is drawn from a generator seeded by the OS
    (``secrets``), never from the run's public seed, which the server knows.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    d = delta.float()
    norm = float(d.norm())
    if norm > dp.clip:
        d = d * (dp.clip / norm)
    d = d + torch.randn(d.shape, generator=generator) * (z * dp.clip)
    if dp.flip_epsilon > 0:
        flips = flips ^ (torch.rand(flips.shape, generator=generator) < dp.flip_noise)
    else:
        flips = torch.zeros_like(flips)
    return flips, d


def max_flip_rate(dp: DPConfig, budget: float, n_bits: int) -> float:
    """The largest flip rate an honest randomized-response mask shows (six standard deviations above
    ``p + (1 - 2p) budget``): the server's budget check under DP."""
    p = dp.flip_noise
    if p == 0:
        return 0.0  # no flips are sent
    return min(1.0, p + (1 - 2 * p) * budget + 6 * math.sqrt(p * (1 - p) / max(n_bits, 1)))
