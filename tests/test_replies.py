"""One validation layer for client replies: every metric checked, weights bounded and capped, duplicate
frames refused; hostile replies are rejected with a reason and the round goes on."""

import math

import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict
from localgrid import LocalGrid

from clients.app import make_client_app
from lordba_fl.methods.lordba.aggregation import LatentVote, ServerState
from lordba_fl.federation.strategy import frame_record, read_frame
from lordba_fl.methods.lordba.codec import Update
from lordba_fl.methods.lordba.layout import AdapterState
from lordba_fl.wire.replies import (
    MAX_METRICS,
    MAX_WEIGHT,
    REPLY_METRICS,
    Bound,
    ReplyError,
    cap_weights,
    validate_metrics,
)

HONEST = {"num-examples": 12.0, "held-version": 0.0, "train_loss": 3.5, "partition-id": 1.0}


@pytest.mark.parametrize("key, value, message", [
    ("held-version", math.inf, "finite"),
    ("held-version", 2.0**40, "outside"),
    ("held-version", 1.5, "whole number"),
    ("train_loss", [1.0, 2.0], "must be a number"),
    ("train_loss", math.nan, "finite"),
    ("train_loss", "low", "must be a number"),
    ("train_loss", True, "must be a number"),
    ("rank", math.inf, "finite"),
    ("rank", 0.0, "outside"),
    ("num-examples", 0.0, "outside"),
    ("num-examples", -1.0, "outside"),
    ("num-examples", 1e39, "outside"),
    ("num-examples", 10**400, "finite"),
    ("worker-pid", -3.0, "outside"),
    ("no-such-metric", 1.0, "unknown metric"),
])
def test_each_bad_value_is_refused_naming_the_field(key, value, message):
    with pytest.raises(ReplyError, match=message) as e:
        validate_metrics({**HONEST, key: value})
    assert key in str(e.value)


def test_honest_metrics_pass_as_floats_and_methods_add_their_own_keys():
    assert validate_metrics(HONEST) == HONEST
    assert validate_metrics({**HONEST, "flip_rate": 0.25}, extra={"flip_rate": Bound(0, 1)})["flip_rate"] == 0.25
    with pytest.raises(ReplyError, match="flip_rate"):
        validate_metrics({**HONEST, "flip_rate": 2.0}, extra={"flip_rate": Bound(0, 1)})
    with pytest.raises(ReplyError, match="lacks"):
        validate_metrics({"train_loss": 1.0}, required=("num-examples",))
    with pytest.raises(ReplyError, match=f"at most {MAX_METRICS}"):
        validate_metrics({f"k{i}": 1.0 for i in range(MAX_METRICS + 1)})
    assert MAX_WEIGHT * 1e6 < 2.0**63  # bounded weights times flip counts stay exact-ish and finite in float64


def test_weights_are_capped_at_a_multiple_of_the_median_by_hand():
    assert cap_weights([10.0, 20.0, 1e9], 4.0) == [10.0, 20.0, 80.0]  # median 20
    assert cap_weights([10.0, 20.0, 1e9], 0.0) == [10.0, 20.0, 1e9]
    assert cap_weights([5.0, 7.0], 10.0) == [5.0, 7.0]


def test_a_huge_weight_no_longer_poisons_the_vote():
    n = 64
    state = AdapterState(0, torch.zeros(n, dtype=torch.bool), torch.ones(8))
    server = ServerState.initial(state)
    flips = torch.zeros(n, dtype=torch.bool)
    flips[:5] = True
    ups = [(Update(1, 0, flips, torch.zeros(8)), 1e39), (Update(1, 0, torch.zeros(n, dtype=torch.bool), torch.zeros(8)), 1.0)]
    new = LatentVote()(server, ups)
    assert bool(torch.isfinite(new.latent).all())  # float32 sums overflowed to inf / NaN here
    assert new.state.negative[:5].all() and not new.state.negative[5:].any()


def _hostile(metrics=None, frame_of=None):
    def fault(msg, reply):
        if msg.metadata.message_type != "train":
            return reply
        m = dict(reply.content["metrics"])
        m.update(metrics or {})
        frame = read_frame(reply.content) if frame_of is None else frame_of()
        return Message(RecordDict({"adapter": frame_record(frame), "metrics": MetricRecord(m)}), reply_to=msg)
    return fault


@pytest.mark.real_model
@pytest.mark.parametrize("method", ["lordba", "lora-fedavg"])
def test_hostile_replies_are_rejected_and_the_round_goes_on(tmp_path, method):
    from test_federation import _run

    grid = LocalGrid(make_client_app(), 4, {})
    first_frame = lambda: read_frame(grid.replies[-1].content)  # noqa: E731 - replays the previous node's frame
    grid.faults = {
        101: _hostile({"held-version": math.inf, "train_loss": [1.0, 2.0]}),
        102: _hostile({"num-examples": -1.0}),
        103: _hostile(frame_of=first_frame),
    }
    # the run must not raise: 101 and 102 are refused by the metric check, 103 as a duplicate of 102's frame
    _, _, rows = _run(tmp_path, grid=grid, method=method)
    for rnd in (1, 2):
        assert rows[rnd]["clients_failed"] == 3 and rows[rnd]["accepted"] == 1
    assert math.isfinite(rows[2]["eval_loss"]) and rows[2]["round"] == 2


@pytest.mark.real_model
def test_a_query_reply_with_an_infinite_partition_is_ignored(tmp_path):
    from test_federation import _run

    def bad_query(msg, reply):
        if msg.metadata.message_type == "query":
            return Message(RecordDict({"metrics": MetricRecord({"partition-id": math.inf})}), reply_to=msg)
        return reply

    grid = LocalGrid(make_client_app(), 4, {}, {101: bad_query})
    _, _, rows = _run(tmp_path, grid=grid, method="lora-fedavg", rounds=1, **{"clients-per-round": 3})
    assert rows[1]["clients_succeeded"] >= 2 and math.isfinite(rows[1]["eval_loss"])


@pytest.mark.real_model
def test_rounds_where_every_client_dies_stop_the_run_with_the_cause_and_resume_continues(tmp_path):
    from test_federation import _run

    from lordba_fl.federation.strategy import RunStalledError

    def dying(msg, reply):  # from round 2 on, what the simulation engine reports for a worker its OOM killer took
        from flwr.app import Error

        if msg.metadata.message_type == "train" and int(msg.content["config"]["server-round"]) >= 2:
            return Message(Error(code=0, reason="Task was killed due to the node running low on memory"), reply_to=msg)
        return reply

    grid = LocalGrid(make_client_app(), 4, {}, {n: dying for n in range(100, 104)})
    with pytest.raises(RunStalledError, match="out of memory") as e:
        _run(tmp_path, grid=grid, method="lora-fedavg", rounds=4)
    assert "round 2: 0 aggregated, round 3: 0 aggregated" in str(e.value) and "resume=true" in str(e.value)
    # a healthy federation resumes from the last good round (1) and finishes
    _, _, rows = _run(tmp_path, method="lora-fedavg", rounds=4, resume=True)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4] and rows[4]["clients_succeeded"] == 4


def test_a_guard_that_can_never_pass_is_refused():
    from lordba_fl.runconfig import parse_run_config

    with pytest.raises(ValueError, match="faults.min-clients"):
        parse_run_config({"clients-per-round": 2, "faults.min-clients": 3})


def test_a_run_name_cannot_leave_out_dir():
    from lordba_fl.runconfig import parse_run_config

    for name in ("../x", "a/b", "..", "."):
        with pytest.raises(ValueError, match="one folder name"):
            parse_run_config({"name": name})


@pytest.mark.real_model
def test_a_new_run_clears_old_checkpoints_and_a_resume_with_other_shapes_is_refused(tmp_path):
    from test_federation import _run

    _, run_dir, _ = _run(tmp_path, method="lora-fedavg", rounds=2)
    assert (run_dir / "latest.json").is_file()
    with pytest.raises(ValueError, match="another rank"):  # rank 8 cannot resume a rank-4 checkpoint
        _run(tmp_path, method="lora-fedavg", rounds=3, resume=True, rank=8, alpha=16.0)
    _, _, rows = _run(tmp_path, method="lora-fedavg", rounds=1)  # resume=false: starts afresh, old ckpts gone
    assert [r["round"] for r in rows] == [0, 1] and sorted(p.name for p in run_dir.glob("ckpt-*")) == [
        "ckpt-0.json", "ckpt-0.safetensors", "ckpt-1.json", "ckpt-1.safetensors"]


@pytest.mark.real_model
# one method per frame family (LoRDBA; LoRA quantized with versioned deltas; FLoRA stacks; Fed-SB's
# basis; FedKSeed's seed pairs); simulations/bench_chaos.py sends 10,400 a method
@pytest.mark.parametrize("method", ["lordba", "lora-q2-both", "lora-flora", "fed-sb", "fedkseed"])
def test_hundreds_of_hostile_replies_of_every_kind_never_crash_the_server(method):
    from lordba_fl.federation.faults import HOSTILE_KINDS
    from simulations.bench_chaos import stress

    rec = stress(method, hostile=2 * len(HOSTILE_KINDS) * 6, per_round=len(HOSTILE_KINDS) * 6)
    assert rec["server_exceptions"] == 0 and rec["hostile_accepted"] == 0 and rec["state_finite"]
    assert rec["honest_accepted"] == rec["honest_sent"] and rec["version"] == rec["rounds"]  # every round learned
    assert sum(rec["refused"].values()) == rec["hostile_sent"]
    for reason in ("metric 'held-version' must be finite", "unknown metric 'evil'", "the reply carries N metrics",
                   "duplicate frame", "message has no 'adapter/frame' frame"):
        assert rec["refused"].get(reason, 0) > 0, rec["refused"]


def test_fuzzed_metric_records_only_ever_give_checked_floats_or_a_reply_error():
    import random

    rng = random.Random(0)
    keys = [*REPLY_METRICS, "evil", "", "x" * 300]
    values = [0, 1, -1, 7.5, 2**40, 2**63, 10**400, math.inf, -math.inf, math.nan, True, None, "3", b"3", [1.0],
              [1, 2], {"a": 1}, 1e-300, -0.0, 2.0**32 - 1]
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(3000):
        record = {rng.choice(keys): rng.choice(values) for _ in range(rng.randint(0, 6))}
        try:
            out = validate_metrics(record)
        except ReplyError:
            outcomes["refused"] += 1
            continue
        assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
        outcomes["ok"] += 1
    assert outcomes["ok"] > 0 and outcomes["refused"] > 0


def test_a_stall_from_dead_workers_says_so_and_reasons_count_by_kind():
    from lordba_fl.federation.strategy import reason_class, stalled_message

    ray = "<class 'ray.exceptions.ActorDiedError'>:<'The actor died unexpectedly before finishing this task.'>"
    msg = stalled_message([(3, 0, [ray, ray]), (4, 0, [ray])], 1)
    assert "round 3: 0 aggregated, round 4: 0 aggregated" in msg and "3 x <class 'ray.exceptions.ActorDiedError'>" in msg
    assert "workers died" in msg and "resume=true" in msg
    assert reason_class(ray) == "ActorDiedError"
    assert reason_class("malformed reply: metric 'rank' = 0.0 is outside [1, 65536]") == "metric 'rank' = N is outside"
    assert reason_class("ChecksumError: LoRDBA frame CRC-32 is 0x1") == "ChecksumError"
