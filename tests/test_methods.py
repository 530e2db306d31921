import numpy as np
import pytest
import torch

from lordba_fl.adapter.fit import _product
from lordba_fl.methods.lordba.aggregation import Refit, ServerState
from lordba_fl.methods.lora import FP16, QUANT, decode_lora, dequantize_channels, encode_lora, quantize_channels
from lordba_fl.methods.lordba import budget_flips
from lordba_fl.methods.lordba.budgets import flip_allowance
from lordba_fl.methods.lordba.codec import CodecError, Update
from lordba_fl.methods.lordba.layout import AdapterSpec, AdapterState, LayerSpec, split_carriers, split_scales


def test_budget_keeps_the_largest_pressure():
    latent = torch.tensor([-0.5, -0.1, 0.2, -0.3, 0.4, -0.05])
    broadcast_neg = torch.tensor([False, False, False, False, True, True])  # S = [+, +, +, +, -, -]
    # wanted flips: 0 (|.5|), 1 (|.1|), 3 (|.3|), 4 (|.4|); position 5 agrees with S
    assert budget_flips(latent, broadcast_neg, 1.0).tolist() == [True, True, False, True, True, False]
    assert budget_flips(latent, broadcast_neg, 2 / 6).tolist() == [True, False, False, False, True, False]
    assert not budget_flips(latent, broadcast_neg, 0.0).any()


@pytest.mark.parametrize("bits", [2, 4])
def test_channel_quantization_by_hand(bits):
    values = np.array([0.0, 1.0, 3.0, -2.0, -2.0], dtype=np.float32)  # channels [0, 1, 3] and [-2, -2]
    segments = np.array([3, 2])
    raw = quantize_channels(values, segments, bits, np.random.default_rng(0))
    levels = (1 << bits) - 1
    lo = np.frombuffer(raw[:4], np.float16)
    step = np.frombuffer(raw[4:8], np.float16)
    want = np.float16(3.0 / levels)
    want = want if float(want) >= 3.0 / levels else np.nextafter(want, np.float16(np.inf))  # rounded up: no clipping
    assert lo.tolist() == [0.0, -2.0] and step[0] == want and step[1] == 0
    assert len(raw) == 8 + (5 * bits + 7) // 8
    out = dequantize_channels(raw, segments, bits)
    assert out[3] == out[4] == -2.0 and out[0] == 0.0  # a constant channel and the minimum are exact
    assert abs(out[2] - 3.0) <= levels * (float(want) - 3.0 / levels) + 1e-6
    assert abs(out[1] - 1.0) <= step[0] + 1e-6
    # unbiased over many roundings
    mean = np.mean([dequantize_channels(quantize_channels(values, segments, bits, np.random.default_rng(s)), segments, bits)
                    for s in range(400)], axis=0)
    assert abs(mean[1] - 1.0) < 0.05


def test_lora_frames_are_checked():
    segments = np.array([4, 4])
    frame = encode_lora(FP16, 0, 1, 0, np.ones(8, np.float16).tobytes(), compress=False)
    assert decode_lora(frame, segments, (FP16,))[3] == 0
    bad = bytearray(frame)
    bad[-1] ^= 1
    for buf, kinds in [(frame[:-2], (FP16,)), (bytes(bad), (FP16,)), (frame, (QUANT,)), (b"LORA", (FP16,))]:
        with pytest.raises(CodecError):
            decode_lora(buf, segments, kinds)
    with pytest.raises(CodecError, match="shapes need"):
        decode_lora(frame, np.array([4, 5]), (FP16,))


def test_refit_of_one_client_reproduces_its_product():
    spec = AdapterSpec((LayerSpec("l", 12, 10, 3),), ("in", "mid", "out"), b"r" * 16)
    g = torch.Generator().manual_seed(0)
    state = AdapterState(0, torch.rand(spec.n_bits, generator=g) < 0.5, torch.rand(spec.n_scales, generator=g) + 0.5)
    update = Update(1, 0, torch.rand(spec.n_bits, generator=g) < 0.1, torch.randn(spec.n_scales, generator=g) * 0.1)
    new = Refit(spec, sweeps=20)(ServerState.initial(state), [(update, 1.0), (update, 3.0)])  # two identical clients
    assert new.state.version == 1

    def product(neg, scales):
        (s1, s2), sc = split_carriers(spec, 1.0 - 2.0 * neg.float())["l"], split_scales(spec, scales)["l"]
        return _product(s2.double(), sc["mid"].double(), s1.double(), sc["out"].double(), sc["in"].double())

    target = product(state.negative ^ update.flips, state.scales + update.scale_delta)
    got = product(new.state.negative, new.state.scales)
    # a rank-3 sign factorization of a rank-3 sign product: the refit is close (not exact: scales are rank-1 fits)
    assert float((got - target).norm() / target.norm()) < 0.5


@pytest.mark.parametrize("rounding, fraction", [("stochastic", 1.0), ("nearest", 1.0), ("nearest", 0.5)])
def test_scale_error_feedback_sends_the_sum_of_the_deltas_over_rounds(rounding, fraction):
    """Error feedback: what a node sends over rounds adds up to what it trained, less one residual
    (with either rounding of the codes, and with half the out-scale segments left for later)."""
    import numpy as np
    import torch

    from lordba_fl.federation.apps import _adapted_model
    from lordba_fl.methods.lordba import RESIDUAL_KEY
    from lordba_fl.runconfig import parse_run_config
    from lordba_fl.methods.lordba.codec import scale_roundtrip

    _, _, method = _adapted_model(parse_run_config({"model": "tiny-llama", "rank": 4, "alpha": 8.0,
                                                    "codec.scale-encoding": "q2", "codec.scale-error-feedback": True,
                                                    "codec.scale-rounding": rounding, "codec.scale-fraction": fraction}))
    assert method.options.scale_rounding == rounding and method.options.scale_fraction == fraction
    state, sent, trained = {}, [], []
    g = torch.Generator().manual_seed(0)
    for rnd in range(5):
        delta = torch.randn(method.spec.n_scales, generator=g) * 1e-3
        trained.append(delta)
        carried = method._with_feedback_(delta, state, seed=rnd)  # delta + the previous residual
        sent.append(scale_roundtrip(carried, method.spec, method.options, rnd))
    residual = np.frombuffer(state[RESIDUAL_KEY]["values"], np.float32)
    np.testing.assert_allclose(np.sum(sent, axis=0) + residual, torch.stack(trained).sum(0).numpy(), rtol=0, atol=1e-7)
    # the residual is one rounding error of the last round: below one step, the segment's max |carried| (q2)
    # (a left-out segment keeps all of it)
    assert np.abs(residual).max() <= float(carried.abs().max()) * (1 + 2**-10)
    if fraction < 1:
        from lordba_fl.methods.lordba.codec import carried_entries

        left_out = ~carried_entries(carried.numpy(), method.spec, fraction)
        assert left_out.sum() >= 0.3 * method.spec.n_scales and not sent[-1][left_out].any()
        assert np.array_equal(residual[left_out], carried.numpy()[left_out])


def test_lora_q2_both_nodes_rebuild_the_global_state_from_2_bit_deltas():
    """lora-q2-both: the state moves by 2-bit deltas nodes rebuild exactly; the server keeps what
    quantization lost (error feedback); a node it does not know starts from the seeded version 0."""
    import numpy as np
    import torch

    from lordba_fl.federation.apps import _adapted_model
    from lordba_fl.methods import Reply
    from lordba_fl.methods.lora import dequantize_channels, encode_lora, quantize_channels
    from lordba_fl.runconfig import parse_run_config

    run = parse_run_config({"model": "tiny-llama", "rank": 4, "alpha": 8.0, "method": "lora-q2-both"})
    server, _, m = _adapted_model(run)
    m.init_server(server)
    start = m.global_values.clone()
    client, _, cm = _adapted_model(run)
    state = {}
    assert cm.client_load_(client, m.downlink(1, 1), state) == 0  # first contact: nothing to add to version 0
    assert torch.equal(cm.read_values(client), start)
    g = torch.Generator().manual_seed(0)
    sent = []
    for rnd in (1, 2, 3):
        update = torch.randn(int(m.segments.sum()), generator=g) * 1e-2
        raw = quantize_channels(update.numpy(), m.segments, 2, np.random.default_rng(rnd))
        sent.append(torch.from_numpy(dequantize_channels(raw, m.segments, 2)))
        metrics, rejected = m.aggregate(rnd, [Reply(7, encode_lora(1, 2, rnd, m.version, raw, compress=True), 1.0)])
        assert metrics["accepted"] == 1 and not rejected
    assert cm.client_load_(client, m.downlink(1, 4), state) == 3  # node 1 holds version 0: three deltas
    assert torch.equal(cm.read_values(client), m.global_values)  # bit-exact
    m.note_held(1, 3)
    assert len(m.downlink(1, 4)) < 100  # up to date: an empty delta list
    # error feedback: the state plus what is still owed is the start plus every update the server took
    torch.testing.assert_close(m.global_values + m.residual, start + sum(sent), rtol=0, atol=1e-6)
    m.note_held(2, 2)
    with pytest.raises(ValueError, match="holds none"):  # a node that lost its state
        cm.client_load_(client, m.downlink(2, 4), {})
    full = m._full_frame(4)
    assert len(m.downlink(1, 4)) < len(full) / 4
    m.history.pop(1)  # older deltas dropped: a node at version 0 now gets the fp16 state
    assert m.downlink(5, 4) == full


def test_budget_cut_matches_a_full_sort_and_breaks_ties_by_position():
    g = torch.Generator().manual_seed(3)
    latent = torch.randn(20_000, generator=g) * 1e-3
    latent[::7] = 2e-4  # many equal magnitudes, some at the cut
    neg = torch.rand(20_000, generator=g) < 0.5
    for budget in (0.0, 1e-4, 0.01, 0.1, 0.3):
        kept = budget_flips(latent.clone(), neg, budget, overwrite=True)
        wanted = (latent < 0) ^ neg
        k = min(int(wanted.sum()), flip_allowance(latent.numel(), budget))
        order = sorted(wanted.nonzero().squeeze(1).tolist(), key=lambda i: (-abs(float(latent[i])), i))
        assert kept.nonzero().squeeze(1).tolist() == sorted(order[:k])


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("budget", [0.0, 0.003, 0.05, 0.3, 1.0])
def test_projecting_flips_carrier_by_carrier_equals_the_flat_budget_cut(budget, strided):
    """project_flips_ works per carrier in place; it must put back exactly what the flat rule does
    (budget_flips on the whole stream: largest |L| kept, ties at the cut to the lowest positions),
    here on latents drawn from six magnitudes, so the cut falls inside a large tie; ``strided``: the
    latents held column-major (as a transposed view), which the tie-break must not depend on."""
    from lordba_fl.base.models import load_model
    from lordba_fl.methods import make_method
    from lordba_fl.methods.lordba.layout import read_latents, write_latents_
    from lordba_fl.methods.lordba.method import project_flips_
    from lordba_fl.runconfig import parse_run_config

    method = make_method(parse_run_config({"model": "tiny-llama", "rank": 4}))
    model = method.adapt(load_model("tiny-llama")[0])
    spec = method.spec
    if strided:
        for m in model.modules():
            for name in ("lordba_latent_A", "lordba_latent_B"):
                if hasattr(m, name):
                    getattr(m, name).data = getattr(m, name).data.t().contiguous().t()  # same values, column-major
    g = torch.Generator().manual_seed(3)
    levels = torch.tensor([-2.0, -1.0, -0.5, 0.5, 1.0, 2.0]) * 1e-3
    latent = levels[torch.randint(0, 6, (spec.n_bits,), generator=g)]
    negative = torch.rand(spec.n_bits, generator=g) < 0.5
    write_latents_(model, spec, latent)
    keep = budget_flips(latent, negative, budget)
    back = ((latent < 0) ^ negative) & ~keep
    tiny = torch.finfo(torch.float32).tiny
    expected = latent.clone()
    expected[back] = torch.where(negative[back], -tiny, tiny)
    assert project_flips_(model, spec, negative, budget) == int(back.sum())
    assert torch.equal(read_latents(model, spec), expected)


def _q2_downlink_server_and_client(rebase: bool):
    """A tiny-model server method (initialised) and a client method with 2-bit downlink codes."""
    from lordba_fl.federation.apps import _adapted_model
    from lordba_fl.runconfig import parse_run_config

    run = parse_run_config({"model": "tiny-llama", "rank": 4, "alpha": 8.0, "codec.state-scale-encoding": "q2",
                            "codec.scale-encoding": "fp16", "server.aggregator": "vote", "flip.budget": 0.01,
                            "server.rebase-scales": rebase})
    server, _, m = _adapted_model(run)
    m.init_server(server)
    client, _, cm = _adapted_model(run)
    return run, server, m, client, cm


def test_quantized_downlink_server_mirrors_what_each_node_holds():
    """codec.state-scale-encoding=q2: each node's scales move toward the global ones by 2-bit codes;
    the server holds exactly what each node decoded, reads the node's delta against it, and forgets
    a node whose reply does not confirm what it was sent."""
    import torch

    from lordba_fl.federation.apps import _adapted_model
    from lordba_fl.methods import Reply
    from lordba_fl.methods.lordba.codec import decode_state, encode_state, encode_update
    from lordba_fl.methods.lordba.method import HELD_KEY

    run, server, m, client, cm = _q2_downlink_server_and_client(rebase=True)
    g = torch.Generator().manual_seed(0)
    states = {1: {}, 2: {}}

    def held(node):
        return decode_state(states[node][HELD_KEY]["frame"], cm.spec, cm.state_options)

    for node in (1, 2):  # first contact: version 0, every party's seeded state
        assert cm.client_load_(client, m.downlink(node, 1), states[node]) == 0
        m.note_held(node, 0)
        assert torch.equal(m.node_scales[node], held(node).scales)
    for rnd in (1, 2, 3):  # node 1 trains: its scales move by a delta, the global state follows
        delta = torch.randn(m.spec.n_scales, generator=g) * 0.05
        frame = encode_update(Update(rnd, m.version, torch.zeros(m.spec.n_bits, dtype=torch.bool), delta), m.spec,
                              cm.options)
        metrics, rejected = m.aggregate(rnd, [Reply(1, frame, 1.0)])
        assert metrics["accepted"] == 1 and not rejected
        # FedAvg of one client (eta = 1): the global scales are the node's held scales plus its delta
        torch.testing.assert_close(m.server.state.scales, m.node_scales[1] + delta.half().float(), rtol=0, atol=1e-6)
        assert cm.client_load_(client, m.downlink(1, rnd + 1), states[1]) == m.version
        m.note_held(1, m.version)
        assert torch.equal(m.node_scales[1], held(1).scales)  # the server's mirror is exact
    # node 2 missed three versions: one 2-bit delta toward the current scales, not three
    q2 = m.downlink(2, 4)
    fp16_delta = encode_state(m.server.state, m.spec, m.exact_options, base=held(2))
    assert len(q2) < 0.35 * len(fp16_delta)
    assert cm.client_load_(client, q2, states[2]) == m.version
    m.note_held(2, m.version)
    before = (m.node_scales[2] - m.server.state.scales).abs()
    # a reply of node 2 with no change: its scales are the ones it holds, not the global ones
    u = Update(4, m.version, torch.zeros(m.spec.n_bits, dtype=torch.bool), torch.zeros(m.spec.n_scales))
    torch.testing.assert_close(m._rebased(2, u).scale_delta + m.server.state.scales, m.node_scales[2], rtol=0, atol=1e-6)
    assert float(before.max()) > 0  # 2-bit codes: the node holds an approximation
    tensors, meta = m.server_state()  # a checkpoint keeps what each node holds
    _, _, resumed = _adapted_model(run)
    resumed.init_server(server)
    resumed.load_server_state(tensors, meta)
    assert resumed.node_scales.keys() == {1, 2} and torch.equal(resumed.node_scales[2], m.node_scales[2])
    # a node that reports another version than it was sent is forgotten: the seeded delta next time
    m.downlink(2, 5)
    m.note_held(2, 0)
    assert 2 not in m.node_versions and 2 not in m.node_scales
    m.note_held(1, None)
    assert 1 not in m.node_scales


@pytest.mark.parametrize("rebase", [True, False])
def test_a_node_behind_on_its_scales_counts_as_held_or_as_a_change(rebase):
    """server.rebase-scales: a node whose 2-bit downlink left it holding an approximation replies with
    no change. Rebased, the round's FedAvg moves the global scales to what it holds; as a change to
    the global scales, the round changes nothing."""
    import torch

    from lordba_fl.methods import Reply
    from lordba_fl.methods.lordba.codec import encode_update

    _, _, m, client, cm = _q2_downlink_server_and_client(rebase)
    no_flips = torch.zeros(m.spec.n_bits, dtype=torch.bool)
    for node in (1, 2):
        cm.client_load_(client, m.downlink(node, 1), {})
        m.note_held(node, 0)
    delta = torch.randn(m.spec.n_scales, generator=torch.Generator().manual_seed(0)) * 0.05
    m.aggregate(1, [Reply(1, encode_update(Update(1, m.version, no_flips, delta), m.spec, cm.options), 1.0)])
    cm.client_load_(client, m.downlink(2, 2), {})  # node 2: 2-bit codes toward the new scales
    m.note_held(2, m.version)
    glob, held = m.server.state.scales.clone(), m.node_scales[2].clone()
    assert float((held - glob).abs().max()) > 1e-3
    zero = encode_update(Update(2, m.version, no_flips, torch.zeros(m.spec.n_scales)), m.spec, cm.options)
    assert m.aggregate(2, [Reply(2, zero, 1.0)])[0]["accepted"] == 1
    if rebase:  # what the node holds, rounded to the broadcast's 7 mantissa bits
        torch.testing.assert_close(m.server.state.scales, held, rtol=2**-7, atol=0)
    else:
        assert torch.equal(m.server.state.scales, glob)


def test_server_momentum_is_configured_and_kept_by_a_checkpoint():
    """server.eta / server.momentum reach the refit; the momentum the server keeps survives a checkpoint."""
    from lordba_fl.federation.apps import _adapted_model
    from lordba_fl.methods import Reply
    from lordba_fl.methods.lordba.codec import encode_update
    from lordba_fl.runconfig import parse_run_config

    run = parse_run_config({"model": "tiny-llama", "rank": 4, "alpha": 8.0, "server.eta": 1.5, "server.momentum": 0.9})
    server, _, m = _adapted_model(run)
    m.init_server(server)
    assert (m.aggregator.eta, m.aggregator.momentum) == (1.5, 0.9)
    _, _, cm = _adapted_model(run)
    delta = torch.randn(m.spec.n_scales, generator=torch.Generator().manual_seed(3)) * 0.05
    frame = encode_update(Update(1, m.version, torch.zeros(m.spec.n_bits, dtype=torch.bool), delta), m.spec, cm.options)
    metrics, _ = m.aggregate(1, [Reply(1, frame, 1.0)])
    assert metrics["accepted"] == 1 and m.server.momentum
    tensors, meta = m.server_state()
    _, _, resumed = _adapted_model(run)
    resumed.init_server(server)
    resumed.load_server_state(tensors, meta)
    assert resumed.server.equals(m.server)
    with pytest.raises(ValueError, match="server.momentum"):
        parse_run_config({"server.momentum": 1.0})
    with pytest.raises(ValueError, match="server.aggregator=refit"):  # the vote would ignore it
        parse_run_config({"server.momentum": 0.5, "server.aggregator": "vote"})
    with pytest.raises(ValueError, match="server.eta"):
        parse_run_config({"server.eta": float("inf")})


@pytest.mark.parametrize("every_step", [False, True])
def test_a_per_step_budget_trains_the_scales_on_the_signs_that_are_sent(every_step):
    """flip.every-step: after each local step the latents are projected onto the round's flip budget,
    so the adapter the client trained is the adapter it sends (its flips are exactly the uplink's);
    without it the client trains on more flips than it sends. The tiny model at m0 << E * lr."""
    from lordba_fl.base.models import load_model
    from lordba_fl.methods import make_method
    from lordba_fl.methods.lordba.codec import decode_update
    from lordba_fl.methods.lordba.layout import read_latents
    from lordba_fl.runconfig import parse_run_config

    cfg = parse_run_config({"model": "tiny-llama", "rank": 4, "train.local-steps": 6, "train.batch-size": 2,
                            "flip.m0": 1e-4, "flip.latent-lr": 1e-2, "flip.budget": 0.01, "flip.budget-start": 0.0,
                            "flip.every-step": every_step, "server.seeded-base": False})
    server = make_method(cfg)
    server.init_server(server.adapt(load_model("tiny-llama")[0]))
    model, tok = load_model("tiny-llama")
    client = make_method(cfg)
    model = client.adapt(model)
    texts = [f"{a} {b} {a} {b} {a}" for a in "abcdefgh" for b in "ijklmnop"]
    from lordba_fl.data import Example

    examples = [Example(t[:5], t[5:]) for t in texts]
    frame, metrics = client.client_train(model, tok, server.downlink(1, 1), None, examples, 1, seed=0)
    update = decode_update(frame, client.spec, client.options)
    trained = (read_latents(model, client.spec) < 0) ^ server.server.state.negative
    allowed = flip_allowance(client.spec.n_bits, 0.01)
    assert int(update.flips.sum()) == allowed  # the budget binds: more signs wanted to flip
    if every_step:
        assert torch.equal(trained, update.flips)
    else:
        assert int(trained.sum()) > allowed


def test_a_warmup_round_keeps_the_scale_quantization_residual_too():
    """init.warmup-rounds with codec.scale-error-feedback: the device-fitted round's 2-bit scale delta
    plus the residual the node keeps is exactly what it trained (nothing is dropped in warm-up rounds)."""
    import numpy as np

    from lordba_fl.base.models import load_model
    from lordba_fl.data import Example
    from lordba_fl.methods import make_method
    from lordba_fl.methods.lordba import RESIDUAL_KEY
    from lordba_fl.methods.lordba.codec import decode_state, decode_update
    from lordba_fl.methods.lordba.layout import read_scales
    from lordba_fl.runconfig import parse_run_config

    cfg = parse_run_config({"model": "tiny-llama", "rank": 4, "train.local-steps": 2, "train.batch-size": 2,
                            "init.warmup-rounds": 1, "server.seeded-base": False, "codec.scale-encoding": "q2",
                            "codec.scale-rounding": "nearest", "codec.scale-error-feedback": True})
    server = make_method(cfg)
    server.init_server(server.adapt(load_model("tiny-llama")[0]))
    model, tok = load_model("tiny-llama")
    client = make_method(cfg)
    model = client.adapt(model)
    down, state = server.downlink(1, 1), {}
    glob = decode_state(down, client.spec, client.state_options)
    examples = [Example(t[:5], t[5:]) for t in (f"{a} {b} {a} {b} {a}" for a in "abcd" for b in "ijkl")]
    frame, _ = client.client_train(model, tok, down, state, examples, 1, seed=0)
    sent = decode_update(frame, client.spec, client.options).scale_delta.numpy()
    residual = np.frombuffer(state[RESIDUAL_KEY]["values"], np.float32)
    trained = (read_scales(model, client.spec) - glob.scales).numpy()
    assert np.abs(residual).max() > 0  # 2-bit codes lose something, which is kept
    np.testing.assert_allclose(sent + residual, trained, rtol=0, atol=1e-6)


def test_scale_lr_ratio_sets_the_scales_learning_rate_only(monkeypatch):
    """scale-lr-ratio: a client's optimizer gets every scale at ratio x lr and the latents at
    flip.latent-lr, unchanged; a ratio <= 0 is refused with the key named."""
    import lordba_fl.methods.lordba.method as lm
    from lordba_fl.adapter.layer import lordba_layers
    from lordba_fl.base.models import load_model
    from lordba_fl.data import Example
    from lordba_fl.methods import make_method
    from lordba_fl.runconfig import parse_run_config

    seen = []
    real = lm.make_optimizer
    monkeypatch.setattr(lm, "make_optimizer", lambda groups, cfg: seen.append(groups) or real(groups, cfg))
    cfg = parse_run_config({"model": "tiny-llama", "rank": 4, "train.local-steps": 1, "train.batch-size": 2, "lr": 1e-3,
                            "scale-lr-ratio": 2.5, "flip.latent-lr": 4e-3, "server.seeded-base": False})
    server = make_method(cfg)
    server.init_server(server.adapt(load_model("tiny-llama")[0]))
    client = make_method(cfg)
    model, tok = load_model("tiny-llama")
    model = client.adapt(model)
    examples = [Example(f"{a} {b}", f" {a}") for a in "abcd" for b in "efgh"]
    client.client_train(model, tok, server.downlink(1, 1), None, examples, 1, seed=0)
    (groups,) = seen
    scales = {id(m.scale(k)) for m in lordba_layers(model).values() for k in client.spec.scales}
    latents = {id(p) for m in lordba_layers(model).values() for p in (m.lordba_latent_A, m.lordba_latent_B)}
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert set(lr_of) == scales | latents
    assert {lr_of[i] for i in scales} == {1e-3 * 2.5} and {lr_of[i] for i in latents} == {4e-3}
    with pytest.raises(ValueError, match="scale-lr-ratio"):
        make_method(parse_run_config({"model": "tiny-llama", "scale-lr-ratio": 0.0}))


@pytest.mark.parametrize("every_step", [False, True])
def test_gradient_selection_flips_the_signs_with_the_largest_summed_gradient(every_step):
    """flip.select=gradient: the latents stay out of AdamW; the flips sent are the budget's largest
    |sum of straight-through gradients| among the signs that descent pushes across (ties: lowest
    positions), recomputed here from hooks that record every gradient of the round independently."""
    from lordba_fl.base.models import load_model
    from lordba_fl.data import Example
    from lordba_fl.methods import make_method
    from lordba_fl.methods.lordba.codec import decode_update
    from lordba_fl.methods.lordba.layout import checked_layers, read_latents
    from lordba_fl.runconfig import parse_run_config

    cfg = parse_run_config({"model": "tiny-llama", "rank": 4, "train.local-steps": 3, "train.batch-size": 2,
                            "flip.select": "gradient", "flip.budget": 0.01, "flip.budget-start": 0.0,
                            "flip.every-step": every_step, "server.seeded-base": False})
    server = make_method(cfg)
    server.init_server(server.adapt(load_model("tiny-llama")[0]))
    client = make_method(cfg)
    model = client.adapt(load_model("tiny-llama")[0])
    tok = load_model("tiny-llama")[1]
    latents = [p for m in checked_layers(model, client.spec) for p in (m.lordba_latent_A, m.lordba_latent_B)]
    sums = [torch.zeros(p.numel()) for p in latents]  # fp32, added in step order: as .grad accumulates

    def recorder(acc):
        def hook(grad):
            acc.add_(grad.reshape(-1))
        return hook

    for p, acc in zip(latents, sums):
        p.register_hook(recorder(acc))
    texts = [f"{a} {b} {a} {b} {a}" for a in "abcdefgh" for b in "ijklmnop"]
    examples = [Example(t[:5], t[5:]) for t in texts]
    frame, _ = client.client_train(model, tok, server.downlink(1, 1), None, examples, 1, seed=0)
    update = decode_update(frame, client.spec, client.options)

    g = torch.cat(sums)  # (n_bits,)
    negative = server.server.state.negative
    wanted = torch.where(negative, g < 0, g > 0)
    k = flip_allowance(client.spec.n_bits, 0.01)
    assert int(wanted.sum()) > k  # the budget binds
    order = sorted(wanted.nonzero().squeeze(1).tolist(), key=lambda i: (-abs(float(g[i])), i))
    assert update.flips.nonzero().squeeze(1).tolist() == sorted(order[:k])
    assert all(p.grad is None for p in latents)  # freed before the uplink
    # every latent is at +-m0 on the sent signs (every step) or on the broadcast signs (never moved)
    latent = read_latents(model, client.spec)
    signs = negative ^ update.flips if every_step else negative
    assert torch.equal(latent < 0, signs) and torch.allclose(latent.abs(), torch.full_like(latent, client.cfg.flip.m0))


def test_gradient_selection_refuses_kept_latent_state():
    from lordba_fl.runconfig import parse_run_config

    with pytest.raises(ValueError, match="client.state=none or flip.select=latent"):
        parse_run_config({"flip.select": "gradient", "client.state": "latent"})
    with pytest.raises(ValueError, match="flip.select must be one of"):
        parse_run_config({"flip.select": "hessian"})
