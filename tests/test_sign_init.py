"""Informed signs: the frozen base's own principal directions (init.signs='base-svd'), and flip agreement."""

import pytest
import torch
from conftest import tiny_llama

from lordba_fl import LoRDBAConfig, attach_lordba_, lordba_layers, quantize_base_
from lordba_fl.adapter.layer import binarize, effective_weight
from lordba_fl.methods.lordba import flip_agreement


@pytest.mark.parametrize("backend", ["none", "q4_1", "nf4"])
def test_effective_weight_is_what_the_layer_computes(backend):
    model = quantize_base_(tiny_llama(), backend)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(0))
    w = effective_weight(layer)  # (out, in)
    bias = layer(torch.zeros(1, layer.in_features)).float()
    torch.testing.assert_close(layer(x).float(), x @ w.t() + bias, atol=1e-4, rtol=1e-4)


def test_effective_weight_of_int8_is_the_dequantized_codes():
    """int8 quantizes activations too, so its weight is read from the codes: within half a step of
    the float weight (step = row absmax / 127), plus the fp16 rounding bitsandbytes may scale in
    (2^-11 relative: at most 2^-10 of the row's absmax)."""
    ref = tiny_llama().model.layers[0].self_attn.q_proj.weight.detach().float()  # (out, in)
    layer = quantize_base_(tiny_llama(), "int8").model.layers[0].self_attn.q_proj
    absmax = ref.abs().amax(1, keepdim=True)  # (out, 1)
    err = (effective_weight(layer) - ref).abs()
    assert bool((err <= 0.5 * absmax / 127.0 + absmax * 2.0**-10).all())
    assert float(err.max()) > 0  # the codes really are quantized


def test_base_svd_signs_are_the_top_singular_vectors_of_the_base_weight():
    model = quantize_base_(tiny_llama(), "q4_1")
    bases = {n: m for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))}
    weights = {n: effective_weight(m).double() for n, m in bases.items()}
    attach_lordba_(model, LoRDBAConfig(rank=4, sign_init="base-svd"))
    layers = lordba_layers(model)
    for name, w in weights.items():
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        s1, s2 = binarize(layers[name].lordba_latent_A), binarize(layers[name].lordba_latent_B)  # (r, in), (out, r)
        for k in range(4):
            # up to the component's sign: S1[k] = sign(v_k) and S2[:, k] = sign(u_k) with the same flip
            flip = 1.0 if float(s2[:, k].double() @ u[:, k]) > 0 else -1.0
            assert torch.equal(s2[:, k].double(), torch.where(flip * u[:, k] < 0, -1.0, 1.0).double())
            assert torch.equal(s1[k].double(), torch.where(flip * vh[k] < 0, -1.0, 1.0).double())
        # held row-major like the random init's (the per-step flip projection indexes them in that order)
        assert layers[name].lordba_latent_A.is_contiguous() and layers[name].lordba_latent_B.is_contiguous()
        # and the adapter starts as a no-op (s_out = 0), like the random init
        assert float(layers[name].lordba_scale_out.detach().abs().max()) == 0.0


def test_base_svd_signs_are_the_same_for_every_party():
    a, b = quantize_base_(tiny_llama(), "q4_1"), quantize_base_(tiny_llama(), "q4_1")
    attach_lordba_(a, LoRDBAConfig(rank=4, sign_init="base-svd", seed=1))
    attach_lordba_(b, LoRDBAConfig(rank=4, sign_init="base-svd", seed=2))  # the seed plays no part
    for (n, la), (_, lb) in zip(lordba_layers(a).items(), lordba_layers(b).items()):
        assert torch.equal(binarize(la.lordba_latent_A), binarize(lb.lordba_latent_A)), n
        assert torch.equal(binarize(la.lordba_latent_B), binarize(lb.lordba_latent_B)), n


def test_bad_sign_init_is_refused():
    with pytest.raises(ValueError, match="sign_init must be one of"):
        LoRDBAConfig(sign_init="pissa")
    with pytest.raises(ValueError, match="rank <= min"):
        attach_lordba_(quantize_base_(tiny_llama(), "none"), LoRDBAConfig(rank=128, sign_init="base-svd"))


def test_flip_agreement_by_hand():
    t, f = True, False
    m1 = torch.tensor([t, t, f, f, f, f, f, f, f, f])
    m2 = torch.tensor([t, f, t, f, f, f, f, f, f, f])
    got = flip_agreement([m1, m2])
    assert got["flip_agreement"] == pytest.approx(1 / 3)  # positions {0, 1, 2} flipped, only 0 by both
    # independent clients at p = 0.2 each: P(both) / P(any) = 0.04 / 0.36
    assert got["flip_agreement_chance"] == pytest.approx(0.04 / 0.36)
    assert flip_agreement([m1]) == {}
