"""The lean runtime computes transformers' LLaMA: the same logits, loss, gradients, greedy tokens and
tokenizer ids, the embedded model's embedding exactly in its Q8_0 blocks, and a federation that ends
where the transformers runtime's does."""

import pytest
import torch
from torch.nn import functional as F

from lordba_fl.base import lean
from lordba_fl.base.models import default_model_dir, load_model, load_tokenizer
from lordba_fl.runconfig import parse_run_config

pytestmark = pytest.mark.real_model

PROMPTS = ["Shall I compare thee to a summer's day?", "Thou art more lovely and more temperate:"]


def _batch(tok, texts):
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tok.pad_token_id)
    mask = torch.zeros_like(input_ids)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # a prompt: no target there
    return input_ids, mask, labels


@pytest.fixture(scope="module")
def smollm2_pair():
    return load_model("smollm2-135m", "q4_1")[0], load_model("smollm2-135m", "q4_1", runtime="lean")


def test_the_embedded_model_gives_transformers_logits_and_loss(smollm2_pair):
    hf, (ln, ltok) = smollm2_pair
    assert isinstance(ln.model.embed_tokens, lean.Q80Embedding)  # 1.06 bytes a weight instead of 4
    ids, mask, labels = _batch(ltok, PROMPTS)  # right-padded: the padded path of the attention
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=mask).logits
        b = ln(input_ids=ids, attention_mask=mask).logits
        keep = mask.bool()
        torch.testing.assert_close(b[keep], a[keep], rtol=1e-5, atol=1e-4)
        la = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
        lb = ln(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert float(lb) == pytest.approx(float(la), rel=1e-5)
    assert ln.generate(ids[:1, :8], max_new_tokens=6).tolist() == hf.generate(
        ids[:1, :8], attention_mask=torch.ones_like(ids[:1, :8]), max_new_tokens=6, do_sample=False,
        pad_token_id=ltok.pad_token_id).tolist()
    with pytest.raises(ValueError, match="unpadded prompts"):  # a padding mask would be ignored: refused
        ln.generate(ids, attention_mask=mask, max_new_tokens=2)


def test_the_q8_embedding_holds_the_gguf_values_bit_for_bit(smollm2_pair):
    hf, (ln, _) = smollm2_pair
    w = hf.model.embed_tokens.weight
    q = ln.model.embed_tokens
    for start in (0, 20000, q.num_embeddings - 100):
        assert torch.equal(q.rows(start, start + 100), w[start : start + 100])
    ids = torch.tensor([[0, 5, 49151], [17, 17, 3]])
    assert torch.equal(q(ids), w[ids])
    from lordba_fl.adapter.storage import base_fingerprint

    assert base_fingerprint(ln) == base_fingerprint(hf)  # frames of either runtime are accepted by the other


def test_q8_blocks_round_trip_and_bad_shapes_are_refused():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (10, 64), generator=g, dtype=torch.int8)
    codes[:, ::32] = 127  # every block reaches the code range's end, as GGUF's quantizer makes it
    steps = (torch.rand(10, 2, generator=g) * 0.01 + 1e-4).to(torch.float16)
    a = lean.Q80Embedding(codes, steps)
    w = a.rows(0, 10)
    assert torch.equal(w, (codes.float().reshape(10, 2, 32) * steps.float()[..., None]).reshape(10, 64))
    b = lean.Q80Embedding.from_weight(w)
    assert torch.equal(b.codes, codes) and torch.equal(b.steps, a.steps)
    with pytest.raises(ValueError, match="multiple of 32"):
        lean.Q80Embedding(torch.zeros(4, 40, dtype=torch.int8), torch.zeros(4, 1, dtype=torch.float16))
    with pytest.raises(ValueError, match="steps must be"):
        lean.Q80Embedding(torch.zeros(4, 64, dtype=torch.int8), torch.zeros(4, 3, dtype=torch.float16))


@pytest.mark.parametrize("quantized", [False, True])
def test_chunked_head_cross_entropy_equals_the_full_one(monkeypatch, quantized):
    monkeypatch.setattr(lean, "HEAD_ROWS", 7)  # several chunks, the last one short
    g = torch.Generator().manual_seed(1)
    w = torch.randn(30, 64, generator=g)
    head = lean.Q80Embedding.from_weight(w) if quantized else lean.DenseEmbedding(w)
    dense = head.rows(0, 30, torch.float32)
    h = torch.randn(5, 64, generator=g, requires_grad=True)
    labels = torch.tensor([0, 6, 7, 29, 13])
    loss = lean.HeadCrossEntropy.apply(h, labels, head)
    (grad,) = torch.autograd.grad(loss * 0.5, h)
    h2 = h.detach().clone().requires_grad_(True)
    ref = F.cross_entropy(h2 @ dense.T, labels, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref * 0.5, h2)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_adapter_gradients_match_transformers_with_and_without_checkpointing():
    from lordba_fl.methods import make_method
    from lordba_fl.methods.lordba.layout import read_latents

    hf, tok = load_model("tiny-llama", "q4_1")
    method = make_method(parse_run_config({"model": "tiny-llama", "rank": 4, "alpha": 8.0}))
    hf = method.adapt(hf)
    ln = lean.from_transformers(hf)  # the same modules: the same adapter parameters
    ids, mask, labels = _batch(tok, PROMPTS)
    params = [p for p in hf.parameters() if p.requires_grad]
    grads = []
    for model, ckpt in ((hf, False), (ln, False), (ln, True)):
        model.train()
        if ckpt:
            model.activation_checkpointing_enable()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        grads.append(torch.autograd.grad(loss, params))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    assert read_latents(ln, method.spec).numel() == method.spec.n_bits


def test_lean_tokenizer_gives_transformers_ids_and_text():
    ref = load_tokenizer(default_model_dir())
    tok = lean.LeanTokenizer(default_model_dir())
    assert (tok.pad_token_id, tok.eos_token_id, len(tok)) == (ref.pad_token_id, ref.eos_token_id, len(ref))
    for text in [*PROMPTS, "<|im_start|>user\nhi<|im_end|>", "  two  spaces\n\nand é 🎉", ""]:
        for special in (False, True):
            ids = tok(text, add_special_tokens=special)["input_ids"]
            assert ids == ref(text, add_special_tokens=special)["input_ids"]
            assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert torch.equal(tok(PROMPTS[0], return_tensors="pt")["input_ids"], ref(PROMPTS[0], return_tensors="pt")["input_ids"])


def test_a_released_lean_tokenizer_frees_its_tables_and_reloads_them_on_use():
    """``train.return-memory``: training releases the tokenizer once its examples are encoded (the same
    step as without it); the next call loads it again and gives the same ids."""
    from lordba_fl.base.models import load_model
    from lordba_fl.data import Example
    from lordba_fl.methods import make_method
    from lordba_fl.methods.lordba import train_groups
    from lordba_fl.methods.lordba.layout import read_scales, read_state, write_state_
    from lordba_fl.train import TrainConfig, train_local

    model, tok = load_model("smollm2-135m", "q4_1", runtime="lean")
    assert isinstance(tok, lean.LeanTokenizer)
    before = tok(PROMPTS[0])["input_ids"]
    method = make_method(parse_run_config({"model-runtime": "lean", "rank": 2}))
    model = method.adapt(model)
    start = read_state(model, method.spec)
    examples = [Example("Q: one two", " three four"), Example("Q: five", " six seven")]
    out = []
    for release in (False, True):
        write_state_(model, method.spec, start, latent_magnitude=0.002)
        cfg = TrainConfig(steps=1, batch_size=2, seq_len=32, return_memory=release)
        m = train_local(model, train_groups(model, method.spec, 1e-3, 1e-3), tok, examples, cfg, seed=0)
        assert (tok._backend is None) == release
        out.append((m["train_loss"], read_scales(model, method.spec)))
    assert out[0][0] == out[1][0] and torch.equal(out[0][1], out[1][1])
    assert tok(PROMPTS[0])["input_ids"] == before and tok._backend is not None  # loaded again on use


def test_runtime_choices_are_checked_at_start():
    assert parse_run_config({"model-runtime": "lean"}).model_runtime == "lean"
    with pytest.raises(ValueError, match="method 'lora-fedavg' runs on model-runtime transformers"):
        parse_run_config({"model-runtime": "lean", "method": "lora-fedavg"})
    with pytest.raises(ValueError, match="q4_1 base; got quant='nf4'"):
        parse_run_config({"model-runtime": "lean", "quant": "nf4"})
    with pytest.raises(ValueError, match="'model-runtime' must be one of"):
        parse_run_config({"model-runtime": "onnx"})
    with pytest.raises(ValueError, match="this model has model_type='gpt2'"):
        lean.LeanConfig.from_dict({"model_type": "gpt2", "tie_word_embeddings": True})


def test_a_round_on_the_lean_runtime_ends_where_the_transformers_one_does(tmp_path):
    import json

    from localgrid import LocalGrid

    from clients.app import make_client_app
    from lordba_fl.federation.apps import run_server
    from lordba_fl.runconfig import DEFAULTS

    losses = {}
    for runtime in ("transformers", "lean"):
        cfg = {**DEFAULTS, "model": "tiny-llama", "task": "shakespeare", "data.shakespeare.max-clients": 4, "rounds": 1,
               "clients-per-round": 4, "rank": 4, "alpha": 8.0, "train.local-steps": 2, "train.batch-size": 2,
               "train.seq-len": 48, "eval.examples": 6, "eval.generate": 0, "model-runtime": runtime,
               "out-dir": str(tmp_path / runtime)}
        run_server(LocalGrid(make_client_app(), 4, cfg), cfg)
        rows = [json.loads(line) for line in (tmp_path / runtime / "lordba-refit" / "rounds.jsonl").read_text().splitlines()]
        losses[runtime] = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(losses["lean"]) == 2
    assert losses["lean"] == pytest.approx(losses["transformers"], rel=1e-5)


def test_plain_adamw_steps_exactly_as_torchs():
    from lordba_fl.train import PlainAdamW, make_optimizer, TrainConfig

    g = torch.Generator().manual_seed(2)
    params = [torch.randn(7, 5, generator=g), torch.randn(11, generator=g), torch.randn(3, generator=g)]
    mine = [p.clone().requires_grad_(True) for p in params]
    ref = [p.clone().requires_grad_(True) for p in params]
    groups = lambda ps: [{"params": ps[:2], "lr": 1e-3}, {"params": ps[2:], "lr": 0.05}]  # noqa: E731
    a = make_optimizer(groups(mine), TrainConfig())
    b = torch.optim.AdamW(groups(ref), weight_decay=0.0)
    assert isinstance(a, PlainAdamW)
    for step in range(6):
        grads = [torch.randn(p.shape, generator=g) * (10.0 ** -step) for p in params]
        for ps, opt in ((mine, a), (ref, b)):
            opt.zero_grad(set_to_none=True)
            for p, gr in zip(ps, grads):
                if not (step == 2 and p is ps[1]):  # a parameter without a gradient in one step keeps still
                    p.grad = gr.clone()
            opt.step()
        for x, y in zip(mine, ref):
            assert torch.equal(x, y)
    for x, y in zip(mine, ref):
        assert torch.equal(a.state[x]["exp_avg_sq"], b.state[y]["exp_avg_sq"]) and float(a.state[x]["step"]) == float(b.state[y]["step"])
