import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import push_objects

from lordba_fl.wire.metering import ByteLedger, MessageBytes, lora_fp16_bytes, payload_bytes, wire_bytes


def _message(blob: bytes, config=None, metrics=None) -> Message:
    md = Metadata(
        run_id=1, message_id="", src_node_id=1, dst_node_id=7, reply_to_message_id="", group_id="3",
        created_at=0.0, ttl=3600.0, message_type="train",
    )
    content = {"update": ArrayRecord({"frame": Array(dtype="uint8", shape=(len(blob),), stype="lordba-fl/frame", data=blob)})}
    if config is not None:
        content["config"] = ConfigRecord(config)
    if metrics is not None:
        content["metrics"] = MetricRecord(metrics)
    return Message(RecordDict(content), metadata=md)


def test_chunk_bytes_by_hand():
    # an ArrayChunk deflates to "ArrayChunk" SP <no children> SP <body length> NUL <raw bytes>
    blob = bytes(range(256)) * 4  # 1,024 bytes
    objs = get_all_nested_objects(_message(blob))
    chunks = [o for o in objs.values() if type(o).__name__ == "ArrayChunk"]
    assert len(chunks) == 1 and len(chunks[0].deflate()) == len("ArrayChunk  1024\0") + 1024


def test_wire_bytes_grow_byte_for_byte_with_the_payload():
    # same digit counts in every length field, so only the data differs
    small, large = _message(b"\1" * 1000), _message(b"\2" * 1999)
    assert wire_bytes(large) - wire_bytes(small) == 999
    assert payload_bytes(large) - payload_bytes(small) == 999


def test_wire_bytes_equal_what_flowers_push_loop_sends():
    msg = _message(np.random.default_rng(0).bytes(70_000), {"round": 3, "codec": b"\0" * 17, "many": [b"ab", b"c"]}, {"loss": 0.5})
    pushed = []
    push_objects(get_all_nested_objects(msg), lambda oid, content: pushed.append(len(content)), keep_objects=True)
    assert wire_bytes(msg) == sum(pushed)
    assert payload_bytes(msg) == 70_000 + 17 + 3  # the array plus bytes config values; metrics are not payload
    assert wire_bytes(msg) > payload_bytes(msg)


def test_lora_bytes_formula():
    # fp16 A (r, in) + B (out, r): 2 bytes * r * (in + out)
    assert lora_fp16_bytes([(576, 576), (576, 192)], rank=16) == 2 * 16 * (1152 + 768)


def test_ledger_round_summary_by_hand():
    ledger = ByteLedger()
    for rnd, direction, node, p, w in [
        (1, "down", 1, 100, 150), (1, "down", 2, 300, 350), (1, "up", 1, 10, 40), (1, "up", 2, 30, 60),
        (2, "up", 1, 20, 50),
    ]:
        ledger.add(MessageBytes(rnd, direction, node, p, w, 1000, "lordba"))
    s1, s2 = ledger.round_summary(1), ledger.round_summary(2)
    assert s1["down"]["payload"] == {"sum": 400, "mean": 200.0, "max": 300, "count": 2}
    assert s1["up"]["wire"] == {"sum": 100, "mean": 50.0, "max": 60, "count": 2}
    assert s2["down"]["wire"]["count"] == 0
    assert s2["totals"]["up_payload_bytes"] == 60 and s2["totals"]["down_wire_bytes"] == 500
    assert s2["totals"]["up_fp16_lora_bytes"] == 3000


def test_message_record_from_a_message_and_bad_values():
    rec = MessageBytes.of(_message(b"x" * 10), round=1, direction="up", node_id=7, fp16_lora_bytes=64, method="lora-fedavg")
    assert rec.payload_bytes == 10 and rec.wire_bytes == wire_bytes(_message(b"x" * 10))
    with pytest.raises(ValueError, match="direction"):
        MessageBytes(1, "sideways", 1, 0, 0, 0)
    with pytest.raises(ValueError, match="non-negative"):
        MessageBytes(1, "up", 1, -1, 0, 0)


def test_recorddict_bytes_by_hand():
    from lordba_fl.wire.metering import recorddict_bytes

    rd = RecordDict({
        "a": ArrayRecord({"x": Array(dtype="uint8", shape=(5,), stype="raw", data=b"12345")}),
        "c": ConfigRecord({"frame": b"\0" * 7, "n": 3, "many": [b"ab", b"c"]}),
        "m": MetricRecord({"loss": 1.0}),
    })
    assert recorddict_bytes(rd) == 5 + 7 + 3
