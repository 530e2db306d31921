import pytest
import torch
from conftest import randomize_adapter_, tiny_llama

from lordba_fl import LoRDBAConfig, attach_lordba_, lordba_layers
from lordba_fl.methods.lordba.codec import decode_state, encode_state
from lordba_fl.methods.lordba.layout import (
    AdapterSpec,
    AdapterState,
    LayerSpec,
    read_latents,
    read_state,
    split_carriers,
    split_scales,
    write_latents_,
    write_state_,
)


def _model(rank=4, scales=("in", "mid", "out"), alpha=None, seed=0):
    model = tiny_llama(seed=0)
    attach_lordba_(model, LoRDBAConfig(rank=rank, scales=scales, alpha=alpha or 2 * rank, seed=seed))
    randomize_adapter_(model, seed)
    return model


def test_spec_from_model_matches_layers():
    model = _model()
    spec = AdapterSpec.from_model(model)
    layers = lordba_layers(model)
    assert [l.name for l in spec.layers] == list(layers)
    # tiny llama: 2 layers x 7 targets; hidden 64, kv 32, inter 96
    assert spec.n_bits == sum(4 * (m.in_features + m.out_features) for m in layers.values())
    assert spec.n_scales == sum(m.in_features + 4 + m.out_features for m in layers.values())
    assert AdapterSpec.from_model(_model(seed=3)).fingerprint == spec.fingerprint  # same base, same scaling
    assert AdapterSpec.from_model(_model(alpha=1)).fingerprint != spec.fingerprint  # scaling changes meaning
    with pytest.raises(ValueError, match="attach_lordba_"):
        AdapterSpec.from_model(tiny_llama())


def test_read_state_is_the_models_adapter():
    model = _model()
    spec = AdapterSpec.from_model(model)
    state = read_state(model, spec, version=7)
    carriers, scales = split_carriers(spec, state.signs()), split_scales(spec, state.scales)
    for name, m in lordba_layers(model).items():
        a, b = carriers[name]
        assert torch.equal(a, torch.where(m.lordba_latent_A < 0, -1.0, 1.0))
        assert torch.equal(b, torch.where(m.lordba_latent_B < 0, -1.0, 1.0))
        for kind in spec.scales:
            assert torch.equal(scales[name][kind], m.scale(kind))


def test_write_state_sets_latents_and_reproduces_outputs():
    src, dst = _model(seed=1), _model(seed=2)
    spec = AdapterSpec.from_model(src)
    state = read_state(src, spec, version=3)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    write_state_(dst, spec, state, latent_magnitude=0.01)
    lat = read_latents(dst, spec)
    assert torch.equal(lat.abs(), torch.full_like(lat, 0.01)) and torch.equal(lat < 0, state.negative)
    with torch.no_grad():
        assert torch.allclose(src(ids).logits, dst(ids).logits, atol=1e-5)
    # through the wire (fp16 scales): the same signs, scales rounded to fp16
    got = decode_state(encode_state(state, spec), spec)
    assert torch.equal(got.negative, state.negative) and torch.equal(got.scales, state.scales.half().float())


def test_write_state_keeps_magnitudes_of_a_stateful_client():
    model = _model(seed=1)
    spec = AdapterSpec.from_model(model)
    lat = read_latents(model, spec)
    flip = torch.zeros(spec.n_bits, dtype=torch.bool)
    flip[::5] = True
    state = AdapterState(1, (lat < 0) ^ flip, torch.ones(spec.n_scales))
    write_state_(model, spec, state)
    new = read_latents(model, spec)
    assert torch.equal(new.abs(), lat.abs()) and torch.equal(new < 0, state.negative)
    # a zero latent still carries a -1
    zero_model = _model(seed=1)
    with torch.no_grad():
        for m in lordba_layers(zero_model).values():
            m.lordba_latent_A.zero_()
    write_state_(zero_model, spec, AdapterState(1, torch.ones(spec.n_bits, dtype=torch.bool), torch.ones(spec.n_scales)))
    assert bool((read_latents(zero_model, spec) < 0).all())


def test_mismatched_model_and_state_are_refused():
    model = _model(rank=4)
    spec = AdapterSpec.from_model(model)
    with pytest.raises(ValueError, match="do not match the spec"):
        read_state(_model(rank=8), spec)
    with pytest.raises(ValueError, match="trains scales"):
        read_state(_model(scales=("out",)), spec)
    with pytest.raises(ValueError, match="state has shapes"):
        write_state_(model, spec, AdapterState(0, torch.zeros(3, dtype=torch.bool), torch.ones(spec.n_scales)))
    with pytest.raises(ValueError, match="latent_magnitude"):
        write_state_(model, spec, read_state(model, spec), latent_magnitude=0.0)


@pytest.mark.parametrize(
    "layers, scales, fp, match",
    [
        ((), ("in",), b"x" * 16, "at least one layer"),
        ((LayerSpec("a", 1, 1, 1),), ("in",), b"x", "16 bytes"),
        ((LayerSpec("a", 1, 1, 1),), ("out", "in"), b"x" * 16, "ordered subset"),
        ((LayerSpec("a", 1, 1, 1), LayerSpec("a", 2, 2, 1)), ("in",), b"x" * 16, "unique"),
        ((LayerSpec("a", 0, 1, 1),), ("in",), b"x" * 16, "positive"),
    ],
)
def test_bad_specs(layers, scales, fp, match):
    with pytest.raises(ValueError, match=match):
        AdapterSpec(layers, scales, fp)


def test_write_latents_is_the_inverse_of_read_latents():
    model = _model(seed=1)
    spec = AdapterSpec.from_model(model)
    flat = torch.randn(spec.n_bits, generator=torch.Generator().manual_seed(3))
    write_latents_(model, spec, flat)
    assert torch.equal(read_latents(model, spec), flat)
    with pytest.raises(ValueError, match="carrier stream"):
        write_latents_(model, spec, flat[:-1])
