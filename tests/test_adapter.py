import pytest
import torch
from conftest import BUILDERS, randomize_adapter_, tiny_llama
from torch import nn

from lordba_fl import (
    LoRDBAConfig,
    LoRDBALinear,
    attach_lordba_,
    expected_adapter_bits,
    expected_num_parameters,
    lordba_layers,
    quantize_base_,
    set_adapters_enabled_,
)
from lordba_fl.adapter.config import DEFAULT_TARGET_MODULES

SCALE_SETS = [("in", "mid", "out"), ("mid", "out"), ("out",), ("in",), ("in", "mid")]


def _layer(scales=("in", "mid", "out"), ste="smooth", n_in=40, n_out=24, r=8, seed=0, bias=True):
    torch.manual_seed(seed)
    base = nn.Linear(n_in, n_out, bias=bias)
    base.requires_grad_(False)
    layer = LoRDBALinear(base, LoRDBAConfig(rank=r, alpha=2.0 * r, ste=ste, ste_k=7.0, scales=scales))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        layer.lordba_latent_A.copy_(torch.randn(r, n_in, generator=g) * 0.3)
        layer.lordba_latent_B.copy_(torch.randn(n_out, r, generator=g) * 0.3)
        layer.lordba_latent_A[0, 0] = 0.0  # sign(0) = +1
        for s in scales:
            layer.scale(s).copy_(torch.rand(layer.scale(s).shape, generator=g) + 0.5)
    return layer


def _explicit(layer, x, s1, s2):
    """DESIGN §1 written out: y0 + g * s_out * (S2 @ (s_mid * (S1 @ (s_in * x))))."""
    ones = lambda n: torch.ones(n)  # noqa: E731
    sin = layer.lordba_scale_in if layer.lordba_scale_in is not None else ones(layer.in_features)
    smid = layer.lordba_scale_mid if layer.lordba_scale_mid is not None else ones(layer.rank)
    sout = layer.lordba_scale_out if layer.lordba_scale_out is not None else ones(layer.out_features)
    h = torch.einsum("ri,bti->btr", s1, sin * x)  # (B, T, in) -> (B, T, r)
    d = torch.einsum("or,btr->bto", s2, smid * h)  # (B, T, r) -> (B, T, out)
    return layer.base_layer(x) + layer.scaling * sout * d


@pytest.mark.parametrize("scales", SCALE_SETS)
def test_forward_equals_explicit_formula(scales):
    layer = _layer(scales)
    x = torch.randn(3, 5, layer.in_features)
    s1 = torch.where(layer.lordba_latent_A < 0, -1.0, 1.0)
    s2 = torch.where(layer.lordba_latent_B < 0, -1.0, 1.0)
    assert s1[0, 0] == 1.0
    torch.testing.assert_close(layer(x), _explicit(layer, x, s1, s2), rtol=1e-5, atol=1e-5)


STE_DERIVATIVES = {
    "smooth": lambda latent, k: k * (1 - torch.tanh(k * latent) ** 2),
    "clipped": lambda latent, k: (latent.abs() <= 1).float(),
}


@pytest.mark.parametrize("ste", sorted(STE_DERIVATIVES))
@pytest.mark.parametrize("scales", SCALE_SETS)
def test_ste_gradients_equal_hand_formulas(ste, scales):
    layer = _layer(scales, ste=ste)
    with torch.no_grad():  # put some latents inside and some outside the clipped STE's window
        layer.lordba_latent_A.mul_(5.0)
    x = torch.randn(2, 3, layer.in_features, requires_grad=True)
    weights = torch.randn(2, 3, layer.out_features)
    (layer(x) * weights).sum().backward()

    # Reference: plain autograd through the explicit formula, with the signs as leaves.
    s1 = torch.where(layer.lordba_latent_A < 0, -1.0, 1.0).requires_grad_(True)
    s2 = torch.where(layer.lordba_latent_B < 0, -1.0, 1.0).requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    scale_leaves = {s: layer.scale(s).detach().clone().requires_grad_(True) for s in scales}
    ref = _layer_with(layer, scale_leaves)
    (_explicit(ref, xr, s1, s2) * weights).sum().backward()

    k, tol = layer.ste_k, {"rtol": 1e-4, "atol": 1e-5}
    expect_a = s1.grad * STE_DERIVATIVES[ste](layer.lordba_latent_A.detach(), k)
    expect_b = s2.grad * STE_DERIVATIVES[ste](layer.lordba_latent_B.detach(), k)
    torch.testing.assert_close(layer.lordba_latent_A.grad, expect_a, **tol)
    torch.testing.assert_close(layer.lordba_latent_B.grad, expect_b, **tol)
    for s in scales:
        torch.testing.assert_close(layer.scale(s).grad, scale_leaves[s].grad, **tol)
    torch.testing.assert_close(x.grad, xr.grad, **tol)
    if ste == "clipped":
        outside = layer.lordba_latent_A.detach().abs() > 1
        assert outside.any() and (layer.lordba_latent_A.grad[outside] == 0).all()


def _layer_with(layer, scale_leaves):
    class Ref:
        pass

    ref = Ref()
    ref.base_layer, ref.scaling = layer.base_layer, layer.scaling
    ref.in_features, ref.out_features, ref.rank = layer.in_features, layer.out_features, layer.rank
    for s in ("in", "mid", "out"):
        setattr(ref, f"lordba_scale_{s}", scale_leaves.get(s))
    return ref


def test_sign_of_zero_latent_is_plus_one():
    layer = _layer()
    with torch.no_grad():
        layer.lordba_latent_A.zero_()
        layer.lordba_latent_B.zero_()
    a, b = layer.lora_factors()
    assert (a > 0).all() and (b > 0).all()


def test_backward_keeps_only_what_lora_keeps():
    """Saved-for-backward tensors of the adapter path: the input and the (N, r) bottleneck, nothing full-size.

    A LoRA layer keeps x and x @ A^T; a naive LoRDBA keeps, in addition, the sign carriers, the folded
    factors and scaled activations. Measured with autograd's saved-tensor hooks.
    """
    layer = _layer(bias=False)
    params = {p.data_ptr() for p in layer.parameters()}
    x = torch.randn(4, 6, layer.in_features, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer.delta(x)
    extra = [t for t in saved if t.data_ptr() not in params]
    extra_bytes = sum(t.numel() * t.element_size() for t in extra)
    n_tokens = 4 * 6
    assert extra_bytes == 4 * n_tokens * (layer.in_features + layer.rank)  # x and h, fp32
    y.sum().backward()
    assert layer.lordba_latent_A.grad is not None


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_scratch_init_leaves_logits_unchanged(arch, ids):
    model = BUILDERS[arch]()
    ref = model(ids).logits
    attach_lordba_(model, LoRDBAConfig(rank=8, seed=0))
    torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)
    # but it is not inert: after one optimizer step the logits move
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-1)
    model(ids, labels=ids).loss.backward()
    opt.step()
    assert not torch.allclose(model(ids).logits, ref)


@pytest.mark.parametrize("scales", SCALE_SETS)
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_only_latents_and_scales_train_and_counts_match_formula(arch, scales):
    model = BUILDERS[arch]()
    cfg = LoRDBAConfig(rank=8, scales=scales)
    attach_lordba_(model, cfg)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lordba_latent_" in n or ".lordba_scale_" in n for n in trainable)
    layers = lordba_layers(model)
    assert len(layers) == 2 * len(DEFAULT_TARGET_MODULES)
    shapes = [(m.in_features, m.out_features) for m in layers.values()]
    # tiny llama: hidden 64, kv 2 heads of 16, intermediate 96
    per_block = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 96), (64, 96), (96, 64)]
    assert sorted(shapes) == sorted(per_block * 2)
    n = sum(p.numel() for p in trainable.values())
    assert n == expected_num_parameters(cfg, shapes)
    by_hand = sum(8 * (i + o) + sum({"in": i, "mid": 8, "out": o}[s] for s in scales) for i, o in shapes)
    assert n == by_hand
    assert expected_adapter_bits(cfg, shapes) == sum(
        8 * (i + o) + 16 * sum({"in": i, "mid": 8, "out": o}[s] for s in scales) for i, o in shapes
    )


def test_target_errors_name_the_fix():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"no module matches target_modules=\['c_attn'\].*'q_proj'"):
        attach_lordba_(model, LoRDBAConfig(target_modules=("c_attn",)))
    with pytest.raises(TypeError, match="not a linear layer.*remove it from target_modules"):
        attach_lordba_(model, LoRDBAConfig(target_modules=("mlp",)))
    attach_lordba_(model, LoRDBAConfig(rank=4))
    with pytest.raises(ValueError, match="already has LoRDBA adapters"):
        attach_lordba_(model, LoRDBAConfig(rank=4))
    with pytest.raises(ValueError, match="needs delta_weights"):
        attach_lordba_(tiny_llama(), LoRDBAConfig(rank=4, init="svd"))


def test_disable_adapters_gives_base_logits(ids):
    model = tiny_llama()
    ref = model(ids).logits
    attach_lordba_(model, LoRDBAConfig(rank=8))
    randomize_adapter_(model)
    assert not torch.allclose(model(ids).logits, ref)
    set_adapters_enabled_(model, False)
    torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)


def _base_bytes(model):
    out = {}
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "lordba_" not in n:
            out[n] = t.detach().clone()
    return out


@pytest.mark.parametrize("backend", ["q4_1", "nf4", "int8", "none"])
def test_quantized_base_gets_no_gradient_and_stays_byte_identical(backend, ids):
    model = tiny_llama()
    quantize_base_(model, backend)
    attach_lordba_(model, LoRDBAConfig(rank=8, seed=0))
    randomize_adapter_(model)
    before = _base_bytes(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if "lordba_" not in n:
            assert not p.requires_grad and p.grad is None, n
    after = _base_bytes(model)
    assert before.keys() == after.keys()
    for n in before:
        assert before[n].dtype == after[n].dtype and torch.equal(before[n].view(torch.uint8) if before[n].dtype == torch.bool else before[n], after[n]), n
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in trainable)


def test_bf16_compute_matches_fp32_closely(ids):
    model = tiny_llama()
    attach_lordba_(model, LoRDBAConfig(rank=8))
    randomize_adapter_(model)
    x = torch.randn(2, 3, 64)
    layer = lordba_layers(model)["model.layers.0.self_attn.q_proj"]
    y32 = layer.delta(x)
    y16 = layer.delta(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=3e-2, atol=3e-2)


def test_inference_fold_cache_tracks_parameter_changes():
    layer = _layer()
    x = torch.randn(2, 3, layer.in_features)
    with torch.no_grad():
        y1 = layer(x)
        torch.testing.assert_close(y1, layer(x), rtol=0, atol=0)  # served from the cache
        layer.lordba_scale_out.mul_(2.0)  # an in-place change bumps the version counter
        y2 = layer(x)
        layer.lordba_latent_A.neg_()
        y3 = layer(x)
    s1 = torch.where(layer.lordba_latent_A < 0, -1.0, 1.0)
    s2 = torch.where(layer.lordba_latent_B < 0, -1.0, 1.0)
    with torch.no_grad():
        torch.testing.assert_close(y3, _explicit(layer, x, s1, s2), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y2 - layer.base_layer(x), 2 * (y1 - layer.base_layer(x)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), y3, rtol=1e-5, atol=1e-5)  # training path agrees with the cache


@pytest.mark.parametrize("scales", [("mid", "out"), ("in", "mid", "out"), ("in", "out")])
def test_relative_scale_lr_gives_each_scale_the_full_sets_relative_step(scales):
    """scale-lr='relative': a scale's lr is lr times its normalized init over the full set's, so s_mid
    without s_in (init 1/sqrt(in*r)) runs at lr/sqrt(in); with all three scales nothing changes."""
    from lordba_fl.adapter.layer import lordba_layers
    from lordba_fl.methods.lordba import train_groups
    from lordba_fl.methods.lordba.layout import AdapterSpec

    model = tiny_llama()
    attach_lordba_(model, LoRDBAConfig(rank=4, scales=scales))
    spec = AdapterSpec.from_model(model)
    lr = 1e-3
    groups = train_groups(model, spec, lr, 0.0, "relative")
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for m in lordba_layers(model).values():
        for k in scales:
            want = lr
            if k == "mid" and "in" not in scales:
                want = lr / m.in_features ** 0.5
            if k == "in" and "mid" not in scales:
                want = lr / m.rank ** 0.5
            assert lr_of[id(m.scale(k))] == pytest.approx(want, rel=1e-12)
    uniform = train_groups(model, spec, lr, 0.0, "uniform")
    assert {g["lr"] for g in uniform} == {lr}
    with pytest.raises(ValueError, match=r"scale-lr must be one of \['relative', 'uniform'\]"):
        train_groups(model, spec, lr, 0.0, "fast")
