"""Client-level DP: the mechanisms (clipping, Gaussian noise, randomized response), the accounting
against closed forms, the server's debiased vote, and a federated run's reported budget."""

import math

import pytest
import torch

from lordba_fl.methods.lordba import privacy
from lordba_fl.methods.lordba.aggregation import LatentVote, ServerState
from lordba_fl.methods.lordba.privacy import DPConfig
from lordba_fl.methods.lordba.codec import Update
from lordba_fl.methods.lordba.layout import AdapterState


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def _gaussian_delta(eps: float, sigma: float, sensitivity: float) -> float:
    """Exact δ(ε) of the Gaussian mechanism (Balle & Wang 2018, Theorem 8)."""
    a, b = sensitivity / (2 * sigma), eps * sigma / sensitivity
    return _phi(a - b) - math.exp(eps) * _phi(-a - b)


@pytest.mark.parametrize("z", [0.5, 1.0, 4.0])
def test_gaussian_epsilon_is_a_valid_and_tight_bound(z):
    """Noise std z C on a delta whose replace-one sensitivity is 2 C: the accountant's ε must be at
    least the exact ε of that mechanism, and not far above it."""
    delta = 1e-5
    eps = privacy.epsilon(z, 0.0, 0, 1, delta)
    assert _gaussian_delta(eps, z, 2.0) <= delta * 1.0001  # (ε, δ) holds
    lo, hi = 0.0, eps  # the exact ε: δ(ε) is decreasing
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _gaussian_delta(mid, z, 2.0) > delta else (lo, mid)
    assert hi <= eps <= 1.6 * hi


def test_randomized_response_composes_over_the_differing_bits():
    """One eps_b-RR bit costs eps_b; c of them at most c eps_b (basic composition), and more than
    one: the count is honoured (dp-accounting 0.6.0's PLD accountant ignores it)."""
    eps_b, z = 0.5, 1e4  # Gaussian noise so large its share is negligible
    one = privacy.epsilon(z, eps_b, 1, 1, 1e-5)
    assert one == pytest.approx(eps_b, rel=0.01)
    costs = [privacy.epsilon(z, eps_b, c, 1, 1e-5) for c in (1, 4, 16, 64)]
    assert costs == sorted(costs) and costs[-1] > 4 * one
    assert all(e <= c * eps_b * 1.01 for e, c in zip(costs, (1, 4, 16, 64)))
    # rounds compose too: a client sampled 3 times spends more than once, less than 3x
    once, thrice = privacy.epsilon(1.0, eps_b, 8, 1, 1e-5), privacy.epsilon(1.0, eps_b, 8, 3, 1e-5)
    assert once < thrice < 3 * once
    assert privacy.epsilon(0.0, 0.0, 0, 1, 1e-5) == math.inf and privacy.epsilon(1.0, 0.0, 0, 0, 1e-5) == 0.0


def test_differing_bits_of_two_honest_masks():
    assert privacy.differing_bits(1000, 0.01) == 20
    assert privacy.differing_bits(1000, 0.7) == 1000


def test_calibration_meets_the_target_and_no_less_noise_would():
    z = privacy.calibrate(4.0, 0.0, 0, 5, 1e-5)
    assert privacy.epsilon(z, 0.0, 0, 5, 1e-5) <= 4.0 < privacy.epsilon(0.99 * z, 0.0, 0, 5, 1e-5)
    z2 = privacy.calibrate(4.0, 0.05, 10, 5, 1e-5)  # RR takes part of the budget: more noise is needed
    assert z2 > z
    with pytest.raises(ValueError, match="dp.flip-epsilon"):
        privacy.calibrate(5.0, 1.0, 100, 3, 1e-5)  # 100 bits at eps_b = 1 cost more than 5 alone


def test_privatize_clips_then_adds_noise_of_the_stated_size():
    dp = DPConfig(mode="local", clip=0.5, flip_epsilon=0.0)
    big = torch.full((100,), 1.0)  # norm 10 -> clipped to 0.5
    flips = torch.zeros(100, dtype=torch.bool)
    flips[:3] = True
    f, d = privacy.privatize(flips, big, dp, 0.0, torch.Generator().manual_seed(0))
    assert float(d.norm()) == pytest.approx(0.5, rel=1e-6) and torch.allclose(d, big * 0.05)
    assert not f.any()  # flip-epsilon 0: no flips are sent
    small = torch.full((100,), 0.01)  # norm 0.1 <= 0.5: untouched
    assert torch.equal(privacy.privatize(flips, small, dp, 0.0, torch.Generator().manual_seed(0))[1], small)
    _, noisy = privacy.privatize(flips, torch.zeros(200_000), dp, 2.0, torch.Generator().manual_seed(1))
    assert float(noisy.std()) == pytest.approx(2.0 * 0.5, rel=0.01) and abs(float(noisy.mean())) < 0.01


def test_randomized_response_flips_each_bit_with_probability_p():
    dp = DPConfig(mode="local", flip_epsilon=1.0)
    p = 1 / (1 + math.e)
    assert dp.flip_noise == pytest.approx(p)
    n = 400_000
    flips = torch.zeros(n, dtype=torch.bool)
    flips[: n // 2] = True
    out, _ = privacy.privatize(flips, torch.zeros(4), dp, 1.0, torch.Generator().manual_seed(2))
    changed = (out ^ flips).float()
    sd = math.sqrt(p * (1 - p) / (n / 2))
    assert abs(float(changed[: n // 2].mean()) - p) < 5 * sd and abs(float(changed[n // 2 :].mean()) - p) < 5 * sd


def test_noise_is_not_drawn_from_the_public_seed():
    dp = DPConfig(mode="local", flip_epsilon=1.0)
    a = privacy.privatize(torch.zeros(64, dtype=torch.bool), torch.zeros(64), dp, 1.0)
    b = privacy.privatize(torch.zeros(64, dtype=torch.bool), torch.zeros(64), dp, 1.0)
    assert not torch.equal(a[1], b[1]) and not torch.equal(a[0], b[0])


def test_the_budget_check_passes_honest_rr_masks_and_rejects_flip_all():
    dp = DPConfig(mode="local", flip_epsilon=2.0)
    n, budget = 100_000, 0.05
    bound = privacy.max_flip_rate(dp, budget, n)
    honest = torch.zeros(n, dtype=torch.bool)
    honest[: int(budget * n)] = True
    for seed in range(5):
        out, _ = privacy.privatize(honest, torch.zeros(1), dp, 1.0, torch.Generator().manual_seed(seed))
        assert float(out.float().mean()) <= bound
        attacked, _ = privacy.privatize(torch.ones(n, dtype=torch.bool), torch.zeros(1), dp, 1.0,
                                        torch.Generator().manual_seed(seed))
        assert float(attacked.float().mean()) > bound
    assert privacy.max_flip_rate(DPConfig(mode="local"), budget, n) == 0.0


def test_the_vote_debiases_randomized_response():
    """4,000 clients all want to flip the first half of 64 signs; each sends an RR copy (p = 0.3).
    Debiased, the vote is about +-1 and clears hysteresis 0.5; taken at face value it is +-0.4."""
    n, k, p = 64, 4000, 0.3
    state = AdapterState(0, torch.zeros(n, dtype=torch.bool), torch.zeros(3))
    want = torch.zeros(n, dtype=torch.bool)
    want[: n // 2] = True
    g = torch.Generator().manual_seed(3)
    updates = [(Update(1, 0, want ^ (torch.rand(n, generator=g) < p), torch.zeros(3)), 1.0) for _ in range(k)]
    server = ServerState.initial(state)
    debiased = LatentVote(tau=0.5, flip_noise=p)(server, updates)
    assert torch.equal(debiased.state.negative, want)
    # each debiased vote is +-1 up to sd 2 sqrt(p (1 - p) / k) / (1 - 2p) = 0.036: five of them
    assert float((debiased.latent.abs() - 1).abs().max()) < 5 * 2 * math.sqrt(p * (1 - p) / k) / (1 - 2 * p)
    naive = LatentVote(tau=0.5)(server, updates)
    assert not naive.state.negative.any()  # |vote| = 0.4 < tau: nothing flips
    with pytest.raises(ValueError, match="flip_noise"):
        LatentVote(flip_noise=0.5)


@pytest.mark.parametrize(
    "over, message",
    [({"dp.mode": "global"}, "dp.mode"), ({"dp.mode": "local"}, "server.aggregator=vote"),
     ({"dp.mode": "local", "server.aggregator": "vote", "method": "lora-fedavg"}, "'dp.mode' is a key of method lordba"),
     ({"dp.clip": 0.0}, "dp.clip"), ({"dp.delta": 0.0}, "dp.delta"), ({"dp.flip-epsilon": -1.0}, "dp.flip-epsilon"),
     ({"dp.noise-multiplier": -0.1}, "dp.noise-multiplier"), ({"dp.target-epsilon": -2.0}, "dp.target-epsilon")],
)
def test_bad_dp_config_is_refused_with_the_key(over, message):
    from lordba_fl.runconfig import parse_run_config

    with pytest.raises(ValueError, match=message):
        parse_run_config(over)
