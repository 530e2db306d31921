"""Federated runs of every method under the one harness, in process (real ClientApp, strategy and
Messages; see localgrid.py) and on Flower's simulation engine."""

import json
import math
from pathlib import Path

import pytest
import torch
from localgrid import LocalGrid
from safetensors.torch import load_file

from clients.app import make_client_app
from lordba_fl.methods.lordba.aggregation import LatentVote, ServerState, collect_updates
from lordba_fl.federation.apps import run_server
from lordba_fl.federation.strategy import read_frame
from lordba_fl.methods import make_method
from lordba_fl.methods.lordba.codec import CodecOptions
from lordba_fl.methods.lordba.layout import AdapterSpec, AdapterState
from lordba_fl.wire.metering import payload_bytes, wire_bytes

pytestmark = pytest.mark.real_model  # the tiny model uses the embedded tokenizer

BASE = {
    "model": "tiny-llama", "task": "shakespeare", "data.shakespeare.max-clients": 4, "rounds": 2, "clients-per-round": 4,
    "rank": 4, "alpha": 8.0, "train.local-steps": 2, "train.batch-size": 2, "train.seq-len": 48,
    "eval.examples": 6, "eval.generate": 0, "flip.m0": 0.001, "flip.latent-lr": 0.05, "flip.budget": 0.05,
    "server.aggregator": "vote",
}


def _run(tmp_path: Path, faults=None, grid=None, **overrides) -> tuple[LocalGrid, Path, list[dict]]:
    from lordba_fl.runconfig import DEFAULTS, builtin_method_keys, method_keys

    cfg = dict(DEFAULTS)
    cfg.update(BASE)
    cfg.update({"out-dir": str(tmp_path)})
    cfg.update(overrides)
    # BASE's LoRDBA keys (flip.*, server.aggregator) back at their defaults for another method, which does not take them
    other = {k: d for k, (_, d, _) in builtin_method_keys().items() if k not in method_keys(cfg["method"])}
    cfg.update({k: d for k, d in other.items() if k in cfg})
    grid = grid or LocalGrid(make_client_app(), 4, cfg, faults)
    for ctx in grid.contexts.values():
        ctx.run_config.update(cfg)
    run_server(grid, cfg)
    name = cfg["method"] + ("-" + cfg["server.aggregator"] if cfg["method"] == "lordba" else "")
    run_dir = tmp_path / name
    rows = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    return grid, run_dir, rows


@pytest.mark.parametrize(
    "method, extra",
    [("lordba", {}), ("lordba", {"server.aggregator": "refit"}), ("lora-fedavg", {}), ("ffa-lora", {}),
     ("lora-q2", {}), ("lora-q4", {})],
)
def test_every_method_logs_exact_bytes(tmp_path, method, extra):
    grid, run_dir, rows = _run(tmp_path, method=method, **extra)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for rnd in (1, 2):
        row = rows[rnd]
        down, up = zip(*_pairs(grid, "train", rnd))
        assert len(up) == len(down) == 4 and row["clients_succeeded"] == 4
        # logged payload = the encoded frames; logged wire = Flower's own serialization of those messages
        assert row["up_payload_sum"] == sum(len(read_frame(m.content)) for m in up) == sum(payload_bytes(m) for m in up)
        assert row["up_wire_sum"] == sum(wire_bytes(m) for m in up)
        assert row["down_payload_sum"] == sum(len(read_frame(m.content)) for m in down)
        assert row["down_wire_sum"] == sum(wire_bytes(m) for m in down)
        assert row["up_wire_max"] == max(wire_bytes(m) for m in up)
        # per sampled client, every message of the round: training and client-side evaluation, both ways
        every = [(q, a) for q, a in zip(grid.sent, grid.replies) if int(q.content["config"]["server-round"]) == rnd]
        assert row["down_wire_per_client"] == sum(wire_bytes(q) for q, _ in every) / 4
        assert row["up_wire_per_client"] == sum(wire_bytes(a) for _, a in every) / 4
    assert rows[2]["total_up_wire"] == sum(wire_bytes(m) for m in grid.replies)  # train and evaluate replies
    assert rows[-1]["eval_loss"] > 0 and (run_dir / "rounds.csv").is_file() and (tmp_path / "bytes.png").is_file()
    assert (run_dir / "peft_lora" / "adapter_config.json").is_file()


def _pairs(grid, kind: str, rnd: int):
    """(request, reply) of one phase and round; LocalGrid answers in the order it sends."""
    return [(q, a) for q, a in zip(grid.sent, grid.replies)
            if q.metadata.message_type == kind and int(q.content["config"]["server-round"]) == rnd]


def _state(run_dir: Path, rnd: int) -> ServerState:
    t = load_file(str(run_dir / f"ckpt-{rnd}.safetensors"))
    meta = json.loads((run_dir / f"ckpt-{rnd}.json").read_text())["method_state"]
    return ServerState(AdapterState(meta["version"], t["negative"], t["scales"]), t["latent"])


def test_global_state_changes_as_the_votes_dictate(tmp_path):
    grid, run_dir, rows = _run(tmp_path, method="lordba", **{"server.beta": 0.5, "server.tau": 0.1, "server.eta": 0.5})
    before, after = _state(run_dir, 1), _state(run_dir, 2)
    from lordba_fl.federation.apps import _worker
    from lordba_fl.runconfig import parse_run_config

    spec = AdapterSpec.from_model(_worker(parse_run_config(grid.contexts[100].run_config))[0])
    replies = [a for _, a in _pairs(grid, "train", 2)]
    frames = [(read_frame(m.content), float(m.content["metrics"]["num-examples"])) for m in replies]
    accepted, rejected = collect_updates(frames, spec, CodecOptions(scale_encoding="q8"), version=before.state.version)
    assert not rejected and len(accepted) == 4
    expected = LatentVote(beta=0.5, tau=0.1, eta=0.5)(before, accepted)
    assert expected.equals(after)
    assert rows[1]["client_flip_rate"] > 0  # signs did move, within round 1's (scheduled) budget
    budget = make_method(parse_run_config(grid.contexts[100].run_config)).cfg.flip.budget_at(1)
    assert budget == 0.08 and rows[1]["client_flip_rate"] <= budget + 1e-9


def test_faulty_clients_do_not_stop_the_round(tmp_path):
    grid, run_dir, rows = _run(tmp_path, faults={101: "raise", 102: "garbage"}, method="lordba")
    for rnd in (1, 2):
        assert rows[rnd]["clients_failed"] == 1 and rows[rnd]["rejected"] == 1 and rows[rnd]["accepted"] == 2
    assert math.isfinite(rows[2]["eval_loss"])  # the run finished
    assert _state(run_dir, 2).state.version == 2


@pytest.mark.parametrize("seeded", [False, True])
def test_a_node_that_goes_silent_catches_up_with_the_full_state(tmp_path, seeded):
    """Node 101 trains in round 2 and keeps the broadcast, but its reply is lost: the round goes on
    with the others, and since the server cannot know what 101 now holds, the next message to it
    carries the full state (with server.seeded-base: a delta against the seeded version 0, which
    every node can rebuild whatever it holds)."""
    from lordba_fl.methods.lordba.codec import FrameKind, read_header

    grid, run_dir, rows = _run(tmp_path, faults={101: "vanish@2"}, method="lordba", **{"server.seeded-base": seeded})
    assert rows[1]["clients_silent"] == 0 and rows[1]["accepted"] == 4
    assert rows[2]["clients_silent"] == 1 and rows[2]["accepted"] == 3 and rows[2]["clients_succeeded"] == 3
    kinds = {(int(m.content["config"]["server-round"]), m.metadata.message_type, m.metadata.dst_node_id):
             read_header(read_frame(m.content)).kind for m in grid.sent if m.metadata.message_type != "query"}
    assert kinds[(2, "train", 101)] == kinds[(2, "train", 100)] == FrameKind.STATE_DELTA
    caught_up = read_header(read_frame(next(m.content for m in grid.sent if m.metadata.dst_node_id == 101 and
                                            m.metadata.message_type == "evaluate" and
                                            int(m.content["config"]["server-round"]) == 2)))
    if seeded:
        assert caught_up.kind == FrameKind.STATE_DELTA and caught_up.base_version == 0  # caught up ...
    else:
        assert caught_up.kind == FrameKind.STATE_FULL  # caught up ...
    assert kinds[(2, "evaluate", 100)] == FrameKind.STATE_DELTA
    assert rows[2]["clients_eval_failed"] == 0  # ... and evaluated: nothing failed to decode
    assert _state(run_dir, 2).state.version == 2


@pytest.mark.parametrize("method", ["lordba", "lora-q4"])
def test_resume_reaches_the_same_state(tmp_path, method):
    _, full_dir, full_rows = _run(tmp_path / "full", method=method)
    grid, part_dir, _ = _run(tmp_path / "part", method=method, rounds=1)
    # the server restarts from its checkpoint; the clients (and their context.state) live on
    _, part_dir, part_rows = _run(tmp_path / "part", grid=grid, method=method, rounds=2, resume=True)
    a, b = load_file(str(full_dir / "ckpt-2.safetensors")), load_file(str(part_dir / "ckpt-2.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # wall time and the worker-process counters (this process served both runs) are not run state
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("wall_s", "workers")} for r in rows]  # noqa: E731
    assert strip(full_rows) == strip(part_rows)


def test_gsm_reports_accuracy_and_answers(tmp_path):
    grid, run_dir, rows = _run(
        tmp_path, method="lordba", task="gsm",
        **{"data.gsm.num-clients": 4, "data.gsm.per-template": 2, "eval.generate": 1, "train.seq-len": 256}
    )
    final = rows[-1]
    assert final["accuracy_unseen"] in (0.0, 1.0) and final["accuracy_seen"] in (0.0, 1.0)
    assert final["eval_loss"] > 0 and "seen_eval_loss" in final


@pytest.fixture(scope="module")
def stateless_rows(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("stateless"), method="lordba")[2]


@pytest.mark.parametrize("kind, dtype", [("latent", "q8"), ("latent", "fp32"), ("latent+optimizer", "fp16")])
def test_stateful_clients_keep_compact_state(tmp_path, stateless_rows, kind, dtype):
    from lordba_fl.runconfig import DEFAULTS, parse_run_config
    from lordba_fl.methods.lordba.clientstate import encoded_size, unpack_floats
    from lordba_fl.wire.metering import recorddict_bytes

    grid, run_dir, rows = _run(tmp_path, method="lordba", **{"client.state": kind, "client.state-dtype": dtype})
    ckpt = load_file(str(run_dir / "ckpt-2.safetensors"))
    n_bits, n_scales = ckpt["negative"].numel(), ckpt["scales"].numel()
    n_params = 2 * 7 * 2  # tiny-llama: 2 layers x 7 targets, latents A and B ...
    n_params += 2 * 7 * len(make_method(parse_run_config(dict(DEFAULTS))).cfg.scales)  # ... and its scales (default: mid, out)
    state = grid.contexts[100].state
    assert ("lordba.optimizer" in state) == (kind == "latent+optimizer")
    rec = state["lordba.latent"]
    assert rec["dtype"] == dtype and len(rec["magnitude"]) == encoded_size(n_bits, dtype)
    mags = unpack_floats(rec["magnitude"], n_bits, dtype)
    # trained magnitudes moved away from the broadcast magnitude m0 = 0.001 and are carried to the next round
    assert float(mags.min()) >= 0 and float((mags - 0.001).abs().max()) > 1e-3
    kept = encoded_size(n_bits, dtype)
    if kind == "latent+optimizer":
        opt = state["lordba.optimizer"]
        assert len(opt["steps"]) == 4 * n_params  # one int32 step count per trained tensor
        assert len(opt["exp-avg"]) == len(opt["exp-avg-sq-root"]) == encoded_size(n_bits + n_scales, dtype)
        kept += 2 * encoded_size(n_bits + n_scales, dtype) + 4 * n_params
    assert recorddict_bytes({k: v for k, v in state.items() if k != "lordba.held"}) == kept
    # round 1 trains identically with or without state, so in round 2 both runs hold the same global
    # frame: the reported state bytes differ by exactly what this node keeps
    assert rows[2]["client_state_bytes_max"] - stateless_rows[2]["client_state_bytes_max"] == kept
    assert rows[2]["clients_succeeded"] == 4


def test_each_worker_loads_the_base_once_across_rounds(tmp_path):
    _, _, rows = _run(tmp_path, method="lordba")
    w1, w2 = rows[1]["workers"], rows[2]["workers"]
    assert w1.keys() == w2.keys() and len(w1) == 1  # in process: one worker
    (pid,) = w1
    assert w2[pid]["base_loads"] == w1[pid]["base_loads"]  # no reload between rounds
    # 4 train + 4 evaluate client calls per round, all served by the one shared base
    assert w2[pid]["clients_served"] - w1[pid]["clients_served"] == 8


@pytest.mark.parametrize(
    "attack, enforce, rejected",
    [("flip-all", True, [1, 1]), ("flip-all", False, [0, 0]), ("invert-flips", True, [1, 1]), ("replay", True, [0, 1])],
)
def test_byzantine_clients_are_caught_by_the_defences(tmp_path, attack, enforce, rejected):
    from lordba_fl.federation.faults import byzantine_partitions
    from lordba_fl.runconfig import DEFAULTS, parse_run_config

    over = {"faults.byzantine-fraction": 0.25, "faults.attack": attack, "server.enforce-budget": enforce}
    cfg = parse_run_config({**DEFAULTS, **BASE, **over})
    assert len(byzantine_partitions(cfg, 4)) == 1  # one of the four clients attacks every round
    _, run_dir, rows = _run(tmp_path, method="lordba", **over)
    # flipping everything (or all but a few) breaks the flip budget; a replayed update was built on
    # version 0 and is stale from round 2 on
    assert [rows[r]["rejected"] for r in (1, 2)] == rejected
    assert [rows[r]["accepted"] for r in (1, 2)] == [4 - x for x in rejected]
    assert _state(run_dir, 2).state.version == 2


def test_exploding_scales_are_bounded_by_the_robust_options(tmp_path):
    over = {"faults.byzantine-fraction": 0.25, "faults.attack": "explode-scales", "server.norm-bound": 0.0}
    clean = _state(_run(tmp_path / "clean", method="lordba", **{"server.norm-bound": 0.0})[1], 2).state.scales
    plain = _state(_run(tmp_path / "plain", method="lordba", **over)[1], 2).state.scales
    robust = _state(_run(tmp_path / "robust", method="lordba", **over, **{"server.scale-rule": "median"})[1], 2).state.scales
    bounded = _state(_run(tmp_path / "bound", method="lordba", **{**over, "server.norm-bound": 2.0})[1], 2).state.scales
    default = _state(_run(tmp_path / "default", method="lordba", **{**over, "server.norm-bound": 2.0,
                                                                    "faults.byzantine-fraction": 0.0})[1], 2).state.scales
    assert torch.equal(default, clean)  # the default bound (2x the median norm) never touches honest clients
    err = lambda s: float((s - clean).abs().max())  # noqa: E731
    assert err(plain) > 10 * err(robust) and err(plain) > 10 * err(bounded)


def test_injected_failures_and_corruption_match_the_seeded_draws(tmp_path):
    import random

    over = {"faults.fail-prob": 0.3, "faults.corrupt-prob": 0.3}
    _, run_dir, rows = _run(tmp_path, method="lordba", **over)
    for rnd in (1, 2):
        draws = [random.Random(f"faults/0/{rnd}/{pid}") for pid in range(4)]
        fails = [d.random() < 0.3 for d in draws]
        for d in draws:
            d.random()  # the slow-prob draw
        corrupt = [not f and d.random() < 0.3 for d, f in zip(draws, fails)]
        assert rows[rnd]["clients_failed"] == sum(fails)
        assert rows[rnd]["rejected"] == sum(corrupt) and rows[rnd]["accepted"] == 4 - sum(fails) - sum(corrupt)
    assert [r["round"] for r in rows] == [0, 1, 2]


def test_an_aggregate_no_client_could_receive_is_refused(tmp_path):
    """Exploding deltas with every defence off would push scales past fp16: the server keeps its state.
    (The first design's refit, a fresh SVD whose s_mid takes the singular values, overflows here; the
    faithful refit starts from the averaged scales and stays within fp16 on this attack.)"""
    over = {"faults.byzantine-fraction": 0.25, "faults.attack": "explode-scales", "server.aggregator": "refit",
            "server.refit": "svd", "scales": "in,mid,out",
            "server.enforce-budget": False, "server.norm-bound": 0.0, "rounds": 4}
    _, run_dir, rows = _run(tmp_path, method="lordba", **over)
    refused = [r["round"] for r in rows[1:] if r.get("aggregate_refused")]
    assert refused and [r["round"] for r in rows] == [0, 1, 2, 3, 4]  # the run went on
    assert _state(run_dir, 4).state.version == 4 - len(refused)
    assert float(_state(run_dir, 4).state.scales.abs().max()) <= 65504


def test_local_dp_run_reports_the_accounted_budget_and_sends_no_training_metrics(tmp_path):
    from lordba_fl.methods.lordba import privacy
    from lordba_fl.methods import make_method
    from lordba_fl.runconfig import DEFAULTS, parse_run_config

    over = {"dp.mode": "local", "dp.clip": 0.01, "dp.flip-epsilon": 0.05, "dp.target-epsilon": 50.0,
            "clients-per-round": 2, "rounds": 3}
    grid, run_dir, rows = _run(tmp_path, method="lordba", **over)
    cfg = parse_run_config({**DEFAULTS, **BASE, **over})
    n_bits = AdapterSpec.from_model(_tiny_adapted(cfg)).n_bits
    bits = privacy.differing_bits(n_bits, make_method(cfg).cfg.flip.flip_budget)
    z = privacy.calibrate(50.0, 0.05, bits, 3, 1e-5)
    counts: dict[int, int] = {}
    for rnd in (1, 2, 3):
        for q, a in _pairs(grid, "train", rnd):
            counts[q.metadata.dst_node_id] = counts.get(q.metadata.dst_node_id, 0) + 1
            m = dict(a.content["metrics"])
            assert "train_loss" not in m and "flip_rate" not in m and m["num-examples"] == 1.0
        row = rows[rnd]
        assert row["dp_noise_multiplier"] == pytest.approx(z)
        assert row["dp_epsilon"] == pytest.approx(privacy.epsilon(z, 0.05, bits, max(counts.values()), 1e-5))
        assert row["rejected"] == 0  # honest randomized-response masks pass the widened budget check
    assert rows[3]["dp_epsilon"] <= 50.0 and rows[1]["dp_epsilon"] < rows[3]["dp_epsilon"]
    for q, a in _pairs(grid, "evaluate", 3):
        assert "eval_loss" not in dict(a.content["metrics"])  # client evaluation is data as well


def _tiny_adapted(cfg):
    from lordba_fl.federation.apps import _adapted_model

    return _adapted_model(cfg)[0]


@pytest.mark.parametrize("attack", ["invert-flips", "explode-scales"])
def test_lora_byzantine_uplinks_are_the_attacked_honest_ones(tmp_path, attack):
    """Same seed clean and attacked: the attacker's round-1 uplink is its honest one transformed,
    every other client's is byte-identical."""
    import numpy as np

    from lordba_fl.federation.faults import byzantine_partitions
    from lordba_fl.methods.lora import LORA_CONTAINER
    from lordba_fl.runconfig import DEFAULTS, parse_run_config

    over = {"faults.byzantine-fraction": 0.25, "faults.attack": attack, "rounds": 1}
    clean, _, _ = _run(tmp_path / "clean", method="lora-fedavg", rounds=1)
    grid, _, rows = _run(tmp_path / "attacked", method="lora-fedavg", **over)
    byz = byzantine_partitions(parse_run_config({**DEFAULTS, **BASE, **over}), 4)
    values = lambda frame: np.frombuffer(frame[LORA_CONTAINER.header_bytes:], np.float16).astype(np.float32)  # noqa: E731
    for (q, a), (_, honest) in zip(_pairs(grid, "train", 1), _pairs(clean, "train", 1)):
        assert dict(a.content["metrics"])["partition-id"] == dict(honest.content["metrics"])["partition-id"]
        up, ok = read_frame(a.content), read_frame(honest.content)
        if int(dict(a.content["metrics"])["partition-id"]) not in byz:
            assert up == ok
            continue
        start, u = values(read_frame(q.content)), values(ok) - values(read_frame(q.content))
        want = -u if attack == "invert-flips" else 1e4 * u
        np.testing.assert_allclose(values(up) - start, want, atol=1e-3, rtol=2e-3)  # fp16 rounding
    assert rows[1]["accepted"] == 4  # plain FedAvg takes it


def test_sampling_follows_partitions_not_node_ids(tmp_path):
    """The simulation engine draws new random node ids every run: the same seed must still sample the
    same partitions. Two grids whose node ids are in opposite orders sample identical partitions."""
    from lordba_fl.runconfig import DEFAULTS

    cfg = {**DEFAULTS, **BASE, "out-dir": str(tmp_path), "clients-per-round": 2, "rounds": 2, "eval.client-side": False}
    sampled = []
    for flip in (False, True):
        grid = LocalGrid(make_client_app(), 4, cfg)
        if flip:  # node 100 + i holds partition 3 - i
            for ctx in grid.contexts.values():
                ctx.node_config["partition-id"] = 3 - (ctx.node_id - 100)
        run_server(grid, {**cfg, "out-dir": str(tmp_path / str(flip))})
        queries = [m for m in grid.sent if m.metadata.message_type == "query"]
        assert len(queries) == 4  # every node asked once, not every round
        sampled.append([[int(dict(a.content["metrics"])["partition-id"]) for _, a in _pairs(grid, "train", r)]
                        for r in (1, 2)])
    assert [sorted(x) for x in sampled[0]] == [sorted(x) for x in sampled[1]]


def test_client_side_evaluation_can_be_switched_off(tmp_path):
    grid, _, rows = _run(tmp_path, method="lordba", rounds=1, **{"eval.client-side": False})
    assert not _pairs(grid, "evaluate", 1) and len(_pairs(grid, "train", 1)) == 4
    assert "client_eval_loss" not in rows[1] and "eval_loss" in rows[1]  # the server still evaluates


def test_init_from_a_packed_adapter_starts_where_that_run_ended_and_a_mismatch_is_refused(tmp_path):
    from lordba_fl.adapter.storage import LoRDBAFileError

    _, first_dir, first = _run(tmp_path / "a", rounds=1)
    packed = first_dir / "adapter.lordba.safetensors"
    _, _, second = _run(tmp_path / "b", rounds=1, **{"init.from": str(packed)})
    assert second[0]["eval_loss"] == first[-1]["eval_loss"]  # round 0 of the new run is the old run's end
    # another rank: refused before any message is sent
    grid = LocalGrid(make_client_app(), 4, dict(BASE))
    with pytest.raises(LoRDBAFileError, match="rank=4"):
        _run(tmp_path / "c", grid=grid, rank=8, alpha=16.0, **{"init.from": str(packed)})
    assert grid.sent == []
    with pytest.raises(FileNotFoundError, match="PEFT LoRA directory"):
        _run(tmp_path / "d", **{"init.from": str(tmp_path / "nope")})


def test_init_from_a_peft_lora_directory_equals_the_svd_import(tmp_path):
    from lordba_fl import LoRDBAConfig, attach_lordba_, lordba_layers
    from lordba_fl.adapter.storage import (
        LoRDBAFileError,
        init_from_,
        lordba_from_peft_lora,
    )
    from lordba_fl.base.models import load_model

    def tiny_llama():
        return load_model("tiny-llama", quant="q4_1")[0]

    _, run_dir, _ = _run(tmp_path, rounds=1)
    peft_dir = run_dir / "peft_lora"
    ref = tiny_llama()
    ref_err = lordba_from_peft_lora(ref, peft_dir, LoRDBAConfig(rank=4, alpha=8.0))
    model = tiny_llama()
    attach_lordba_(model, LoRDBAConfig(rank=4, alpha=8.0, seed=3))
    err = init_from_(model, peft_dir)
    assert err.keys() == ref_err.keys() and all(err[k] == pytest.approx(ref_err[k], rel=1e-9) for k in err)
    for (n, a), (_, b) in zip(lordba_layers(model).items(), lordba_layers(ref).items()):
        assert torch.equal(a.lordba_latent_A > 0, b.lordba_latent_A > 0) and torch.equal(a.lordba_latent_B > 0, b.lordba_latent_B > 0), n
        for kind in ("in", "mid", "out"):  # fp32 values of the same float64 fit (BLAS may differ in the last bit)
            torch.testing.assert_close(a.scale(kind), b.scale(kind))
    narrow = tiny_llama()
    attach_lordba_(narrow, LoRDBAConfig(rank=4, target_modules=("q_proj",)))
    with pytest.raises(LoRDBAFileError, match="other modules"):
        init_from_(narrow, peft_dir)


def test_warmup_rounds_fit_float_factors_on_the_device_within_the_flip_budget(tmp_path):
    """Round 1 trains float factors and fits them to signs on the device (a device fit error is
    reported, flips stay within each layer's budget and are accepted by the server's exact check);
    round 2 is a normal STE round. The server's refit may follow the warm-up's signs past
    server.flip-budget (up to init.warmup-budget), and is held to it again afterwards."""
    grid, run_dir, rows = _run(tmp_path, **{"init.warmup-rounds": 1, "init.warmup-budget": 0.02,
                                            "server.aggregator": "refit", "server.flip-budget": 0.001,
                                            "server.flip-budget-start": 0.0})
    warm, ste = rows[1], rows[2]
    # the warm-up's broadcast is in a fresh adapter's gauge: every s_mid at the normalized init's rms
    from safetensors.torch import load_file

    from lordba_fl.federation.apps import _worker
    from lordba_fl.runconfig import parse_run_config
    from lordba_fl.methods.lordba.layout import AdapterSpec, split_scales

    spec = AdapterSpec.from_model(_worker(parse_run_config(grid.contexts[100].run_config))[0])
    scales = split_scales(spec, load_file(str(run_dir / "ckpt-1.safetensors"))["scales"])
    for layer in spec.layers:  # scales "mid,out": s_mid starts at 1/sqrt(in * r)
        rms = float(scales[layer.name]["mid"].double().square().mean().sqrt())
        assert rms == pytest.approx((layer.in_features * layer.rank) ** -0.5, rel=1e-5)
    assert 0.001 < warm["global_flip_rate"] <= 0.02 and ste["global_flip_rate"] <= 0.001
    assert warm["clients_succeeded"] == 4 and warm["rejected"] == 0
    assert 0 < warm["device_fit_error"] < 1 and "device_fit_error" not in ste
    assert 0 < warm["client_flip_rate"] <= 0.02
    assert warm["eval_loss"] != rows[0]["eval_loss"]


def test_first_contact_is_a_delta_against_the_seeded_version_and_changes_nothing_else(tmp_path):
    """server.seeded-base: a node's first downlink is a delta against version 0, which it builds from
    the seed itself; the run is exactly the run that sends full states, for fewer bytes."""
    from lordba_fl.methods.lordba.codec import FrameKind, read_header

    grid, _, seeded = _run(tmp_path / "a", **{"server.aggregator": "refit"})
    _, _, full = _run(tmp_path / "b", **{"server.aggregator": "refit", "server.seeded-base": False})
    assert [r["eval_loss"] for r in seeded] == [r["eval_loss"] for r in full]
    assert [r["up_payload_sum"] for r in seeded] == [r["up_payload_sum"] for r in full]
    first = [read_header(read_frame(q.content)) for q, _ in _pairs(grid, "train", 1)]
    assert all(h.kind == FrameKind.STATE_DELTA and h.base_version == 0 for h in first)
    assert seeded[1]["down_payload_sum"] < full[1]["down_payload_sum"] / 4


def test_halving_budget_by_hand():
    from lordba_fl.methods.lordba.budgets import halving_budget
    from lordba_fl.methods.lordba.budgets import FlipControl

    assert [halving_budget(0.005, 0.04, t) for t in (1, 2, 3, 4, 5)] == [0.04, 0.02, 0.01, 0.005, 0.005]
    assert [halving_budget(0.02, 0.0, t) for t in (1, 2)] == [0.02, 0.02]  # no schedule
    assert FlipControl(flip_budget=0.02, budget_start=0.1).budget_at(3) == 0.025
    with pytest.raises(ValueError, match="flip.budget-start must be a fraction"):
        FlipControl(budget_start=2.0)
    from lordba_fl.methods import make_method
    from lordba_fl.runconfig import parse_run_config

    dp = make_method(parse_run_config({"dp.mode": "local", "server.aggregator": "vote", "flip.budget": 0.02})).cfg
    # one budget: the noise is calibrated to it
    assert dp.flip.budget_start == 0.0 and dp.server_flip_budget_start == 0.0 and dp.flip.budget_at(1) == dp.flip.flip_budget
    with pytest.raises(ValueError, match=r"set flip.budget > 0"):  # the default budget halves to none
        make_method(parse_run_config({"dp.mode": "local", "server.aggregator": "vote"}))


def test_scheduled_budgets_let_early_rounds_flip_more_and_honest_clients_spend_them(tmp_path):
    """flip.budget-start / server.flip-budget-start: round 1 may flip up to the start budgets, round 2
    half of them; clients spending their whole scheduled budget are accepted (the server checks the
    same round's budget, in exact integer counts)."""
    over = {"server.aggregator": "refit", "flip.m0": 0.001, "flip.latent-lr": 0.05, "flip.budget": 0.01,
            "flip.budget-start": 0.08, "server.flip-budget": 0.001, "server.flip-budget-start": 0.04}
    _, _, rows = _run(tmp_path, **over)
    r1, r2 = rows[1], rows[2]
    assert r1["rejected"] == r2["rejected"] == 0 and r1["accepted"] == 4
    assert 0.01 < r1["client_flip_rate"] <= 0.08 and r2["client_flip_rate"] <= 0.04
    assert 0.001 < r1["global_flip_rate"] <= 0.04 and r2["global_flip_rate"] <= 0.02
