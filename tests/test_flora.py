"""FLoRA (``lora-flora``): replies of any rank stacked into their exact weighted-mean product, merged
into the global model; nodes download the stacks since the version they hold and rebuild the server's
model bit for bit; bad stacks and wrong-rank replies are refused."""

import dataclasses
import struct

import numpy as np
import pytest
import torch

from lordba_fl.errors import ChecksumError, MalformedFrameError, NonFiniteError
from lordba_fl.federation.apps import _adapted_model
from lordba_fl.methods import Reply
from lordba_fl.methods.lora import FP16, encode_lora
from lordba_fl.methods.lora.flora import (
    _STACK,
    Group,
    StaleBaseError,
    decode_stack,
    encode_stack,
)
from lordba_fl.runconfig import parse_run_config

RUN = {"model": "tiny-llama", "rank": 8, "alpha": 16.0, "method": "lora-flora", "hetero.tiers": "2:0.3,4:0.3,8:0.4"}


def _server():
    model, _, method = _adapted_model(parse_run_config(RUN))
    method.init_server(model)
    return model, method


def _node(rank: int):
    """A rank-``rank`` node of the rank-8 run (its tier's config, like ``tier_config``)."""
    cfg = parse_run_config({**RUN, "rank": rank, "alpha": 2.0 * rank, "hetero.tiers": ""})
    model, _, method = _adapted_model(dataclasses.replace(cfg, top_rank=8))
    return model, method


def _reply(method, node: int, rank: int, seed: int):
    """A rank-``rank`` reply of random fp16 factors (B nonzero, as after training)."""
    g = torch.Generator().manual_seed(seed)
    n = method.group_size(rank)
    v = (torch.randn(n, generator=g) * 0.1).half().float()
    frame = encode_lora(FP16, 0, method.version + 1, method.version, v.numpy().astype(np.float16).tobytes(), compress=False)
    return v, Reply(node, frame, float(seed + 1))


def _round(method, ranks: dict[int, int], seed: int):
    for node, rank in ranks.items():
        method.note_rank(node, rank)
    replies = [_reply(method, node, rank, seed + node) for node, rank in ranks.items()]
    metrics, rejected = method.aggregate(method.version + 1, [r for _, r in replies])
    assert metrics["accepted"] == len(ranks) and not rejected
    return [(v, r, ranks[r.node_id]) for v, r in replies]


def _products(method, rounds):
    """Per layer, the hand-computed merged update: sum over rounds of alpha/r * sum_k p_k B_k A_k (float64)."""
    out = []
    for i, _ in enumerate(method.layers_shapes):
        total = 0
        for replies in rounds:
            weight = sum(r.weight for _, r, _ in replies)
            for v, r, rank in replies:
                a, bt = method.split(v.double(), rank)[i]
                total = total + (r.weight / weight) * method.scaling * (bt.t() @ a)
        out.append(total)
    return out


def test_stacking_gives_exactly_the_weighted_mean_of_the_products_whatever_the_ranks():
    _, method = _server()
    first = _round(method, {1: 2, 2: 4, 3: 8}, seed=0)
    second = _round(method, {1: 8, 4: 2}, seed=10)
    assert method.version == 2 and [g.rank for g in method.groups] == [2, 4, 8, 8, 2]
    merged = method.merged()
    assert merged[0][0].shape[0] == 2 + 4 + 8 + 8 + 2  # every stacked component is kept
    for (a, b), want in zip(merged, _products(method, [first, second])):
        torch.testing.assert_close((b.double() @ a.double()), want, rtol=1e-5, atol=1e-7)  # fp32 weights only


def test_a_node_downloads_the_stacks_since_its_version_and_rebuilds_the_servers_model():
    from flwr.app import RecordDict

    server_model, server = _server()
    node_model, node = _node(2)
    state = RecordDict()
    x = torch.randint(0, 1000, (2, 12))
    assert node.client_load_(node_model, server.downlink(7, 1), state) == 0  # nothing stacked yet: empty
    server.note_held(7, 0)
    _round(server, {1: 4, 2: 8}, seed=0)
    full_v1 = server.downlink(99, 2)  # an unknown node gets every stack
    _round(server, {3: 2}, seed=5)
    delta = server.downlink(7, 3)  # node 7 holds version 0 ...
    server.note_held(7, 1)
    assert len(server.downlink(7, 3)) < len(delta)  # ... at version 1 it only needs version 2's stack
    assert decode_stack(server.downlink(7, 3), server.group_size)[:2] == (1, 2)
    with pytest.raises(StaleBaseError, match="holds none"):
        node.client_load_(node_model, server.downlink(7, 3), RecordDict())  # a node that lost its state
    assert node.client_load_(node_model, full_v1, state) == 1
    assert node.client_load_(node_model, server.downlink(7, 3), state) == 2
    server.load_global_(server_model)
    with torch.no_grad():
        want = server_model(input_ids=x).logits
        assert torch.equal(node_model(input_ids=x).logits, want)  # the same bytes, the same function
        server.note_held(7, 2)
        node.client_load_(node_model, server.downlink(7, 3), state)  # nothing new: nothing changes
        assert torch.equal(node_model(input_ids=x).logits, want)
        fresh_model, fresh = _node(4)
        fresh.client_load_(fresh_model, server.downlink(123, 3), RecordDict())  # all stacks at once
        assert torch.equal(fresh_model(input_ids=x).logits, want)
    server.note_held(7, 1)
    with pytest.raises(StaleBaseError, match="holds 2"):  # a node whose state is newer than the server thinks
        node.client_load_(node_model, server.downlink(7, 3), state)


def test_a_wrong_rank_reply_is_rejected_and_changes_nothing():
    _, method = _server()
    method.note_rank(1, 2)
    _, wrong = _reply(method, 1, 4, seed=0)
    metrics, rejected = method.aggregate(1, [wrong])
    assert metrics["accepted"] == 0 and "node trains rank 2" in rejected[0][1]
    assert method.groups == [] and method.version == 0


def _sealed(groups_table: list[tuple], values: bytes, version: int, base: int = 0, count: int | None = None) -> bytes:
    payload = struct.pack("<I", len(groups_table) if count is None else count)
    payload += b"".join(struct.pack("<IHHf", *g) for g in groups_table) + values
    return encode_lora(_STACK, 0, 1, version, payload, compress=False, reserved=base)


def test_bad_stacks_are_refused_with_what_was_wrong():
    _, method = _server()
    size = method.group_size
    ok = np.zeros(size(2), np.float16).tobytes()
    assert decode_stack(_sealed([(1, 2, 0, 0.5)], ok, 1), size)[2][0].rank == 2
    cases = [
        (_sealed([(1, 2, 0, 0.5)], ok[:-2], 1), MalformedFrameError, "needs"),  # values cut short
        (_sealed([(1, 2, 0, 0.5)], ok + b"\0\0", 1), MalformedFrameError, "fill"),  # trailing bytes
        (_sealed([(1, 2, 0, 0.5)], ok, 1, count=1000), MalformedFrameError, "cannot hold"),
        (_sealed([(1, 2, 0, float("nan"))], ok, 1), MalformedFrameError, "weights finite"),
        (_sealed([(1, 0, 0, 0.5)], b"", 1), MalformedFrameError, "ranks are >= 1"),
        (_sealed([(3, 2, 0, 0.5)], ok, 1), MalformedFrameError, "covers 1..1"),
        (_sealed([(1, 2, 0, 0.5)], ok, 2), MalformedFrameError, "versions 1..2 with only 1 groups"),
        (_sealed([(1, 2, 0, 0.5), (1, 2, 0, 0.5)], ok + ok, 2), MalformedFrameError, "lacks a group"),
        # a version far past the table (valid CRC) is refused before any range is built from it
        (_sealed([(1, 2, 0, 0.5)], ok, 0xFFFFFFFF), MalformedFrameError, "with only 1 groups"),
        (_sealed([], b"", 1, base=2), MalformedFrameError, "past its own version"),
        (_sealed([(1, 2, 0, 0.5)], np.full(size(2), np.nan, np.float16).tobytes(), 1), NonFiniteError, "NaN"),
        (encode_lora(FP16, 0, 1, 0, ok, compress=False), MalformedFrameError, "not a FLoRA stack"),
    ]
    for frame, err, match in cases:
        with pytest.raises(err, match=match):
            decode_stack(frame, size)
    huge = Group(1, 2, 0.5, np.broadcast_to(np.float16(0), (2**31,)))  # 4 GiB of values, none allocated
    with pytest.raises(ValueError, match="past the 4 GiB one frame carries"):
        encode_stack([huge], 1, 1, 0)
    frame = bytearray(_sealed([(1, 2, 0, 0.5)], ok, 1))
    frame[-1] ^= 1
    with pytest.raises(ChecksumError):
        decode_stack(bytes(frame), size)


def test_the_server_state_round_trips_through_a_checkpoint():
    _, method = _server()
    _round(method, {1: 2, 2: 8}, seed=0)
    method.note_held(1, 1)
    tensors, meta = method.server_state()
    _, again = _server()
    again.load_server_state(tensors, meta)
    assert again.version == 1 and again.downlink(1, 2) == method.downlink(1, 2)
    assert again.downlink(2, 2) == method.downlink(2, 2)


def test_the_export_is_a_peft_lora_of_every_stacked_component(tmp_path):
    from peft import PeftModel

    from lordba_fl.adapter.storage import peft_lora_config

    server_model, method = _server()
    _round(method, {1: 2, 2: 8}, seed=0)
    method.load_global_(server_model)
    method.export(server_model, tmp_path)
    from lordba_fl.base.models import load_model

    base, _ = load_model("tiny-llama", "q4_1")  # the run's base
    peft = PeftModel.from_pretrained(base, str(tmp_path / "peft_lora"),
                                     config=peft_lora_config(tmp_path / "peft_lora"))
    assert peft.peft_config["default"].r == 10
    x = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(peft(input_ids=x).logits, server_model(input_ids=x).logits, rtol=1e-4, atol=1e-5)


def test_attacks_act_on_the_fresh_factors():
    from lordba_fl.methods.lora import fp16_values, decode_lora

    _, method = _server()
    v, reply = _reply(method, 1, 8, seed=3)
    parts = {name: method.split(torch.from_numpy(fp16_values(decode_lora(method.attack(reply.frame, b"", name),
                                                                          method.segments, (0,))[4]).copy()), 8)
             for name in ("invert-flips", "flip-all")}
    for (a, bt), (ia, ibt), (fa, fbt) in zip(method.split(v, 8), parts["invert-flips"], parts["flip-all"]):
        assert torch.equal(ia, a) and torch.equal(ibt, -bt)  # the update B A reversed
        assert torch.equal(fa, -a) and torch.equal(fbt, -bt)  # every value's sign
    with pytest.raises(ValueError, match="unknown attack"):
        method.attack(reply.frame, b"", "nope")
