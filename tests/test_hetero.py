"""Heterogeneous devices: nested ranks (a tier's adapter is exactly the leading components of the
global one), mixed-rank aggregation, tier assignment and the errors that name the accepted values."""

import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_adapter_, tiny_llama
from localgrid import LocalGrid
from safetensors.torch import load_file

from clients.app import make_client_app
from lordba_fl import LoRDBAConfig, attach_lordba_
from lordba_fl.federation.apps import run_server
from lordba_fl.hetero import node_rank, parse_tiers, tier_rank
from lordba_fl.runconfig import DEFAULTS, builtin_method_keys, parse_run_config
from lordba_fl.methods.lordba.layout import (
    AdapterSpec,
    AdapterState,
    LayerSpec,
    at_rank,
    embed_carriers,
    embed_scales,
    read_state,
    split_carriers,
    split_scales,
    truncate_state,
    write_state_,
)


def test_a_tier_adapter_is_exactly_the_leading_components_of_the_global_one():
    big = attach_and_randomize(rank=8)
    spec = AdapterSpec.from_model(big)
    state = read_state(big, spec, version=3)
    low = at_rank(spec, 3)
    tier = truncate_state(spec, low, state)
    small = tiny_llama()
    attach_lordba_(small, LoRDBAConfig(rank=3, alpha=8.0 * 3 / 8, scales=spec.scales))
    write_state_(small, low, tier)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    # the tier model's output equals the global adapter with components 3..7 switched off
    sc = split_scales(spec, state.scales.clone())
    for d in sc.values():
        d["mid"][3:] = 0.0
    cut = AdapterState(3, state.negative, torch.cat([v for d in sc.values() for v in d.values()]))
    write_state_(big, spec, cut)
    # (5 components of exact zeros change only the order fp32 sums are taken in)
    torch.testing.assert_close(small(ids).logits, big(ids).logits, rtol=1e-5, atol=1e-5)
    for (a, b), (a_low, b_low) in zip(split_carriers(spec, state.negative).values(),
                                      split_carriers(low, tier.negative).values()):
        assert torch.equal(a[:3], a_low) and torch.equal(b[:, :3], b_low)
    # embedding the tier back changes nothing
    assert torch.equal(embed_carriers(low, spec, tier.negative, state.negative), state.negative)
    assert torch.equal(embed_scales(low, spec, tier.scales, state.scales), state.scales)


def attach_and_randomize(rank: int):
    model = tiny_llama()
    attach_lordba_(model, LoRDBAConfig(rank=rank, alpha=8.0, scales=("in", "mid", "out")))
    randomize_adapter_(model)
    return model


def test_tiers_are_parsed_and_drawn_per_partition():
    assert parse_tiers("", 16) == ()
    tiers = parse_tiers("16:0.4, 4:0.3,8:0.3", 16)
    assert tiers == ((4, 0.3), (8, 0.3), (16, 0.4))
    draws = [tier_rank(tiers, 0, p, 16) for p in range(3000)]
    assert draws == [tier_rank(tiers, 0, p, 16) for p in range(3000)]  # seeded per (seed, partition)
    shares = {r: draws.count(r) / 3000 for r in (4, 8, 16)}
    assert all(abs(shares[r] - p) < 0.04 for r, p in tiers)
    assert node_rank({"rank": 8}, tiers, 0, 5, 16) == 8 and node_rank({}, (), 0, 5, 16) == 16


@pytest.mark.parametrize(
    "text, match",
    [
        ("4:0.5,32:0.5", r"a rank in 1..16"),
        ("4:0.5,8", "rank:share"),
        ("4:0.5,8:0.4", "must sum to 1"),
        ("4:0.5,4:0.5", "lists a rank twice"),
        ("4:0,16:1", r"a share in \(0, 1\]"),
    ],
)
def test_bad_tiers_name_the_accepted_values(text, match):
    with pytest.raises(ValueError, match=match):
        parse_run_config({"hetero.tiers": text})


def test_tiers_only_for_lordba_and_node_ranks_checked():
    with pytest.raises(ValueError, match=r"serves several ranks \(\['lora-flexlora', 'lora-flora', 'lora-hetlora', 'lordba'\]\)"):
        parse_run_config({"hetero.tiers": "4:1", "method": "lora-fedavg"})
    with pytest.raises(ValueError, match=r"integer in 1..16"):
        node_rank({"rank": 32}, (), 0, 0, 16)
    spec = AdapterSpec((LayerSpec("a", 8, 6, 4),), ("mid", "out"), b"f" * 16)
    with pytest.raises(ValueError, match=r"integer in 1..4"):
        at_rank(spec, 5)


BASE = {
    "model": "tiny-llama", "task": "shakespeare", "data.shakespeare.max-clients": 4, "rounds": 2, "clients-per-round": 4,
    "rank": 8, "alpha": 16.0, "train.local-steps": 2, "train.batch-size": 2, "train.seq-len": 48, "eval.examples": 6,
    "eval.generate": 0, "flip.m0": 0.001, "flip.latent-lr": 0.05, "flip.budget": 0.05, "server.aggregator": "vote",
}


def _run(tmp_path: Path, grid=None, **overrides):
    cfg = dict(DEFAULTS)
    cfg.update(BASE)
    cfg.update({"out-dir": str(tmp_path)})
    cfg.update(overrides)
    grid = grid or LocalGrid(make_client_app(), 4, cfg)
    for ctx in grid.contexts.values():
        ctx.run_config.update(cfg)
    run_server(grid, cfg)
    run_dir = tmp_path / "lordba-vote"
    return grid, run_dir, [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


@pytest.mark.real_model
def test_a_mixed_round_aggregates_every_tier_in_the_global_layout(tmp_path):
    """Two tiers (ranks 2 and 8) in one federation: each node receives its nested tier, every reply is
    accepted, and the vote's new global state is the one computed by hand from the embedded updates."""
    from lordba_fl.methods.lordba.aggregation import LatentVote, ServerState, collect_updates
    from lordba_fl.federation.strategy import read_frame
    from lordba_fl.methods.lordba.codec import CodecOptions, Update, read_header

    # partitions 0..3 with this seed draw ranks from "2:0.5,8:0.5"
    tiers = parse_tiers("2:0.5,8:0.5", 8)
    ranks = [tier_rank(tiers, 0, p, 8) for p in range(4)]
    assert sorted(set(ranks)) == [2, 8], ranks  # both tiers present (seeded)
    grid, run_dir, rows = _run(tmp_path, **{"hetero.tiers": "2:0.5,8:0.5"})
    assert rows[1]["accepted"] == rows[2]["accepted"] == 4 and rows[2]["rejected"] == 0
    n2, n8 = ranks.count(2), ranks.count(8)
    for row in rows[1:]:  # the tier mix and each tier's bytes; the tiers add up to the round's totals
        assert row["tier_mix"] == f"2:{n2},8:{n8}"
        assert row["tier2_up_wire_mean"] < row["tier8_up_wire_mean"]  # a rank-2 adapter sends fewer bits
        for d in ("up", "down"):
            assert n2 * row[f"tier2_{d}_wire_mean"] + n8 * row[f"tier8_{d}_wire_mean"] == pytest.approx(row[f"{d}_wire_sum"])
    t1, t2 = load_file(str(run_dir / "ckpt-1.safetensors")), load_file(str(run_dir / "ckpt-2.safetensors"))
    before = ServerState(AdapterState(1, t1["negative"], t1["scales"]), t1["latent"])
    after = AdapterState(2, t2["negative"], t2["scales"])
    from lordba_fl.federation.apps import _worker

    spec = AdapterSpec.from_model(_worker(parse_run_config(grid.contexts[100].run_config))[0])
    pairs = [(q, a) for q, a in zip(grid.sent, grid.replies)
             if q.metadata.message_type == "train" and int(q.content["config"]["server-round"]) == 2]
    updates = []
    for q, a in sorted(pairs, key=lambda qa: float(qa[1].content["metrics"]["partition-id"])):
        pid = int(a.content["metrics"]["partition-id"])
        low = spec if ranks[pid] == 8 else at_rank(spec, ranks[pid])
        assert read_header(read_frame(q.content)).n_bits == low.n_bits  # the downlink is the node's tier
        got, bad = collect_updates([(read_frame(a.content), float(a.content["metrics"]["num-examples"]))], low,
                                   CodecOptions(scale_encoding="q8"), version=1)
        assert not bad
        u, w = got[0]
        flips = embed_carriers(low, spec, u.flips, torch.zeros(spec.n_bits, dtype=torch.bool))
        delta = embed_scales(low, spec, u.scale_delta, torch.zeros(spec.n_scales))
        updates.append((Update(u.round, u.version, flips, delta), w))
    expected = LatentVote()(before, updates)
    assert expected.state.version == after.version and torch.equal(expected.state.negative, after.negative)
    # the scale step is a weighted float sum: its rounding may differ by an ulp between the server's
    # reduction and this one (vector widths differ across CPUs), never more
    torch.testing.assert_close(expected.state.scales, after.scales, rtol=4 * 2.0**-23, atol=1e-9)


@pytest.mark.real_model
def test_a_reply_of_the_wrong_rank_for_its_tier_is_rejected_never_applied():
    from lordba_fl.federation.apps import _adapted_model
    from lordba_fl.methods import Reply
    from lordba_fl.methods.lordba.codec import Update, encode_update

    cfg = parse_run_config({"model": "tiny-llama", "rank": 8, "alpha": 16.0, "hetero.tiers": "2:0.5,8:0.5",
                            "server.aggregator": "vote"})
    model, _, method = _adapted_model(cfg)
    method.init_server(model)
    before = method.server.state.clone()
    method.note_rank(7, 2)
    full = Update(1, 0, torch.zeros(method.spec.n_bits, dtype=torch.bool), torch.zeros(method.spec.n_scales))
    metrics, rejected = method.aggregate(1, [Reply(7, encode_update(full, method.spec), 1.0)])
    assert metrics["accepted"] == 0 and rejected and rejected[0][0] == 7 and "ShapeMismatch" in rejected[0][1]
    assert method.server.state.equals(before)
    with pytest.raises(ValueError, match=r"integer in 1..8"):
        method.note_rank(7, 9)


def test_the_benchmark_plans_three_federations_and_averages_tier_bytes_by_clients():
    from simulations.hetero import plan, tier_fields

    runs = plan("4:0.3,8:0.3,16:0.4", [0], "shakespeare")
    assert [(s["variant"], s["rank"], extra) for s, extra in runs] == [
        ("uniform-r16", 16, {}), ("uniform-r4", 4, {}), ("mixed", 16, {"hetero.tiers": "4:0.3,8:0.3,16:0.4"})]
    lora = plan("4:0.5,16:0.5", [0], "shakespeare", ("lora-hetlora", "lora-flexlora"))
    assert [(s["variant"], s["overrides"]["method"], s["rank"]) for s, _ in lora] == [  # uniform LoRA planned once
        ("lora-fedavg-r16", "lora-fedavg", 16), ("lora-fedavg-r4", "lora-fedavg", 4),
        ("lora-hetlora-mixed", "lora-hetlora", 16), ("lora-flexlora-mixed", "lora-flexlora", 16)]
    only = plan("4:0.5,16:0.5", [0], "shakespeare", ("lora-flexlora",), only=["lora-flexlora-mixed"])
    assert [(s["variant"], e) for s, e in only] == [("lora-flexlora-mixed", {"hetero.tiers": "4:0.5,16:0.5"})]
    with pytest.raises(ValueError, match=r"planned variants: \['lora-fedavg-r16'"):
        plan("4:0.5,16:0.5", [0], "shakespeare", ("lora-flexlora",), only=["mixd"])
    with pytest.raises(ValueError, match="the benchmark knows"):
        plan("4:0.5,16:0.5", [0], "shakespeare", ("lora-fedavg",))
    rows = [{"round": 0},
            {"round": 1, "tier_mix": "4:1,16:1", "tier4_clients": 1, "tier4_up_wire_mean": 100.0, "tier4_down_wire_mean": 50.0,
             "tier16_clients": 1, "tier16_up_wire_mean": 400.0, "tier16_down_wire_mean": 200.0},
            {"round": 2, "tier_mix": "4:2", "tier4_clients": 2, "tier4_up_wire_mean": 130.0, "tier4_down_wire_mean": 80.0}]
    got = tier_fields(rows)
    assert got["tier4_up_bytes_per_client_round"] == (100 + 2 * 130) / 3 and got["tier4_client_rounds"] == 3
    assert got["tier16_down_bytes_per_client_round"] == 200.0 and got["tier_mix_last_round"] == "4:2"


@pytest.mark.real_model
def test_a_node_that_changes_tier_mid_run_is_refused_once_then_served_its_new_tier(tmp_path):
    grid, run_dir, rows = _run(tmp_path, rounds=1)
    ctx = grid.contexts[101]
    assert rows[1]["accepted"] == 4 and "tier_mix" not in rows[1]  # no tiers: every node at the run's rank 8
    ctx.node_config["rank"] = 2  # the device behind node 101 now affords rank 2 (its state lives on)
    _, _, rows = _run(tmp_path, grid=grid, rounds=3, resume=True)
    # round 2: the server still sends it rank 8; it says it trains rank 2 and sends no update
    assert rows[2]["accepted"] == 3 and rows[2]["clients_failed"] == 1
    # round 3: it gets the rank-2 tier's full state and its update is aggregated with the others
    assert rows[3]["accepted"] == 4 and rows[3]["tier_mix"] == "2:1,8:3"


def _lora_method(name: str):
    from lordba_fl.federation.apps import _adapted_model

    cfg = parse_run_config({"model": "tiny-llama", "rank": 8, "alpha": 16.0, "method": name,
                            "hetero.tiers": "2:0.3,4:0.3,8:0.4"})
    model, _, method = _adapted_model(cfg)
    method.init_server(model)
    g = torch.Generator().manual_seed(5)
    method.global_values = torch.randn(method.global_values.shape, generator=g) * 0.1  # a trained global state
    return method


def _lora_reply(method, node: int, rank: int, seed: int):
    """A node's reply at ``rank``: its tier's broadcast plus noise, as fp16 factors."""
    import numpy as np

    from lordba_fl.methods import Reply
    from lordba_fl.methods.lora import FP16, encode_lora

    g = torch.Generator().manual_seed(seed)
    v = method.truncate(method.global_values, rank)
    v = (v + torch.randn(v.shape, generator=g) * 0.05).half().float()
    frame = encode_lora(FP16, 0, 1, method.version, v.numpy().astype(np.float16).tobytes(), compress=False)
    return v, Reply(node, frame, float(seed + 1))


@pytest.mark.parametrize("name", ["lora-hetlora", "lora-flexlora"])
def test_lora_tiers_are_nested_and_a_wrong_rank_reply_is_rejected(name):
    from lordba_fl.methods.lora import fp16_values, decode_lora

    method = _lora_method(name)
    method.note_rank(1, 2)
    down = method.downlink(1, 1)  # the rank-2 broadcast: the leading 2 components of every layer
    got = torch.from_numpy(fp16_values(decode_lora(down, method.segments_at(2), (0,))[4]).copy())
    for (a, bt), (a2, bt2) in zip(method.split(method.global_values, 8), method.split(got, 2)):
        assert torch.equal(a[:2].half().float(), a2) and torch.equal(bt[:2].half().float(), bt2)
    padded = method.split(method.pad(method.truncate(method.global_values, 2), 2), 8)
    for (a, bt), (pa, pbt) in zip(method.split(method.global_values, 8), padded):
        assert torch.equal(pa[:2], a[:2]) and not pa[2:].any() and torch.equal(pbt[:2], bt[:2]) and not pbt[2:].any()
    before = method.global_values.clone()
    _, wrong = _lora_reply(method, 1, 4, seed=0)  # node 1 trains rank 2; a rank-4 reply is refused
    metrics, rejected = method.aggregate(1, [wrong])
    assert metrics["accepted"] == 0 and rejected[0][0] == 1 and "node trains rank 2" in rejected[0][1]
    assert torch.equal(method.global_values, before) and method.version == 0
    with pytest.raises(ValueError, match=r"serves ranks 1..8"):
        method.note_rank(1, 9)


def test_hetlora_pads_replies_with_zeros_and_takes_the_weighted_mean():
    method = _lora_method("lora-hetlora")
    for node, rank in ((1, 2), (2, 4), (3, 8)):
        method.note_rank(node, rank)
    replies = [_lora_reply(method, n, r, seed=n) for n, r in ((1, 2), (2, 4), (3, 8))]
    method.aggregate(1, [rep for _, rep in replies])
    total = sum(rep.weight for _, rep in replies)
    for i, (a, bt) in enumerate(method.split(method.global_values, 8)):
        for k in range(8):  # component k: the weighted mean over all replies, zero where a reply lacks it
            want_a = sum(rep.weight * method.split(v, r)[i][0][k] for (v, rep), r in zip(replies, (2, 4, 8)) if k < r)
            want_b = sum(rep.weight * method.split(v, r)[i][1][k] for (v, rep), r in zip(replies, (2, 4, 8)) if k < r)
            torch.testing.assert_close(a[k], want_a / total, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(bt[k], want_b / total, rtol=1e-6, atol=1e-7)


def test_flexlora_keeps_the_weighted_mean_product_exactly_when_the_ranks_fit():
    """Ranks 2 + 4 <= 8: the mean of the products has rank <= 6, so its top-8 SVD factors reproduce it
    exactly; each tier then gets the best rank-r approximation (its leading components)."""
    method = _lora_method("lora-flexlora")
    for node, rank in ((1, 2), (2, 4)):
        method.note_rank(node, rank)
    replies = [_lora_reply(method, n, r, seed=n) for n, r in ((1, 2), (2, 4))]
    method.aggregate(1, [rep for _, rep in replies])
    total = sum(rep.weight for _, rep in replies)
    for i, (a, bt) in enumerate(method.split(method.global_values, 8)):
        mean = sum(rep.weight / total * (method.split(v.double(), r)[i][1].t() @ method.split(v.double(), r)[i][0])
                   for (v, rep), r in zip(replies, (2, 4)))
        torch.testing.assert_close((bt.t() @ a).double(), mean, rtol=1e-4, atol=1e-6)
        s = torch.linalg.svdvals(mean)
        assert torch.allclose(bt.double().norm(dim=1), s[:8], rtol=1e-4, atol=1e-7)  # B's rows carry sigma, A is orthonormal


@pytest.mark.real_model
@pytest.mark.parametrize("name", ["lora-hetlora", "lora-flexlora", "lora-flora"])
def test_a_mixed_lora_federation_serves_each_tier_its_rank(tmp_path, name):
    """The LoRA heterogeneity baselines in the real harness: every node replies at its tier's rank,
    the server accepts all of them and meters each tier (a rank-2 node moves a quarter of a rank-8's bytes)."""
    tiers = parse_tiers("2:0.5,8:0.5", 8)
    ranks = [tier_rank(tiers, 0, p, 8) for p in range(4)]
    cfg = dict(DEFAULTS)
    cfg.update({k: v for k, v in BASE.items() if k not in builtin_method_keys()})  # LoRDBA's keys: not LoRA's
    cfg.update({"out-dir": str(tmp_path), "method": name, "hetero.tiers": "2:0.5,8:0.5"})
    grid = LocalGrid(make_client_app(), 4, cfg)
    run_server(grid, cfg)
    rows = [json.loads(line) for line in (tmp_path / name / "rounds.jsonl").read_text().splitlines()]
    for row in rows[1:]:
        assert row["accepted"] == 4 and row["rejected"] == 0
        assert row["tier_mix"] == f"2:{ranks.count(2)},8:{ranks.count(8)}"
        assert row["tier2_up_wire_mean"] < 0.3 * row["tier8_up_wire_mean"]
    assert rows[2]["eval_loss"] != rows[0]["eval_loss"]


@pytest.mark.parametrize("scales", [("mid", "out"), ("in", "mid", "out")])
def test_seeded_state_is_what_attach_draws_and_a_tier_derives_the_top_ranks_version_0(scales):
    from lordba_fl.federation.apps import _adapted_model
    from lordba_fl.methods.lordba.layout import seeded_state, with_rank

    cfg = LoRDBAConfig(rank=8, alpha=16.0, scales=scales, seed=11)
    model = tiny_llama()
    attach_lordba_(model, cfg)
    spec = AdapterSpec.from_model(model)
    assert seeded_state(spec, cfg).equals(read_state(model, spec, version=0))  # bit for bit, no model needed
    with pytest.raises(ValueError, match="seeded scratch config"):
        seeded_state(spec, LoRDBAConfig(rank=8, scales=scales, seed=None))
    # a rank-2 node of a rank-8 run: its version 0 is the leading part of the rank-8 one, not its own draw
    run = parse_run_config({"model": "tiny-llama", "rank": 8, "alpha": 16.0, "scales": ",".join(scales), "seed": 11})
    _, _, top = _adapted_model(run)
    low_cfg = parse_run_config({**{"model": "tiny-llama", "rank": 2, "alpha": 4.0, "scales": ",".join(scales),
                                   "seed": 11}})
    import dataclasses

    _, _, low = _adapted_model(dataclasses.replace(low_cfg, top_rank=8))
    want = truncate_state(top.spec, low.spec, top.initial_state)
    assert low.initial_state.equals(want)
    _, _, own = _adapted_model(low_cfg)  # the node's own rank-2 draw differs
    assert not own.initial_state.equals(want)
    assert with_rank(low.spec, 8) == top.spec


@pytest.mark.real_model
def test_with_tiers_a_first_contact_is_a_delta_against_its_tiers_seeded_version_and_changes_nothing_else(tmp_path):
    from lordba_fl.federation.strategy import read_frame
    from lordba_fl.methods.lordba.codec import FrameKind, read_header

    tiers = {"hetero.tiers": "2:0.5,8:0.5"}
    grid, _, seeded = _run(tmp_path / "a", **tiers)
    _, _, full = _run(tmp_path / "b", **tiers, **{"server.seeded-base": False})
    assert [r["eval_loss"] for r in seeded] == [r["eval_loss"] for r in full]
    first = [read_header(read_frame(q.content)) for q in grid.sent
             if q.metadata.message_type == "train" and int(q.content["config"]["server-round"]) == 1]
    assert len(first) == 4 and all(h.kind == FrameKind.STATE_DELTA and h.base_version == 0 for h in first)
    assert seeded[1]["down_payload_sum"] < full[1]["down_payload_sum"] / 4


def _table(tmp_path, rows):
    path = tmp_path / "mem.jsonl"
    base = {"model": "smollm2-135m", "quant": "q4_1", "seq_len": 128}
    path.write_text("".join(json.dumps({**base, **r}) + "\n" for r in rows))
    return path


MEASURED = [  # (rank, batch, checkpointing, peak MB)
    {"rank": r, "batch_size": b, "gradient_checkpointing": c, "peak_rss_MB": mb}
    for r, b, c, mb in ((16, 1, True, 891), (16, 1, False, 1100), (16, 4, True, 1300), (8, 1, True, 860),
                        (8, 2, True, 880), (8, 2, False, 1010), (4, 1, True, 850), (4, 4, False, 1500))]


def test_memory_budget_picks_the_largest_measured_rank_then_batch_that_fits(tmp_path):
    from lordba_fl.hetero import node_profile

    table = str(_table(tmp_path, MEASURED))
    kw = {"model": "smollm2-135m", "quant": "q4_1", "seq_len": 128}
    prof = lambda budget, **nc: node_profile({"memory-mb": budget, "memory-table": table, **nc}, (), 0, 0, 16, **kw)  # noqa: E731
    assert prof(900) == prof(895)  # rank 16 at batch 1 with checkpointing (891 MB)
    p = prof(900)
    assert (p.rank, p.batch_size, p.gradient_checkpointing, p.peak_rss_mb) == (16, 1, True, 891.0)
    p = prof(889)  # rank 16 no longer fits: rank 8, its largest batch that fits
    assert (p.rank, p.batch_size, p.gradient_checkpointing) == (8, 2, True)
    p = prof(1200)  # rank 16: batch 1 without checkpointing beats it with (same rank and batch, faster)
    assert (p.rank, p.batch_size, p.gradient_checkpointing) == (16, 1, False)
    p = prof(1200, rank=8)  # a declared rank: the budget picks its batch and checkpointing only
    assert (p.rank, p.batch_size, p.gradient_checkpointing) == (8, 2, False)
    assert prof(900, **{"local-steps": 2}).local_steps == 2
    with pytest.raises(ValueError, match=r"fits no measured setting: the smallest, rank 4 batch 1 .* 850 MB"):
        prof(800)
    with pytest.raises(ValueError, match="memory-mb chooses the batch"):
        prof(900, **{"batch-size": 2})
    with pytest.raises(ValueError, match="positive number of MB"):
        prof(-1)
    with pytest.raises(ValueError, match="no measurement for model 'smollm2-135m', quant 'q4_1', model-runtime "
                                         "'transformers', seq-len 64"):
        node_profile({"memory-mb": 900, "memory-table": table}, (), 0, 0, 16, model="smollm2-135m", quant="q4_1",
                     seq_len=64)
    with pytest.raises(ValueError, match="model-runtime 'lean', seq-len 128"):  # rows of another runtime do not count
        node_profile({"memory-mb": 900, "memory-table": table}, (), 0, 0, 16, runtime="lean", **kw)
    with pytest.raises(FileNotFoundError, match="bench_edge --sweep"):
        node_profile({"memory-mb": 900, "memory-table": str(tmp_path / "none.jsonl")}, (), 0, 0, 16, **kw)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"rank": 4}) + "\n")
    with pytest.raises(ValueError, match=r"line 1 lacks \['model'"):
        node_profile({"memory-mb": 900, "memory-table": str(bad)}, (), 0, 0, 16, **kw)
    # without memory-mb: the declared rank (or the tier's), and the node's own steps and batch
    p = node_profile({"rank": 4, "local-steps": 3, "batch-size": 2}, (), 0, 0, 16)
    assert (p.rank, p.local_steps, p.batch_size, p.gradient_checkpointing) == (4, 3, 2, None)
    with pytest.raises(ValueError, match="local-steps must be a positive integer"):
        node_profile({"local-steps": 0}, (), 0, 0, 16)


def test_a_nodes_memory_budget_sets_its_rank_batch_and_checkpointing_in_its_run_config(tmp_path):
    from types import SimpleNamespace

    from lordba_fl.federation.apps import tier_config

    run = parse_run_config({"rank": 16, "alpha": 32.0})
    ctx = SimpleNamespace(node_config={"partition-id": 1, "memory-mb": 889, "memory-table": str(_table(tmp_path, MEASURED)),
                                       "local-steps": 2})
    cfg = tier_config(run, ctx)
    assert (cfg.rank, cfg.alpha, cfg.top_rank) == (8, 16.0, 16)
    assert (cfg.train.batch_size, cfg.train.gradient_checkpointing, cfg.train.steps) == (2, True, 2)
    assert cfg.train.seq_len == run.train.seq_len and run.train.batch_size == DEFAULTS["train.batch-size"]


def test_the_runs_memory_budget_applies_to_every_node_without_its_own(tmp_path):
    from types import SimpleNamespace

    from lordba_fl.federation.apps import tier_config

    table = str(_table(tmp_path, MEASURED))
    run = parse_run_config({"rank": 16, "alpha": 32.0, "client.memory-mb": 889})
    node = lambda **nc: tier_config(run, SimpleNamespace(node_config={"partition-id": 1, "memory-table": table, **nc}))  # noqa: E731
    cfg = node()
    assert (cfg.rank, cfg.train.batch_size, cfg.train.gradient_checkpointing) == (8, 2, True)
    cfg = node(**{"memory-mb": 1200})  # its own budget wins
    assert (cfg.rank, cfg.train.batch_size, cfg.train.gradient_checkpointing) == (16, 1, False)
    cfg = node(**{"batch-size": 3})  # a node that sets its batch itself is not sized by the run's budget
    assert (cfg.rank, cfg.train.batch_size) == (16, 3)
    with pytest.raises(ValueError, match=r"client.memory-mb' must be >= 0 MB"):
        parse_run_config({"client.memory-mb": -5})
