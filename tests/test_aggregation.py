import pytest
import torch

from lordba_fl.aggregation import LatentVote, ServerState, collect_updates
from lordba_fl.codec import CodecOptions, Update, encode_update
from lordba_fl.layout import AdapterSpec, AdapterState, LayerSpec

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
