"""Fed-SB (``fed-sb``): the server's gradient basis, exact averaging of the r x r cores, the basis sent
once per node, and an export PEFT reproduces."""

import math

import numpy as np
import pytest
import torch

from lordba_fl.data.tasks import Example, FederatedTask
from lordba_fl.federation.apps import _adapted_model
from lordba_fl.methods import Reply
from lordba_fl.methods.fed_sb import StaleBasisError, fed_sb_layers, sign_step_basis, weight_gradients
from lordba_fl.methods.lora import encode_lora
from lordba_fl.runconfig import parse_run_config

RUN = {"model": "tiny-llama", "rank": 4, "alpha": 8.0, "method": "fed-sb", "train.seq-len": 32, "train.batch-size": 2}
TEXTS = [Example("Question: add 2 and 3\nAnswer: ", f"{i + 5} apples\n") for i in range(6)]


def _task():
    return FederatedTask("toy", ["a", "b"], [TEXTS[:3], TEXTS[3:]], [TEXTS[:1], TEXTS[3:4]])


def _server(quant="q4_1"):
    cfg = parse_run_config({**RUN, "quant": quant})
    model, tok, method = _adapted_model(cfg)
    method.init_from_data(model, tok, _task())
    method.init_server(model)
    return model, tok, method


def _client():
    model, tok, method = _adapted_model(parse_run_config(RUN))
    return model, tok, method


def test_hooked_gradient_equals_autograds_weight_gradient():
    # an unquantized base has a weight autograd can differentiate: the hooks must give the same G
    model, tok, method = _adapted_model(parse_run_config({**RUN, "quant": "none"}))
    layers = fed_sb_layers(model)
    grads = weight_gradients(model, tok, TEXTS, 32, 2)
    bases = [model.get_submodule(name).base_layer.weight for name, _, _ in layers]
    for w in bases:
        w.requires_grad_(True)
    from lordba_fl.train import pad_id_of, collate, encode_examples

    items = encode_examples(tok, TEXTS, 32)
    for i in range(0, len(items), 2):
        model(**collate(items[i : i + 2], pad_id_of(tok))).loss.backward()
    for g, w in zip(grads, bases):
        torch.testing.assert_close(g, w.grad, rtol=1e-4, atol=1e-6)
        assert g.abs().max() > 0


def test_basis_is_the_truncated_svd_of_one_sign_step():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(40, 3, generator=gen) @ torch.randn(3, 30, generator=gen) + 0.1 * torch.randn(40, 30, generator=gen)
    a, r, b = sign_step_basis(g, 3, 0.01)
    target = -0.01 * torch.sign(g)
    u, s, vh = torch.linalg.svd(target.double())
    torch.testing.assert_close((b @ r @ a).double(), u[:, :3] @ torch.diag(s[:3]) @ vh[:3], rtol=0, atol=1e-5)
    a2, r2, b2 = sign_step_basis(g, 3, 0.01)
    assert torch.equal(a, a2) and torch.equal(r, r2) and torch.equal(b, b2)  # seeded: every party gets the same
    torch.testing.assert_close(a @ a.t(), torch.eye(3), rtol=0, atol=1e-5)  # orthonormal, frozen factors


def _initial_cores(**run):
    cfg = parse_run_config({**RUN, **run})
    model, tok, method = _adapted_model(cfg)
    method.init_from_data(model, tok, _task())
    return method.read_values(model), method


def test_init_step_sets_the_initial_core_apart_from_the_training_lr():
    reference, _ = _initial_cores(lr=1e-3)  # the authors' choice: the simulated step is the training lr
    decoupled, method = _initial_cores(lr=1e-2, **{"fed-sb.init-step": 1e-3})
    assert method.cfg.lr == 1e-2 and torch.equal(decoupled, reference)  # same start, 10x the training lr
    doubled, _ = _initial_cores(lr=1e-3, **{"fed-sb.init-step": 2e-3})
    torch.testing.assert_close(doubled, 2 * reference, rtol=1e-6, atol=0)  # the core scales with the step
    assert reference.abs().max() > 0


@pytest.mark.parametrize("bad", [-1e-3, float("nan"), float("inf")])
def test_a_bad_init_step_is_refused_naming_the_key(bad):
    with pytest.raises(ValueError, match="fed-sb.init-step"):
        parse_run_config({**RUN, "fed-sb.init-step": bad})


def test_server_starts_at_the_fp16_basis_and_nodes_rebuild_it_exactly():
    server, _, method = _server()
    client, _, cm = _client()
    state = {}
    first = method.downlink(7, 1)
    assert len(first) > method.fp16_lora_bytes()  # the basis travels once, at fp16 LoRA size, with the core
    assert cm.client_load_(client, first, state) == 0
    x = torch.randint(0, 1000, (2, 10))
    with torch.no_grad():
        assert torch.equal(client(input_ids=x).logits, server(input_ids=x).logits)
    method.note_held(7, 0)
    second = method.downlink(7, 2)
    assert len(second) < len(first) and len(second) - 2 * method.segments.sum() < 64  # the core alone
    cm.client_load_(client, second, state)
    with pytest.raises(StaleBasisError, match="no basis"):
        cm.client_load_(client, second, {})  # a node that lost its state
    method.note_held(7, None)  # ...reported an error: it gets the basis again
    assert len(method.downlink(7, 3)) == len(first)


def test_cores_average_exactly_and_a_stale_version_is_rejected():
    _, _, method = _server()
    start = method.global_values.clone()
    n = int(method.segments.sum())
    replies, values = [], []
    for node, weight in ((1, 1.0), (2, 3.0)):
        v = (start + torch.randn(n) * 0.01).half().float()
        values.append(v)
        replies.append(Reply(node, encode_lora(0, 0, 1, 0, v.numpy().astype(np.float16).tobytes(), compress=False), weight))
    stale = Reply(3, encode_lora(0, 0, 1, 5, start.numpy().astype(np.float16).tobytes(), compress=False), 1.0)
    metrics, rejected = method.aggregate(1, replies + [stale])
    assert metrics["accepted"] == 2 and [n for n, _ in rejected] == [3]
    torch.testing.assert_close(method.global_values, (values[0] + 3 * values[1]) / 4, rtol=0, atol=1e-7)
    # the mean of the cores is the mean of the products B R_k A: the layers are linear in R
    model, _, _ = _client()
    method.load_global_(model)
    _, a, b = fed_sb_layers(model)[0]
    products = []
    for v in values:
        method.write_values_(model, v)
        products.append(b.weight @ a.core @ a.weight)
    method.load_global_(model)
    torch.testing.assert_close(b.weight @ a.core @ a.weight, (products[0] + 3 * products[1]) / 4, rtol=1e-5, atol=1e-6)


def test_client_trains_only_the_core_and_the_checkpoint_round_trips():
    _, tok, method = _server()
    client, _, cm = _client()
    frame, metrics = cm.client_train(client, tok, method.downlink(1, 1), {}, TEXTS, 1, seed=0)
    assert metrics["held_version"] == 0.0
    assert len(frame) - 2 * method.segments.sum() < 64  # only the cores go up
    _, a, b = fed_sb_layers(client)[0]
    before = method.basis[0]
    assert torch.equal(a.weight, before[0]) and torch.equal(b.weight, before[1])  # the basis did not move
    method.aggregate(1, [Reply(1, frame, 4.0)])
    tensors, meta = method.server_state()
    _, _, other = _server()
    other.load_server_state(tensors, meta)
    assert torch.equal(other.global_values, method.global_values) and other.version == 1
    assert all(torch.equal(x, y) for p, q in zip(other.basis, method.basis) for x, y in zip(p, q))


def test_the_export_is_a_peft_lora_with_the_same_logits(tmp_path):
    from peft import PeftModel

    from lordba_fl.adapter.storage import peft_lora_config
    from lordba_fl.base.models import load_model

    server, _, method = _server()
    method.export(server, tmp_path)
    base, _ = load_model("tiny-llama", "q4_1")
    peft = PeftModel.from_pretrained(base, str(tmp_path / "peft_lora"), config=peft_lora_config(tmp_path / "peft_lora"))
    x = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(peft(input_ids=x).logits, server(input_ids=x).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.real_model
def test_a_federation_sends_the_basis_once_per_node_then_cores(tmp_path):
    from test_federation import _run

    _, _, rows = _run(tmp_path, method="fed-sb")  # 4 nodes, all sampled in both rounds
    assert rows[1]["accepted"] == rows[2]["accepted"] == 4
    assert rows[1]["down_wire_mean"] > rows[1]["fp16_lora_bytes"]  # first contact: basis + core
    assert rows[2]["down_wire_mean"] < rows[1]["fp16_lora_bytes"] / 4  # then the core alone
    assert rows[2]["up_wire_mean"] == rows[1]["up_wire_mean"] < rows[1]["fp16_lora_bytes"] / 4
    assert math.isfinite(rows[2]["eval_loss"])
