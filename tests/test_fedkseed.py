"""FedKSeed (``fedkseed``): zeroth-order steps on shared seeds; the server's coefficients by hand,
nodes rebuild the server's values exactly from the groups since their version, bad frames refused."""

import struct

import numpy as np
import pytest
import torch

from lordba_fl.federation.apps import _adapted_model
from lordba_fl.methods import Reply
from lordba_fl.methods.fedkseed import (
    StaleSeedsError,
    decode_groups,
    decode_pairs,
    direction,
    encode_groups,
    encode_pairs,
    seed_pool,
)
from lordba_fl.methods.lora import encode_lora
from lordba_fl.runconfig import parse_run_config
from lordba_fl.errors import MalformedFrameError, NonFiniteError

RUN = {"model": "tiny-llama", "rank": 4, "alpha": 8.0, "method": "fedkseed", "lr": 1e-4, "train.local-steps": 3,
       "train.batch-size": 2, "train.seq-len": 32}


def _party():
    model, tok, method = _adapted_model(parse_run_config(RUN))
    return model, tok, method


def test_every_party_draws_the_same_seeds_and_directions():
    assert np.array_equal(seed_pool(0), seed_pool(0)) and not np.array_equal(seed_pool(0), seed_pool(1))
    assert len(set(seed_pool(0).tolist())) == 4096
    assert torch.equal(direction(12345, 100), direction(12345, 100))


def test_server_coefficients_and_values_by_hand_and_nodes_rebuild_them_exactly():
    server, _, m = _party()
    m.init_server(server)
    v0 = m.global_values.clone()
    r1 = Reply(1, encode_pairs({3: 2.0, 7: -1.0}, 1, 0), 1.0)
    r2 = Reply(2, encode_pairs({3: -4.0}, 1, 0), 3.0)
    metrics, rejected = m.aggregate(1, [r1, r2])
    assert metrics["accepted"] == 2 and not rejected and m.version == 1
    # weighted mean per seed: c3 = (1 * 2 + 3 * -4) / 4 = -2.5, c7 = (1 * -1) / 4 = -0.25
    assert m.history == [[(3, -2.5), (7, -0.25)]]
    n = v0.numel()
    want = v0 - 1e-4 * (-2.5 * direction(m.seeds[3], n) - 0.25 * direction(m.seeds[7], n))
    torch.testing.assert_close(m.global_values, want, rtol=0, atol=1e-7)  # fp32 sums in another order
    m.aggregate(2, [Reply(1, encode_pairs({9: 0.5}, 2, 1), 1.0)])
    # a node that holds nothing gets every group from version 0; one at version 1 only the last
    client, _, cm = _party()
    state = {}
    assert cm.client_load_(client, m.downlink(5, 3), state) == 2
    assert torch.equal(cm.read_values(client), m.global_values)
    m.note_held(5, 1)
    other = {}
    cm.client_load_(client, encode_groups([(1, m.history[0])], 1, 1, 0), other)
    assert cm.client_load_(client, m.downlink(5, 3), other) == 2
    assert torch.equal(cm.read_values(client), m.global_values)
    with pytest.raises(StaleSeedsError, match="holds none"):
        cm.client_load_(client, m.downlink(5, 3), {})
    tensors, meta = m.server_state()
    _, _, again = _party()
    again.load_server_state(tensors, meta)
    assert again.history == m.history and torch.equal(again.global_values, m.global_values)


def test_a_client_round_sends_at_most_one_pair_per_step_and_learns_along_them():
    server, tok, m = _party()
    m.init_server(server)
    client, _, cm = _party()
    from lordba_fl.data.tasks import Example

    texts = [Example("Q: ", f"{i} apples\n") for i in range(6)]
    frame, metrics = cm.client_train(client, tok, m.downlink(1, 1), {}, texts, 1, seed=0)
    rnd, version, pairs = decode_pairs(frame, max_pairs=3)
    assert (rnd, version) == (1, 0) and 1 <= len(pairs) <= 3 and np.isfinite(metrics["train_loss"])
    # the client's values are the start moved along its own pairs, as the server will replay them
    start = m.global_values.clone()
    torch.testing.assert_close(cm.read_values(client), m.apply_(start, pairs), rtol=0, atol=1e-6)
    assert len(frame) < 100  # a round's uplink: tens of bytes


def test_bad_frames_are_refused():
    ok = encode_pairs({1: 0.5}, 1, 0)
    assert decode_pairs(ok)[2] == [(1, 0.5)]
    body = struct.pack("<I", 1) + struct.pack("<If", 5000, 0.5)
    cases = [
        (encode_lora(4, 0, 1, 0, body, compress=False), MalformedFrameError, "pool has 4096"),
        (encode_lora(4, 0, 1, 0, struct.pack("<I", 1) + struct.pack("<If", 1, float("inf")), compress=False),
         NonFiniteError, "non-finite"),
        (encode_lora(4, 0, 1, 0, struct.pack("<I", 2) + struct.pack("<If", 1, 0.5) * 2, compress=False),
         MalformedFrameError, "twice"),
        (encode_lora(4, 0, 1, 0, struct.pack("<I", 3) + struct.pack("<If", 1, 0.5), compress=False),
         MalformedFrameError, "pairs past"),
        (encode_pairs({i: 0.1 for i in range(5)}, 1, 0), MalformedFrameError, "at most 3"),
    ]
    for frame, err, match in cases:
        with pytest.raises(err, match=match):
            decode_pairs(frame, max_pairs=3)
    with pytest.raises(MalformedFrameError, match="cannot fit"):  # version range far past the table: refused first
        decode_groups(encode_groups([], 1, 0xFFFFFFFF, 0))
    with pytest.raises(MalformedFrameError, match="expected 1"):
        decode_groups(encode_groups([(2, [(1, 0.5)])], 1, 1, 0))


@pytest.mark.real_model
def test_a_fedkseed_federation_moves_tens_of_bytes_up(tmp_path):
    from test_federation import _run

    _, _, rows = _run(tmp_path, method="fedkseed", lr=1e-4, rounds=1)
    assert rows[1]["accepted"] == 4 and rows[1]["up_payload_mean"] < 100 and rows[1]["down_payload_mean"] < 100
    assert np.isfinite(rows[1]["eval_loss"])
