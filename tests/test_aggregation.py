import pytest
import torch

from lordba_fl.methods.lordba.aggregation import LatentVote, ServerState, collect_updates
from lordba_fl.methods.lordba.codec import CodecOptions, Update, encode_update
from lordba_fl.methods.lordba.layout import AdapterSpec, AdapterState, LayerSpec

T, F = True, False


def _server(latent=None):
    state = AdapterState(5, torch.tensor([F, T, F]), torch.tensor([1.0, 2.0]))  # S = [+1, -1, +1]
    server = ServerState.initial(state)
    if latent is not None:
        server.latent = torch.tensor(latent)
    return server


def _updates():
    u1 = Update(1, 5, torch.tensor([T, F, F]), torch.tensor([0.4, 0.0]))
    u2 = Update(1, 5, torch.tensor([T, T, F]), torch.tensor([0.0, 0.8]))
    return [(u1, 1.0), (u2, 3.0)]


# flip mass [4, 3, 0] of 4 -> V = S * (1 - 2 * [1, 0.75, 0]) = [-1, 0.5, 1]
@pytest.mark.parametrize(
    "beta, tau, latent0, want_negative, want_latent",
    [
        (0.0, 0.0, None, [T, F, F], [-1.0, 0.5, 1.0]),  # majority vote: both contested signs flip
        (0.0, 0.6, None, [T, T, F], [-1.0, 0.5, 1.0]),  # |0.5| <= tau: position 1 keeps -1
        (0.5, 0.0, None, [F, T, F], [0.0, -0.25, 1.0]),  # momentum from Λ = S: Λ' = [0, -0.25, 1], 0 is a tie
        (0.5, 0.0, [-0.2, 0.1, 1.0], [T, F, F], [-0.6, 0.3, 1.0]),  # earlier pressure tips both
    ],
)
def test_latent_vote_by_hand(beta, tau, latent0, want_negative, want_latent):
    server = _server(latent0)
    before = server.clone()
    new = LatentVote(beta=beta, tau=tau)(server, _updates())
    assert new.state.version == 6
    assert new.state.negative.tolist() == want_negative
    assert torch.allclose(new.latent, torch.tensor(want_latent))
    assert server.equals(before)  # pure


@pytest.mark.parametrize("eta, want", [(1.0, [1.1, 2.6]), (0.5, [1.05, 2.3])])
def test_scale_step_by_hand(eta, want):
    # weighted mean delta = [0.4 * 1/4, 0.8 * 3/4] = [0.1, 0.6]
    assert torch.allclose(LatentVote(eta=eta)(_server(), _updates()).state.scales, torch.tensor(want))


def test_bad_aggregator_settings_and_inputs():
    for kwargs, match in [({"beta": 1.0}, "beta"), ({"tau": -0.1}, "tau"), ({"eta": 0.0}, "eta")]:
        with pytest.raises(ValueError, match=match):
            LatentVote(**kwargs)
    with pytest.raises(ValueError, match="no updates"):
        LatentVote()(_server(), [])
    stale = [(Update(1, 4, torch.tensor([F, F, F]), torch.zeros(2)), 1.0)]
    with pytest.raises(ValueError, match="version 4"):
        LatentVote()(_server(), stale)


def test_corrupted_update_is_rejected_without_touching_server_state():
    spec = AdapterSpec((LayerSpec("l.q", 24, 16, 4), LayerSpec("l.v", 24, 8, 4)), ("mid", "out"), b"s" * 16)
    g = torch.Generator().manual_seed(0)
    state = AdapterState(2, torch.rand(spec.n_bits, generator=g) < 0.5, torch.rand(spec.n_scales, generator=g))
    server = ServerState.initial(state)
    snapshot = server.clone()
    opts = CodecOptions(scale_encoding="fp16")
    updates = [
        Update(2, 2, torch.rand(spec.n_bits, generator=g) < 0.2, torch.randn(spec.n_scales, generator=g) * 0.01)
        for _ in range(3)
    ]
    frames = [encode_update(u, spec, opts) for u in updates]
    corrupt = bytearray(frames[1])
    corrupt[-5] ^= 0xFF
    replies = [(frames[0], 10), (bytes(corrupt), 10), (frames[2], 30), (frames[0], float("nan"))]
    accepted, rejected = collect_updates(replies, spec, opts, version=2)
    assert [i for i, _ in rejected] == [1, 3] and "ChecksumError" in rejected[0][1]
    assert server.equals(snapshot)
    new = LatentVote()(server, accepted)
    assert server.equals(snapshot)
    # the result is exactly the aggregation of the two good replies
    decoded = [(Update(u.round, u.version, u.flips, u.scale_delta.half().float()), w) for u, w in ((updates[0], 10.0), (updates[2], 30.0))]
    assert new.equals(LatentVote()(server, decoded))


def test_robust_combine_by_hand():
    from lordba_fl.methods.lordba.aggregation import combine

    stack = torch.tensor([[1.0], [2.0], [3.0], [100.0]])  # (K=4, 1)
    w = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    assert combine(stack, w, "mean").item() == pytest.approx(26.5)
    assert combine(stack, w, "trimmed-mean", trim=0.25).item() == pytest.approx(2.5)  # drops 1 and 100
    assert combine(stack, w, "median").item() == pytest.approx(2.5)  # even K: mean of the middle two
    assert combine(stack[:3], w[:3], "median").item() == 2.0
    assert combine(stack[:2], torch.tensor([3.0, 1.0], dtype=torch.float64), "mean").item() == pytest.approx(1.25)


def test_robust_options_reject_cap_and_bound():
    from lordba_fl.methods.lordba.aggregation import RobustOptions
    from lordba_fl.methods.lordba.codec import Update

    def upd(n_flips, delta):
        flips = torch.zeros(100, dtype=torch.bool)
        flips[:n_flips] = True
        return Update(1, 0, flips, torch.tensor(delta))

    ups = [(upd(1, [1.0, 0.0]), 1.0), (upd(2, [0.0, 1.0]), 1.0), (upd(100, [0.0, 0.0]), 1.0), (upd(0, [30.0, 40.0]), 10.0)]
    kept, rejected = RobustOptions(max_flip_rate=0.05, weight_cap=2.0, norm_bound=2.0).apply(ups)
    assert rejected == [(2, "flips 100 of 100 signs, more than the budget's floor(0.05 * 100) = 5")]
    assert [w for _, w in kept] == [1.0, 1.0, 2.0]  # 10 capped at 2 x median(1, 1, 10)
    # norms 1, 1, 50: the median is 1, so the last delta is scaled to norm 2
    torch.testing.assert_close(kept[2][0].scale_delta, torch.tensor([1.2, 1.6]))
    assert kept[0][0] is ups[0][0]  # within bounds: untouched
    with pytest.raises(ValueError, match="weight-cap and server.norm-bound must be >= 0"):
        RobustOptions(norm_bound=-1.0)


@pytest.mark.parametrize("n, budget", [(4_884_480, 0.05), (4_884_480, 0.01), (100, 0.29), (1_000, 0.007), (7, 0.5)])
def test_an_honest_client_spending_its_whole_budget_is_accepted_and_one_more_flip_is_refused(n, budget):
    """The client keeps floor(budget * n) flips (exact integers, e.g. 0.29 * 100 = 28.999... in floats
    counts as 29); the server accepts exactly that many and refuses one more."""
    from lordba_fl.methods.lordba.aggregation import RobustOptions
    from lordba_fl.methods.lordba.budgets import flip_allowance
    from lordba_fl.methods.lordba import budget_flips

    want = {(4_884_480, 0.05): 244_224, (4_884_480, 0.01): 48_844, (100, 0.29): 29, (1_000, 0.007): 7, (7, 0.5): 3}
    assert flip_allowance(n, budget) == want[(n, budget)]
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(n, generator=gen)  # every sign wants to flip against the broadcast below
    flips = budget_flips(latent, latent >= 0, budget)
    assert int(flips.sum()) == want[(n, budget)]
    robust = RobustOptions(max_flip_rate=budget)
    kept, rejected = robust.apply([(Update(1, 0, flips, torch.zeros(2)), 1.0)])
    assert len(kept) == 1 and rejected == []
    over = flips.clone()
    over[int(torch.nonzero(~over)[0])] = True
    kept, rejected = robust.apply([(Update(1, 0, over, torch.zeros(2)), 1.0)])
    assert kept == [] and "more than the budget" in rejected[0][1]
