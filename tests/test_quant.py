import pytest
import torch
from conftest import tiny_llama
from torch import nn

from lordba_fl import quantize_base_
from lordba_fl.base.quant import Q41Linear, cast_unquantized_, q41_dequantize, q41_quantize


def test_q41_block_by_hand():
    # one block of 32: values 0..31 scaled -> min 0, max 3.1, d = 3.1 / 15
    w = (torch.arange(32, dtype=torch.float32) * 0.1).reshape(1, 32)
    q, d, m = q41_quantize(w)
    assert q.shape == (1, 16) and d.shape == (1, 1) and m.shape == (1, 1)
    assert m.item() == 0.0
    assert d.item() == torch.tensor(3.1 / 15, dtype=torch.float16).item()
    codes = torch.cat([q & 0x0F, q >> 4], dim=-1)[0]  # byte j: element j low nibble, element j + 16 high nibble
    expect = torch.clamp(((w[0] - 0.0) * (1.0 / torch.tensor(3.1 / 15)) + 0.5).floor(), max=15)
    assert codes.tolist() == expect.to(torch.uint8).tolist()
    assert codes[0] == 0 and codes[31] == 15


def test_q41_requantizing_dequantized_weights_is_exact():
    # The property that makes the default base exactly the shipped GGUF: dequant(quant(dequant(x))) == dequant(x).
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 256, generator=g) * 0.05
    q, d, m = q41_quantize(w)
    w1 = q41_dequantize(q, d, m)
    q2, d2, m2 = q41_quantize(w1)
    assert torch.equal(q2, q) and torch.equal(d2, d) and torch.equal(m2, m)
    assert torch.equal(q41_dequantize(q2, d2, m2), w1)
    assert (w1 - w).abs().max() <= d.float().max() / 2 + 1e-6  # round-to-nearest error bound


def test_q41_layer_forward_backward_match_dense():
    torch.manual_seed(0)
    lin = nn.Linear(64, 24, bias=True)
    q = Q41Linear.from_linear(lin)
    dense = q.dequantized_weight()
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, x @ dense.t() + lin.bias, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ dense, rtol=1e-5, atol=1e-5)
    assert q.qweight.numel() + 2 * q.q_scale.numel() * 2 == 64 * 24 // 2 + 2 * 2 * (64 * 24 // 32)


def test_q41_survives_dtype_casts():
    q = Q41Linear.from_linear(nn.Linear(64, 8))
    w = q.dequantized_weight()
    q.to(torch.bfloat16)
    assert torch.equal(q.dequantized_weight(), w)


def test_q41_rejects_odd_input_width():
    with pytest.raises(ValueError, match="multiple of 32.*'nf4' or 'int8'"):
        q41_quantize(torch.randn(4, 40))


def test_quantize_base_registry_and_skip():
    with pytest.raises(ValueError, match=r"unknown quantization backend 'fp8'; known: \['int8', 'nf4', 'none', 'q4_1'\]"):
        quantize_base_(tiny_llama(), "fp8")
    model = quantize_base_(tiny_llama(), "q4_1")
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith(("_proj",))}
    assert kinds == {"Q41Linear"} and type(model.lm_head) is nn.Linear
    assert model.lordba_base_quant == "q4_1"


@pytest.mark.parametrize("backend", ["q4_1", "nf4", "int8"])
def test_quantized_logits_stay_close_to_fp32(backend, ids):
    ref_model = tiny_llama()
    ref = ref_model(ids).logits
    model = quantize_base_(tiny_llama(), backend)
    out = model(ids).logits
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.2, rel


def test_cast_unquantized_leaves_quantized_storage(ids):
    model = quantize_base_(tiny_llama(), "q4_1")
    qbytes = model.model.layers[0].mlp.up_proj.q_scale.clone()
    cast_unquantized_(model, torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(model.model.layers[0].mlp.up_proj.q_scale, qbytes)
    assert model(ids).logits.dtype == torch.bfloat16


def test_a_registered_backend_owns_its_layer_type_and_adapters_attach_to_it(ids):
    from lordba_fl import LoRDBAConfig, attach_lordba_, lordba_layers
    from lordba_fl.base import quant

    class Halved(nn.Module):  # a toy "quantized" layer: weights rounded to multiples of 1/64
        def __init__(self, linear):
            super().__init__()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.register_buffer("w", (linear.weight.detach() * 64).round() / 64)

        def forward(self, x):
            return x @ self.w.T

    backend = quant.QuantBackend("toy6", lambda lin, dtype: Halved(lin), lambda: (Halved,))
    quant.register_backend(backend)
    try:
        with pytest.raises(ValueError, match="exists"):
            quant.register_backend(backend)
        model = quantize_base_(tiny_llama(), "toy6")
        assert Halved in quant.quantized_types() and isinstance(model.model.layers[0].mlp.up_proj, Halved)
        attach_lordba_(model, LoRDBAConfig(rank=2))
        assert all(isinstance(layer.base_layer, Halved) for layer in lordba_layers(model).values())
        assert torch.isfinite(model(ids).logits).all()
    finally:
        del quant.QUANT_BACKENDS["toy6"]
