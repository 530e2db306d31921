"""The faithful re-binarization (server.refit='faithful'): warm-started, never worse, idempotent."""

import pytest
import torch

from lordba_fl.adapter.fit import align_components, refine_lordba
from lordba_fl.methods.lordba.aggregation import Refit, ServerState, layer_product
from lordba_fl.methods.lordba.codec import Update
from lordba_fl.methods.lordba.layout import AdapterSpec, AdapterState, LayerSpec, split_carriers, split_scales

SPEC = AdapterSpec((LayerSpec("a", 40, 48, 8), LayerSpec("b", 24, 16, 8)), ("in", "mid", "out"), b"r" * 16)


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return AdapterState(3, torch.rand(SPEC.n_bits, generator=g) < 0.5, torch.rand(SPEC.n_scales, generator=g) + 0.5)


def _update(state, flip_p, delta_sd, seed):
    g = torch.Generator().manual_seed(seed)
    return Update(1, state.version, torch.rand(SPEC.n_bits, generator=g) < flip_p,
                  torch.randn(SPEC.n_scales, generator=g) * delta_sd)


def _products(neg, scales):
    carriers, sc = split_carriers(SPEC, 1.0 - 2.0 * neg.float()), split_scales(SPEC, scales)
    return {l.name: layer_product(*carriers[l.name], sc[l.name], l) for l in SPEC.layers}


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_a_round_in_which_no_client_changes_anything_changes_nothing():
    state = _state()
    server = ServerState.initial(state)
    nothing = Update(1, state.version, torch.zeros(SPEC.n_bits, dtype=torch.bool), torch.zeros(SPEC.n_scales))
    new = Refit(SPEC)(server, [(nothing, 2.0), (nothing, 5.0)])
    assert new.state.version == state.version + 1
    assert torch.equal(new.state.negative, state.negative)  # 0 flips
    assert torch.equal(new.state.scales, state.scales)  # bit for bit
    assert max(new.info["fit_error"].values()) < 1e-9  # an exactly representable target


def test_the_first_design_was_not_idempotent():
    """mode='svd' takes signs of a fresh SVD: the same no-change round churns signs (what faithful fixes)."""
    state = _state()
    nothing = Update(1, state.version, torch.zeros(SPEC.n_bits, dtype=torch.bool), torch.zeros(SPEC.n_scales))
    new = Refit(SPEC, mode="svd")(ServerState.initial(state), [(nothing, 1.0)])
    churn = float((new.state.negative ^ state.negative).float().mean())
    assert churn > 0.1 and max(new.info["fit_error"].values()) > 0.05


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_refit_is_never_worse_than_averaged_scales_on_the_current_signs(seed):
    """The warm start is the vote's answer (current signs, FedAvg scales); every step lowers the error."""
    state = _state(seed)
    ups = [(_update(state, 0.02, 0.1, seed * 10 + k), float(k + 1)) for k in range(3)]
    new = Refit(SPEC)(ServerState.initial(state), ups)
    total = sum(w for _, w in ups)
    targets = {n: sum(w / total * _products(state.negative ^ u.flips, state.scales + u.scale_delta)[n] for u, w in ups)
               for n in ("a", "b")}
    averaged = state.scales + sum(w / total * u.scale_delta for u, w in ups)
    start, got = _products(state.negative, averaged), _products(new.state.negative, new.state.scales)
    for name, target in targets.items():
        assert _rel(got[name], target) <= _rel(start[name], target) + 1e-7
        assert new.info["fit_error"][name] == pytest.approx(_rel(got[name], target), abs=1e-6)  # reported = measured


def test_one_client_exactly_representable_update_is_reproduced_better_than_by_svd():
    state = _state(4)
    u = _update(state, 0.01, 0.05, 7)
    target = _products(state.negative ^ u.flips, state.scales + u.scale_delta)
    faithful = Refit(SPEC)(ServerState.initial(state), [(u, 1.0)])
    svd = Refit(SPEC, mode="svd", sweeps=20)(ServerState.initial(state), [(u, 1.0)])
    for name in ("a", "b"):
        assert faithful.info["fit_error"][name] < 0.05 and faithful.info["fit_error"][name] < svd.info["fit_error"][name]
    flips = float((faithful.state.negative ^ state.negative).float().mean())
    assert flips < 0.05  # not churn: about the client's 1%


def test_refine_flips_a_sign_only_where_the_error_falls():
    g = torch.Generator().manual_seed(0)
    s1 = torch.where(torch.rand(4, 20, generator=g) < 0.5, -1.0, 1.0)
    s2 = torch.where(torch.rand(30, 4, generator=g) < 0.5, -1.0, 1.0)
    sc = {"in": torch.rand(20, generator=g) + 0.5, "mid": torch.rand(4, generator=g) + 0.5, "out": torch.rand(30, generator=g) + 0.5}
    # the target is the product with 3 signs of S1 and 2 of S2 wrong
    t1, t2 = s1.clone(), s2.clone()
    t1[0, 3] *= -1; t1[2, 7] *= -1; t1[3, 19] *= -1; t2[5, 1] *= -1; t2[29, 0] *= -1  # noqa: E702
    target = sc["out"][:, None] * ((t2 * sc["mid"][None, :]) @ t1) * sc["in"][None, :]
    before = s1.clone()
    f1, f2, fitted, err = refine_lordba(target, s1, s2, sc, ("in", "mid", "out"))
    assert err < 1e-6  # the fp32 target's own rounding (~6e-8 per entry) bounds it
    assert torch.equal(f1, t1) and torch.equal(f2, t2)  # exactly the 5 wrong signs flipped
    assert torch.equal(s1, before)  # inputs are not modified


def test_align_components_undoes_a_permutation_and_sign_flips():
    g = torch.Generator().manual_seed(1)
    s1 = torch.where(torch.rand(6, 64, generator=g) < 0.5, -1.0, 1.0)
    s2 = torch.where(torch.rand(50, 6, generator=g) < 0.5, -1.0, 1.0)
    perm, sign = torch.tensor([3, 0, 5, 1, 4, 2]), torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, -1.0])
    n1, n2 = s1[perm] * sign[:, None], s2[:, perm] * sign[None, :]  # the same product, reordered
    a1, a2, p = align_components(n1, n2, s1)
    assert torch.equal(a1, s1) and torch.equal(a2, s2)
    assert torch.equal(n1[p].abs(), s1.abs())


def test_error_feedback_carries_the_residual_into_the_next_target():
    state = _state(5)
    ups = [(_update(state, 0.02, 0.2, k), 1.0) for k in range(2)]
    ef = Refit(SPEC, error_feedback=True)
    first = ef(ServerState.initial(state), ups)
    total_target = {n: sum(0.5 * _products(state.negative ^ u.flips, state.scales + u.scale_delta)[n] for u, _ in ups)
                    for n in ("a", "b")}
    fit = _products(first.state.negative, first.state.scales)
    for n in ("a", "b"):
        torch.testing.assert_close(first.residual[n].double(), total_target[n] - fit[n], atol=1e-6, rtol=0)
    # a quiet round fits product + residual = the first round's target
    nothing = Update(1, first.state.version, torch.zeros(SPEC.n_bits, dtype=torch.bool), torch.zeros(SPEC.n_scales))
    second = ef(first, [(nothing, 1.0)])
    got = _products(second.state.negative, second.state.scales)
    for n in ("a", "b"):
        assert _rel(got[n], total_target[n]) <= _rel(fit[n], total_target[n]) + 1e-7


def test_a_flip_quorum_keeps_only_flips_enough_clients_share():
    """server.flip-quorum=2: a flip only one client made is dropped from its product (its scale delta
    stands); flips two clients share are kept. Equal to the quorum-1 refit of the filtered updates."""
    state = _state(7)
    g = torch.Generator().manual_seed(7)
    shared = torch.rand(SPEC.n_bits, generator=g) < 0.03
    ups = []
    for k in range(3):
        own = torch.rand(SPEC.n_bits, generator=g) < 0.02
        flips = (shared | own) if k < 2 else own  # clients 0 and 1 share `shared`; client 2 only has its own
        ups.append((Update(1, state.version, flips, torch.randn(SPEC.n_scales, generator=g) * 0.1), float(k + 1)))
    count = sum(u.flips.int() for u, _ in ups)
    filtered = [(Update(1, u.round, u.flips & (count >= 2), u.scale_delta), w) for u, w in ups]
    assert any(bool((u.flips & (count < 2)).any()) for u, _ in ups)  # something to drop
    got = Refit(SPEC, quorum=2)(ServerState.initial(state), ups)
    ref = Refit(SPEC)(ServerState.initial(state), filtered)
    assert torch.equal(got.state.negative, ref.state.negative) and torch.equal(got.state.scales, ref.state.scales)
    sent = sum(int(u.flips.sum()) for u, _ in ups)
    assert got.info["quorum_kept"] == pytest.approx(sum(int(u.flips.sum()) for u, _ in filtered) / sent)
    assert not torch.equal(Refit(SPEC)(ServerState.initial(state), ups).state.scales, got.state.scales)
    with pytest.raises(ValueError, match="flip-quorum"):
        Refit(SPEC, quorum=0)


@pytest.mark.parametrize("eta", [0.5, 2.0])
def test_a_server_learning_rate_fits_the_current_product_plus_eta_times_the_averaged_change(eta):
    """server.eta: target = P(S, s) + eta (sum w_k P_k / sum w_k - P(S, s)), computed here by hand; the
    warm start moves the scales by eta x the averaged delta and the fit is never worse than it."""
    state = _state(9)
    ups = [(_update(state, 0.02, 0.1, 90 + k), float(k + 1)) for k in range(3)]
    total = sum(w for _, w in ups)
    new = Refit(SPEC, eta=eta)(ServerState.initial(state), ups)
    current = _products(state.negative, state.scales)
    averaged = {n: sum(w / total * _products(state.negative ^ u.flips, state.scales + u.scale_delta)[n] for u, w in ups)
                for n in ("a", "b")}
    warm = _products(state.negative, state.scales + eta * sum(w / total * u.scale_delta for u, w in ups))
    got = _products(new.state.negative, new.state.scales)
    for n in ("a", "b"):
        target = current[n] + eta * (averaged[n] - current[n])
        assert new.info["fit_error"][n] == pytest.approx(_rel(got[n], target), abs=1e-6)  # fitted to this target
        assert _rel(got[n], target) <= _rel(warm[n], target) + 1e-7
    plain = Refit(SPEC)(ServerState.initial(state), ups)
    assert not torch.equal(plain.state.scales, new.state.scales)
    # a round in which no client changes anything still changes nothing
    nothing = Update(1, state.version, torch.zeros(SPEC.n_bits, dtype=torch.bool), torch.zeros(SPEC.n_scales))
    quiet = Refit(SPEC, eta=eta)(ServerState.initial(state), [(nothing, 1.0), (nothing, 3.0)])
    assert torch.equal(quiet.state.negative, state.negative) and torch.equal(quiet.state.scales, state.scales)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="server.eta"):
            Refit(SPEC, eta=bad)


def test_server_momentum_keeps_the_change_and_moves_a_quiet_round_by_it():
    """server.momentum β: M1 = avg1 - P0, target1 = P0 + η M1; in a round where no client changes the
    broadcast, M2 = β M1 and target2 = P1 + η β M1 (FedAvgM), both computed here by hand."""
    beta, eta = 0.5, 1.5
    state = _state(11)
    ups = [(_update(state, 0.02, 0.1, 110 + k), 1.0) for k in range(2)]
    refit = Refit(SPEC, eta=eta, momentum=beta)
    first = refit(ServerState.initial(state), ups)
    p0 = _products(state.negative, state.scales)
    avg = {n: sum(0.5 * _products(state.negative ^ u.flips, state.scales + u.scale_delta)[n] for u, _ in ups)
           for n in ("a", "b")}
    p1 = _products(first.state.negative, first.state.scales)
    for n in ("a", "b"):
        m1 = avg[n] - p0[n]
        torch.testing.assert_close(first.momentum[n].double(), m1, atol=1e-6, rtol=0)
        assert first.info["fit_error"][n] == pytest.approx(_rel(p1[n], p0[n] + eta * m1), abs=1e-6)
    nothing = Update(1, first.state.version, torch.zeros(SPEC.n_bits, dtype=torch.bool), torch.zeros(SPEC.n_scales))
    second = refit(first, [(nothing, 1.0)])
    p2 = _products(second.state.negative, second.state.scales)
    for n in ("a", "b"):
        m2 = beta * first.momentum[n].double()
        torch.testing.assert_close(second.momentum[n].double(), m2, atol=1e-6, rtol=0)
        assert second.info["fit_error"][n] == pytest.approx(_rel(p2[n], p1[n] + eta * m2), abs=1e-6)
        assert _rel(p2[n], p1[n]) > 1e-3  # the quiet round moved
    assert first.clone().equals(first) and not first.equals(second)
    assert Refit(SPEC)(ServerState.initial(state), ups).momentum is None  # off: no server memory
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="server.momentum"):
            Refit(SPEC, momentum=bad)


def test_bad_refit_settings_are_refused():
    with pytest.raises(ValueError, match="faithful"):
        Refit(SPEC, mode="bogus")
    with pytest.raises(ValueError, match="error-feedback"):
        Refit(SPEC, mode="svd", error_feedback=True)


def _float_layer(seed=0):
    from torch import nn

    from lordba_fl import LoRDBAConfig, LoRDBALinear

    torch.manual_seed(seed)
    base = nn.Linear(40, 24).requires_grad_(False)
    layer = LoRDBALinear(base, LoRDBAConfig(rank=4, alpha=8.0, seed=seed))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lordba_latent_A.copy_(torch.where(torch.rand(4, 40, generator=g) < 0.5, -1.0, 1.0))
        layer.lordba_latent_B.copy_(torch.where(torch.rand(24, 4, generator=g) < 0.5, -1.0, 1.0))
        for k in ("in", "mid", "out"):
            layer.scale(k).copy_(torch.rand(layer.scale(k).shape, generator=g) + 0.5)
    return layer


def test_float_factors_forward_equals_the_signed_adapter_at_unit_latents_and_fit_back_is_idempotent():
    from lordba_fl.adapter.fit import fit_float_factors_

    layer = _float_layer()
    x = torch.randn(3, 40)
    signed = layer(x)
    layer.float_factors = True
    torch.testing.assert_close(layer(x), signed)  # latents are exactly +-1: the same product
    layer.float_factors = False
    s1, s2 = layer.lordba_latent_A.detach().clone(), layer.lordba_latent_B.detach().clone()
    scales = {k: layer.scale(k).detach().clone() for k in ("in", "mid", "out")}
    changed, err = fit_float_factors_(layer, s1, s2, None, None, 0.01)
    assert changed == 0 and err < 1e-12
    assert torch.equal(layer.lordba_latent_A, s1 * 0.01)
    for k, v in scales.items():
        assert torch.equal(layer.scale(k).detach(), v)


@pytest.mark.parametrize("budget", [0, 3, None])
def test_float_fit_changes_at_most_its_budget_of_signs_and_never_raises_the_error(budget):
    from lordba_fl.adapter.fit import _product, fit_float_factors_

    layer = _float_layer(1)
    s1, s2 = layer.lordba_latent_A.detach().clone(), layer.lordba_latent_B.detach().clone()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # what float training does: latents drift, some past zero
        layer.lordba_latent_A.add_(torch.randn(4, 40, generator=g) * 0.8)
        layer.lordba_latent_B.add_(torch.randn(24, 4, generator=g) * 0.8)
    sc = {k: layer.scale(k).detach().double() for k in ("in", "mid", "out")}
    target = _product(layer.lordba_latent_B.detach().double(), sc["mid"], layer.lordba_latent_A.detach().double(),
                      sc["out"], sc["in"])
    start_err = float((target - _product(s2.double(), sc["mid"], s1.double(), sc["out"], sc["in"])).norm() / target.norm())
    changed, err = fit_float_factors_(layer, s1, s2, None, budget, 0.01)
    assert err <= start_err
    flipped = int(((layer.lordba_latent_A < 0) != (s1 < 0)).sum() + ((layer.lordba_latent_B < 0) != (s2 < 0)).sum())
    assert flipped == changed
    if budget is not None:
        assert changed <= budget
    else:
        assert changed > 3  # unbudgeted, the drift asks for more than 3 flips


def test_server_flip_budget_caps_each_layers_sign_changes_and_never_raises_the_error():
    from lordba_fl.methods.lordba.budgets import flip_allowance

    state = _state(6)
    ups = [(_update(state, 0.2, 0.3, 40 + k), 1.0) for k in range(2)]  # clients that flip a lot
    free = Refit(SPEC)(ServerState.initial(state), ups)
    capped = Refit(SPEC)(ServerState.initial(state), ups, 0.01)  # the round's budget, through the interface
    for layer, (a, b), (fa, fb) in zip(SPEC.layers, split_carriers(SPEC, capped.state.negative ^ state.negative).values(),
                                       split_carriers(SPEC, free.state.negative ^ state.negative).values()):
        assert int(a.sum() + b.sum()) <= flip_allowance(layer.n_bits, 0.01) < int(fa.sum() + fb.sum())
        assert capped.info["fit_error"][layer.name] >= free.info["fit_error"][layer.name] - 1e-9
    with pytest.raises(ValueError, match="flip-budget"):
        Refit(SPEC)(ServerState.initial(state), ups, 1.5)
