import copy
import json

import pytest
import torch
from conftest import BUILDERS, randomize_adapter_, tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lordba_fl import (
    LoRDBAConfig,
    LoRDBAFileError,
    attach_lordba_,
    export_peft_lora,
    load_lordba_,
    lordba_from_peft_lora,
    lordba_layers,
    quantize_base_,
    save_lordba,
)
from lordba_fl.methods.lordba.codec import packed_row_bytes


def _meta(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def _round_scales_to_fp16_(model):
    with torch.no_grad():
        for layer in lordba_layers(model).values():
            for s in layer.scale_names:
                layer.scale(s).copy_(layer.scale(s).half().float())


def _trained(arch="llama", scales=("in", "mid", "out"), rank=8):
    model = BUILDERS[arch]()
    attach_lordba_(model, LoRDBAConfig(rank=rank, alpha=16, scales=scales, ste="clipped"))
    randomize_adapter_(model)
    return model


@pytest.mark.parametrize("scales", [("in", "mid", "out"), ("mid", "out")])
def test_save_load_is_bit_exact(tmp_path, arch, ids, scales):
    model = _trained(arch, scales)
    _round_scales_to_fp16_(model)  # fp16 on disk: make the round trip exact for the comparison
    size = save_lordba(model, tmp_path / "a.safetensors")
    fresh = BUILDERS[arch]()
    cfg = load_lordba_(fresh, tmp_path / "a.safetensors")
    assert cfg.scales == scales and cfg.rank == 8 and cfg.ste == "clipped"
    src, dst = lordba_layers(model), lordba_layers(fresh)
    assert src.keys() == dst.keys()
    for name in src:
        a, b = src[name], dst[name]
        assert torch.equal(torch.sign(b.lordba_latent_A), torch.where(a.lordba_latent_A < 0, -1.0, 1.0))
        assert torch.equal(torch.sign(b.lordba_latent_B), torch.where(a.lordba_latent_B < 0, -1.0, 1.0))
        for s in scales:
            assert torch.equal(a.scale(s), b.scale(s))
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)
    # a second save of the loaded model holds identical bytes per tensor and identical metadata
    # (safetensors orders metadata keys by a hash map, so whole files are compared by content)
    save_lordba(fresh, tmp_path / "b.safetensors")
    ta, tb = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert _meta(tmp_path / "a.safetensors") == _meta(tmp_path / "b.safetensors")
    # and the data part is exactly the packed formula
    data = 0
    for layer in src.values():
        i, o, r = layer.in_features, layer.out_features, layer.rank
        data += r * packed_row_bytes(i) + o * packed_row_bytes(r)
        data += 2 * sum({"in": i, "mid": r, "out": o}[s] for s in scales)
    header = int.from_bytes((tmp_path / "a.safetensors").read_bytes()[:8], "little")
    assert size == 8 + header + data


def test_load_into_model_with_matching_adapter(tmp_path, ids):
    model = _trained()
    _round_scales_to_fp16_(model)
    save_lordba(model, tmp_path / "a.safetensors")
    other = tiny_llama()
    attach_lordba_(other, LoRDBAConfig(rank=8, alpha=16))
    load_lordba_(other, tmp_path / "a.safetensors")
    torch.testing.assert_close(other(ids).logits, model(ids).logits, rtol=0, atol=0)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, before):
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not lordba_layers(model)


def _rewrite(src, dst, edit_tensors=None, edit_meta=None):
    tensors = load_file(str(src))
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(dst), metadata=meta)


def _bad_files(tmp_path, good):
    raw = good.read_bytes()
    cases = {}
    cases["truncated"] = (tmp_path / "t.safetensors", "not a readable safetensors file")
    cases["truncated"][0].write_bytes(raw[: len(raw) - 100])
    cases["garbage"] = (tmp_path / "g.safetensors", "not a readable safetensors file")
    cases["garbage"][0].write_bytes(b"\x00\x01not a safetensors file" * 10)
    foreign = tmp_path / "f.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    cases["foreign"] = (foreign, "is not a LoRDBA adapter")

    def nan_scale(t):
        t["scale_out"][5] = float("nan")

    def wrong_shape(t):
        t["sign_A"] = t["sign_A"][:-1].clone()

    def extra(t):
        t["lora_A"] = torch.zeros(2)

    def missing(t):
        del t["scale_in"]

    for label, edit, msg in [
        ("nan", nan_scale, "NaN or Inf"),
        # sign_A: rank 8 x ceil(in / 8) bytes: 12 modules with in = 64 (64 B) + 2 down_proj with in = 96 (96 B) = 960
        ("shape", wrong_shape, "tensor 'sign_A' is torch.uint8 (959,), expected torch.uint8 (960,)"),
        ("extra", extra, "unexpected tensors"),
        ("missing", missing, "lacks tensor"),
    ]:
        p = tmp_path / f"{label}.safetensors"
        _rewrite(good, p, edit_tensors=edit)
        cases[label] = (p, msg)
    for label, key, value, msg in [
        ("version", "format_version", "99", "format_version '99'"),
        ("base", "base_fingerprint", "0123456789abcdef", "another base model"),
        ("modules", "modules", json.dumps([["model.layers.9.mlp.up_proj", 64, 96]]), "does not have"),
        ("dims", "modules", None, "in the file but"),
        ("config", "config", "{not json", "malformed metadata"),
    ]:
        p = tmp_path / f"{label}.safetensors"

        def edit_meta(m, key=key, value=value):
            if value is None:  # claim other dims for every module
                m["modules"] = json.dumps([[n, i + 32, o] for n, i, o in json.loads(m["modules"])])
            else:
                m[key] = value

        _rewrite(good, p, edit_meta=edit_meta)
        cases[label] = (p, msg)
    return cases


def test_bad_files_raise_and_leave_model_untouched(tmp_path):
    model = _trained()
    good = tmp_path / "good.safetensors"
    save_lordba(model, good)
    with pytest.raises(FileNotFoundError, match="save_lordba"):
        load_lordba_(tiny_llama(), tmp_path / "nope.safetensors")
    for label, (path, msg) in _bad_files(tmp_path, good).items():
        fresh = tiny_llama()
        before = _state(fresh)
        with pytest.raises(LoRDBAFileError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            load_lordba_(fresh, path)
        _assert_untouched(fresh, before)


def test_padding_bits_in_file_are_rejected(tmp_path):
    model = tiny_llama()
    attach_lordba_(model, LoRDBAConfig(rank=5, alpha=5))
    good = tmp_path / "good.safetensors"
    save_lordba(model, good)
    bad = tmp_path / "bad.safetensors"

    def edit(t):
        t["sign_B"][7] |= 0x80  # rank 5: bits 5..7 of every one-byte row are padding

    _rewrite(good, bad, edit_tensors=edit)
    fresh = tiny_llama()
    before = _state(fresh)
    with pytest.raises(LoRDBAFileError, match="padding bits"):
        load_lordba_(fresh, bad)
    _assert_untouched(fresh, before)


def test_wrong_base_detected_by_fingerprint(tmp_path):
    model = _trained()
    save_lordba(model, tmp_path / "a.safetensors")
    other_base = tiny_llama(seed=1)  # same architecture, other weights
    with pytest.raises(LoRDBAFileError, match="another base model"):
        load_lordba_(other_base, tmp_path / "a.safetensors")
    load_lordba_(other_base, tmp_path / "a.safetensors", check_base=False)
    assert lordba_layers(other_base)


def test_fingerprint_ignores_quantization_and_dtype():
    from lordba_fl.adapter.storage import base_fingerprint

    a = tiny_llama()
    b = quantize_base_(tiny_llama(), "nf4")
    c = tiny_llama().to(torch.bfloat16)
    assert base_fingerprint(a) == base_fingerprint(b) == base_fingerprint(c) != base_fingerprint(tiny_llama(seed=1))


@pytest.mark.parametrize("scales", [("in", "mid", "out"), ("out",)])
def test_peft_export_reproduces_logits(tmp_path, arch, ids, scales):
    from peft import PeftModel

    base = BUILDERS[arch]()
    model = copy.deepcopy(base)
    attach_lordba_(model, LoRDBAConfig(rank=8, alpha=16, scales=scales))
    randomize_adapter_(model)
    export_peft_lora(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["peft_type"] == "LORA"
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    ours, theirs = model(ids).logits, peft_model(ids).logits
    with peft_model.disable_adapter():
        base_logits = peft_model(ids).logits
    assert (ours - base_logits).abs().max() > 1e-3  # the adapter really changes the output
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_export_on_nf4_base_matches_peft_on_the_same_base(tmp_path, ids):
    from peft import PeftModel

    base = quantize_base_(tiny_llama(), "nf4")
    model = copy.deepcopy(base)
    attach_lordba_(model, LoRDBAConfig(rank=8, alpha=16))
    randomize_adapter_(model)
    export_peft_lora(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    # inference on both sides: on CPUs with AVX-512 BF16, bitsandbytes takes a bf16 fast path only for
    # inputs that need no grad, so a grad-tracking forward would compare two different base kernels
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)


def test_lordba_from_peft_lora_reports_true_errors(tmp_path, ids):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    lora.save_pretrained(tmp_path / "lora")
    dense = {}
    for name, module in lora.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            dense[name] = module.get_delta_weight("default").detach()

    model = copy.deepcopy(base)
    errors = lordba_from_peft_lora(model, tmp_path / "lora")
    layers = lordba_layers(model)
    assert set(errors) == set(dense) == set(layers) and len(errors) == 4
    for name, err in errors.items():
        dw = layers[name].delta_weight()
        expect = float((dense[name] - dw).norm() / dense[name].norm())
        assert err == pytest.approx(expect, rel=1e-4)
        assert 0 < err < 1
    # more sweeps of the closed-form scale refit never hurt
    model0 = copy.deepcopy(base)
    errors0 = lordba_from_peft_lora(model0, tmp_path / "lora", LoRDBAConfig(svd_sweeps=1))
    assert all(errors[n] <= errors0[n] + 1e-9 for n in errors)


def test_svd_init_is_exact_for_a_rank_one_sign_product():
    from lordba_fl.adapter.fit import fit_lordba

    g = torch.Generator().manual_seed(0)
    s2 = torch.where(torch.rand(24, 1, generator=g) < 0.5, -1.0, 1.0)
    s1 = torch.where(torch.rand(1, 40, generator=g) < 0.5, -1.0, 1.0)
    s_out, s_in = torch.rand(24, generator=g) + 0.5, torch.rand(40, generator=g) + 0.5
    target = s_out[:, None] * (s2 * 0.7) @ s1 * s_in[None, :]  # (24, 40), rank one
    l1, l2, scales, err = fit_lordba(target, 1, ("in", "mid", "out"), sweeps=10)
    assert err < 1e-6
    approx = scales["out"][:, None] * (torch.sign(l2) * scales["mid"]) @ torch.sign(l1) * scales["in"][None, :]
    torch.testing.assert_close(approx, target, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("names", [("in", "mid", "out"), ("mid", "out"), ("in", "out")])
def test_an_imported_adapter_starts_in_a_fresh_adapters_gauge_with_the_same_product(names):
    from lordba_fl.adapter.fit import _product, normalize_gauge, svd_init_
    from lordba_fl.adapter.layer import LoRDBALinear, initial_scale_values

    cfg = LoRDBAConfig(rank=4, alpha=8.0, scales=names)
    g = torch.Generator().manual_seed(3)
    target = torch.randn(24, 4, generator=g) @ torch.randn(4, 40, generator=g) * 1e-3  # (out, in)
    layer = LoRDBALinear(nn.Linear(40, 24), cfg)
    err = svd_init_(layer, target)
    fresh = initial_scale_values(cfg, 40, 24)
    inner = [n for n in ("in", "mid", "out") if n in names][:-1]
    for n in inner:  # every scale but the outermost has the rms a fresh adapter starts at
        rms = float(layer.scale(n).detach().double().square().mean().sqrt())
        assert rms == pytest.approx(fresh[n], rel=1e-5)
    one = lambda n: torch.ones(n, dtype=torch.float64)  # noqa: E731
    sc = {k: (layer.scale(k).detach().double() if k in names else one(m)) for k, m in (("in", 40), ("mid", 4), ("out", 24))}
    approx = _product(torch.sign(layer.lordba_latent_B.detach().double()), sc["mid"],
                      torch.sign(layer.lordba_latent_A.detach().double()),
                      sc["out"], sc["in"]) * layer.scaling
    assert float((approx - target).norm() / target.norm()) == pytest.approx(err, abs=1e-5)
    # moving the gauge by hand: the product is the same up to rounding; a zero scale is left alone
    sc = {"in": torch.rand(40, generator=g) + 2, "mid": torch.rand(4, generator=g) * 9, "out": torch.rand(24, generator=g)}
    moved = normalize_gauge(sc, {"in": 0.1, "mid": 0.5})
    s1, s2 = torch.sign(torch.randn(4, 40, generator=g)), torch.sign(torch.randn(24, 4, generator=g))
    torch.testing.assert_close(_product(s2, moved["mid"], s1, moved["out"], moved["in"]),
                               _product(s2, sc["mid"], s1, sc["out"], sc["in"]), rtol=1e-5, atol=1e-7)
    assert float(moved["in"].square().mean().sqrt()) == pytest.approx(0.1, rel=1e-5)
    assert float(moved["mid"].square().mean().sqrt()) == pytest.approx(0.5, rel=1e-5)
    zero = normalize_gauge({"mid": torch.zeros(4), "out": torch.ones(24)}, {"mid": 0.5})
    assert torch.equal(zero["mid"], torch.zeros(4)) and torch.equal(zero["out"], torch.ones(24))


def test_peft_import_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        lordba_from_peft_lora(tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(LoRDBAFileError, match="only PEFT LoRA"):
        lordba_from_peft_lora(tiny_llama(), tmp_path)


@pytest.mark.parametrize("r, a_shape, b_shape, match", [
    (0, (0, 8), (8, 0), "r = 0"),
    (2, (3, 8), (8, 3), r"rank 2 needs \(2, in\)"),
    (1, (1, 400_000), (400_000, 1), "past the"),  # a 3 MB file asking for a 160 GB update
])
def test_peft_import_checks_shapes_before_multiplying(tmp_path, r, a_shape, b_shape, match):
    from safetensors.torch import save_file

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 2}))
    save_file({"base_model.model.l.lora_A.weight": torch.zeros(a_shape),
               "base_model.model.l.lora_B.weight": torch.zeros(b_shape)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(LoRDBAFileError, match=match):
        lordba_from_peft_lora(tiny_llama(), tmp_path)
