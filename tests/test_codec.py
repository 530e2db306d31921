import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from lordba_fl.adapter.packing import _pack_bits_torch
from lordba_fl.methods.lordba.codec import (
    HEADER_BYTES,
    BaseVersionError,
    CodecError,
    CodecOptions,
    FrameKind,
    MalformedFrameError,
    ModelMismatchError,
    ScaleEncoding,
    SignEncoding,
    Update,
    decode_bits,
    encode_bits,
    decode_state,
    decode_update,
    encode_state,
    encode_update,
    pack_bits,
    pack_signs,
    packed_row_bytes,
    read_header,
    scale_roundtrip,
    train_dictionary,
    unpack_bits,
    unpack_signs,
)
from lordba_fl.methods.lordba.layout import AdapterSpec, AdapterState, LayerSpec, split_carriers


def test_bit_order_by_hand():
    # row: -1 at columns 0, 3 and 9 of 10 -> byte 0 = 1 + 8 = 9, byte 1 = bit 1 = 2
    signs = torch.ones(1, 10)
    signs[0, [0, 3, 9]] = -1
    assert pack_signs(signs).tolist() == [[9, 2]]
    assert torch.equal(unpack_signs(torch.tensor([[9, 2]], dtype=torch.uint8), 10), signs)


def test_zero_is_plus_one_and_zero_buffer_is_all_plus():
    assert pack_signs(torch.zeros(3, 5)).sum() == 0
    assert torch.equal(unpack_signs(torch.zeros(2, 1, dtype=torch.uint8), 7), torch.ones(2, 7))


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(0, 17), cols=st.integers(1, 70), p=st.floats(0, 1), seed=st.integers(0, 2**31 - 1))
def test_round_trip_exact_any_shape(rows, cols, p, seed):
    g = torch.Generator().manual_seed(seed)
    bits = torch.rand(rows, cols, generator=g) < p
    packed = pack_bits(bits)
    assert packed.shape == (rows, packed_row_bytes(cols)) and packed.dtype == torch.uint8
    assert torch.equal(unpack_bits(packed, cols), bits)
    # flips are XORs of packed buffers
    other = torch.rand(rows, cols, generator=g) < 0.5
    assert torch.equal(unpack_bits(packed ^ pack_bits(other), cols), bits ^ other)


def test_set_padding_bits_and_bad_widths_are_rejected():
    with pytest.raises(CodecError, match="padding bits"):
        unpack_bits(torch.tensor([[0b1000_0000]], dtype=torch.uint8), 7)
    with pytest.raises(CodecError, match="bytes per row"):
        unpack_bits(torch.zeros(2, 3, dtype=torch.uint8), 8)
    with pytest.raises(CodecError, match="2-D uint8"):
        unpack_bits(torch.zeros(2, 3, dtype=torch.int32), 24)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    bits = torch.rand(33, 77) < 0.3
    assert torch.equal(pack_bits(bits.cuda()).cpu(), pack_bits(bits))
    assert torch.equal(unpack_bits(pack_bits(bits).cuda(), 77).cpu(), bits)


@settings(max_examples=100, deadline=None)
@given(rows=st.integers(0, 9), cols=st.integers(1, 70), seed=st.integers(0, 2**31 - 1))
def test_numpy_and_torch_packing_paths_agree(rows, cols, seed):
    # CPU tensors pack through numpy; other devices through the torch path: one format for both
    bits = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)) < 0.4
    assert torch.equal(pack_bits(bits), _pack_bits_torch(bits))


# ------------------------------------------------------------------------------------------------
# Frames


def _spec(shapes=((13, 7, 3), (8, 21, 3), (1, 1, 3)), scales=("in", "mid", "out"), fingerprint=b"f" * 16):
    layers = tuple(LayerSpec(f"layers.{i}.proj", i_, o_, r) for i, (i_, o_, r) in enumerate(shapes))
    return AdapterSpec(layers, scales, fingerprint)


def _update(spec, p, seed=0, scale=1e-2, round=4, version=3):
    g = torch.Generator().manual_seed(seed)
    flips = torch.rand(spec.n_bits, generator=g) < p
    return Update(round, version, flips, torch.randn(spec.n_scales, generator=g) * scale)


def test_spec_layout_by_hand():
    spec = _spec()
    # carriers r * (in + out): 3 * 20, 3 * 29, 3 * 2; scales in + r + out: 23, 32, 5
    assert spec.n_bits == 60 + 87 + 6 and spec.n_scales == 23 + 32 + 5
    assert spec.carrier_offsets.tolist() == [0, 60, 147, 153]
    assert spec.scale_segments.tolist() == [13, 3, 7, 8, 3, 21, 1, 3, 1]
    assert spec.fp16_lora_bytes() == 2 * 153
    flat = torch.arange(spec.n_bits)
    a, b = split_carriers(spec, flat)["layers.1.proj"]
    assert a.shape == (3, 8) and b.shape == (21, 3) and a[0, 0] == 60 and b[0, 0] == 60 + 24


def test_header_layout_by_hand():
    spec = _spec()
    frame = encode_update(_update(spec, 0.1), spec)
    assert frame[:4] == b"LDBA" and int.from_bytes(frame[4:6], "little") == 1 and frame[6] == FrameKind.UPDATE
    assert frame[8:24] == b"f" * 16
    assert int.from_bytes(frame[24:28], "little") == 4 and int.from_bytes(frame[28:32], "little") == 3
    h = read_header(frame)
    assert HEADER_BYTES == 92 and h.total_bytes == len(frame) and h.n_bits == 153 and h.n_layers == 3


def test_run_length_sign_coding_by_hand():
    bits = np.zeros(2000, dtype=bool)
    bits[[0, 2, 1000]] = True  # gaps 0, 1, 997 = 3 * 255 + 232
    enc, n_set, raw = encode_bits(bits)
    assert enc == SignEncoding.GAPS and n_set == 3 and list(raw) == [0, 1, 255, 255, 255, 232]
    assert np.array_equal(decode_bits(enc, raw, 2000, 3), bits)
    # dense masks are bit-packed, LSB first
    dense = np.zeros(10, dtype=bool)
    dense[[0, 3, 4, 5, 9]] = True
    enc, n_set, raw = encode_bits(dense)
    assert enc == SignEncoding.PACKED and n_set == 5 and list(raw) == [1 + 8 + 16 + 32, 2]
    assert encode_bits(np.zeros(77, dtype=bool)) == (SignEncoding.GAPS, 0, b"")


@settings(max_examples=150, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40), st.integers(1, 9)), min_size=1, max_size=4),
    p=st.floats(0, 1),
    encoding=st.sampled_from(["fp16", "q8", "q4", "q3", "q2"]),
    scales=st.sampled_from([("in", "mid", "out"), ("mid", "out"), ("in",)]),
    seed=st.integers(0, 2**31 - 1),
)
def test_update_round_trip(shapes, p, encoding, scales, seed):
    spec = _spec(tuple(shapes), scales)
    update = _update(spec, p, seed)
    opts = CodecOptions(scale_encoding=encoding)
    frame = encode_update(update, spec, opts, rng=seed)
    out = decode_update(frame, spec, opts)
    assert (out.round, out.version) == (4, 3)
    assert torch.equal(out.flips, update.flips)  # bit-exact
    if encoding == "fp16":
        assert torch.equal(out.scale_delta, update.scale_delta.half().float())
    else:
        # every value on its segment's grid q * step, |q| <= L, within one step of the truth
        levels = {"q8": 127, "q4": 7, "q3": 3, "q2": 1}[encoding]
        steps = torch.from_numpy(np.repeat(np.frombuffer(_q8_steps(frame, spec, opts), np.float16).astype(np.float32), spec.scale_segments))
        q = torch.where(steps > 0, out.scale_delta / steps, torch.zeros_like(steps))
        assert torch.equal(q, q.round()) and q.abs().max() <= levels
        assert bool(((out.scale_delta - update.scale_delta).abs() <= steps).all())
        # what the client computes for error feedback is exactly what the server decodes
        assert np.array_equal(scale_roundtrip(update.scale_delta, spec, opts, seed), out.scale_delta.numpy())


def _q8_steps(frame, spec, opts):
    h = read_header(frame)
    o = HEADER_BYTES + h.table_comp + h.sign_comp
    raw = zstandard.ZstdDecompressor().decompress(frame[o:])
    return raw[: 2 * spec.scale_segments.size]


def test_q8_step_and_stochastic_rounding_by_hand():
    spec = _spec(((2, 1, 1),), ("in",))  # one segment of 2 values
    delta = torch.tensor([1.27, -0.5])
    # step = 1.27 / 127 = 0.01 rounded *up* to fp16: the grid near 0.01 is k * 2**-17, and
    # 1310 * 2**-17 = 0.0099945 < 0.01 <= 1311 * 2**-17 = 0.0100021
    want_step = np.float16(1311 * 2**-17)
    assert float(want_step) == 1311 * 2**-17 and 1310 * 2**-17 < 0.01 < float(want_step)
    frame = encode_update(Update(0, 0, torch.zeros(spec.n_bits, dtype=torch.bool), delta), spec, CodecOptions(scale_encoding="q8"), rng=0)
    assert np.frombuffer(_q8_steps(frame, spec, None), np.float16)[0] == want_step
    # unbiased: the mean over many independent roundings converges to the value
    outs = torch.stack([
        decode_update(encode_update(Update(0, 0, torch.zeros(spec.n_bits, dtype=torch.bool), delta), spec, CodecOptions(scale_encoding="q8"), rng=s), spec, CodecOptions(scale_encoding="q8")).scale_delta
        for s in range(2000)
    ])
    step = float(want_step)
    # each value takes one of its two neighbouring grid points, with mean error < 4 sigma of the mean
    assert set(torch.unique(outs[:, 1] / step).round().tolist()) <= {-50.0, -49.0}
    assert abs(float(outs[:, 1].mean()) + 0.5) < 4 * step / 2 / np.sqrt(2000)
    assert abs(float(outs[:, 0].mean()) - 1.27) < 4 * step / 2 / np.sqrt(2000)


@pytest.mark.parametrize("encoding, levels", [("q4", 7), ("q3", 3), ("q2", 1)])
def test_low_bit_scale_codes_by_hand(encoding, levels):
    spec = _spec(((3, 1, 1),), ("in",))  # one segment of 3 values
    delta = torch.tensor([0.7, -0.35, 0.0])
    opts = CodecOptions(scale_encoding=encoding)
    flips = torch.zeros(spec.n_bits, dtype=torch.bool)
    outs = torch.stack([decode_update(encode_update(Update(0, 0, flips, delta), spec, opts, rng=s), spec, opts).scale_delta
                        for s in range(2000)])
    step = float(np.float16(0.7 / levels)) if np.float16(0.7 / levels) >= 0.7 / levels else float(
        np.nextafter(np.float16(0.7 / levels), np.float16(1)))  # 0.7 / L rounded up to fp16
    assert torch.equal(outs[:, 2], torch.zeros(2000))  # a zero delta is sent as exactly zero
    grid = set(torch.unique(outs[:, 1] / step).round().tolist())
    lo = np.floor(-0.35 / step)
    assert grid <= {lo, lo + 1}  # one of its two neighbouring grid points
    for i, v in enumerate(delta.tolist()):  # unbiased: within 4 sigma of the mean
        assert abs(float(outs[:, i].mean()) - v) < 4 * step / 2 / np.sqrt(2000) + 1e-7
    frame = encode_update(Update(0, 0, flips, delta), spec, opts, rng=0)
    assert len(_q8_steps(frame, spec, opts)) == 2  # one fp16 step, then ceil(3 * bits / 8) code bytes
    h = read_header(frame)  # 3 codes in 4-bit fields (q4, q3) or 2-bit ones (q2): 2 or 1 bytes after the step
    assert h.scale_raw == 2 + {7: 2, 3: 2, 1: 1}[levels]


@pytest.mark.parametrize("bits", [2, 4])
def test_nearest_rounded_uplink_codes_by_hand(bits):
    """codec.scale-rounding = nearest: deterministic codes, per segment the candidate step (max |x| / L
    times 2^(-j/2)) with the least squared error; small deltas go to zero; decoded like stochastic ones."""
    from lordba_fl.wire.codes import fp16_round

    spec = _spec(((4, 1, 1),), ("in",))  # one segment of 4 values
    delta = torch.tensor([0.1, -0.02, 0.01, 0.0])
    flips = torch.zeros(spec.n_bits, dtype=torch.bool)
    opts = CodecOptions(scale_encoding=f"q{bits}", scale_rounding="nearest")
    levels = (1 << (bits - 1)) - 1
    frames = {encode_update(Update(0, 0, flips, delta), spec, opts, rng=s) for s in range(5)}
    assert len(frames) == 1  # no randomness
    got = decode_update(frames.pop(), spec, opts).scale_delta.numpy()
    if bits == 2:  # j = 0 (step 0.1): error 0.02^2 + 0.01^2; j = 1 (0.0707): 0.0293^2 + 0.02^2 + 0.01^2
        step = fp16_round(np.float32([0.1]), up=True).astype(np.float32)[0]
        np.testing.assert_array_equal(got, np.float32([step, 0.0, 0.0, 0.0]))
    # whatever step wins, the squared error is never above the no-clip step's nearest rounding
    # (one of the candidates)
    no_clip = fp16_round(np.float32([0.1 / levels]), up=True).astype(np.float32)[0]
    plain = np.clip(np.rint(delta.numpy() / no_clip), -levels, levels) * no_clip
    assert float(((got - delta.numpy()) ** 2).sum()) <= float(((plain - delta.numpy()) ** 2).sum())
    with pytest.raises(ValueError, match="scale_rounding"):
        CodecOptions(scale_rounding="down")


def test_scale_code_benchmark_by_hand(tmp_path):
    """bench scale_codes: deltas between the checkpoint's kept versions, and one delta's error and codes."""
    import json

    from safetensors.numpy import save_file

    from lordba_fl.wire.codes import fp16_round
    from simulations.bench_scale_codes import code_entropy_bits, measure, version_deltas

    assert code_entropy_bits(np.array([0, 0, 1, -1])) == 1.5
    v = [np.float32([1.0, 2.0]), np.float32([1.5, 1.0]), np.float32([1.25, 1.0])]
    save_file({"history_scales.1": v[1], "history_scales.0": v[0], "scales": v[2], "negative": np.zeros(3, bool)},
              str(tmp_path / "ckpt-3.safetensors"))
    (tmp_path / "latest.json").write_text(json.dumps({"round": 3}))
    got = version_deltas(tmp_path)
    assert [d.tolist() for d in got] == [[0.5, -1.0], [-0.25, 0.0]]
    spec = _spec(((4, 1, 1),), ("in",))
    delta = np.float32([0.1, -0.02, 0.01, 0.0])
    rec = measure(spec, [delta], "q2", "nearest")
    step = float(fp16_round(np.float32([0.1]), up=True)[0])  # the least-squares step here (see above)
    want = ((0.1 - step) ** 2 + 0.02 ** 2 + 0.01 ** 2) / float((delta.astype(np.float64) ** 2).sum())
    assert rec["rel_sq_error"] == pytest.approx(want, rel=1e-6) and rec["nonzero"] == 0.25


def test_low_bit_scale_sections_with_bad_codes_are_refused():
    from lordba_fl.methods.lordba.codec import _decode_q, pack_codes

    seg = np.array([3])
    step = np.float16(0.1).tobytes()
    Q4, Q3, Q2 = ScaleEncoding.Q4, ScaleEncoding.Q3, ScaleEncoding.Q2
    assert np.allclose(_decode_q(step + pack_codes(np.array([0, 7, 14]), 4).tobytes(), seg, Q4), [-0.7, 0.0, 0.7], atol=1e-3)
    with pytest.raises(MalformedFrameError, match="outside"):
        _decode_q(step + pack_codes(np.array([0, 15, 14]), 4).tobytes(), seg, Q4)  # 15: code 8, past 7
    # q3: 4-bit fields holding code + 3 in 0..6
    assert np.allclose(_decode_q(step + pack_codes(np.array([0, 3, 6]), 4).tobytes(), seg, Q3), [-0.3, 0.0, 0.3], atol=1e-3)
    with pytest.raises(MalformedFrameError, match=r"q3 scale section has a code outside \[-3, 3\]"):
        _decode_q(step + pack_codes(np.array([0, 7, 6]), 4).tobytes(), seg, Q3)  # 7: code 4, past 3
    with pytest.raises(MalformedFrameError, match="padding"):
        _decode_q(step + bytes([0b11_01_01_01]), seg, Q2)  # the 4th 2-bit field is padding and must be 0


def test_sparse_updates_are_run_length_coded_and_small():
    spec = _spec(((512, 512, 16),))
    sparse = encode_update(_update(spec, 0.01, scale=0.0), spec)
    dense = encode_update(_update(spec, 0.5, scale=0.0), spec)
    assert read_header(sparse).sign_encoding == SignEncoding.GAPS
    assert read_header(dense).sign_encoding == SignEncoding.PACKED
    n = spec.n_bits
    entropy = n * -(0.01 * np.log2(0.01) + 0.99 * np.log2(0.99)) / 8
    assert read_header(sparse).sign_comp < 1.5 * entropy
    assert read_header(dense).sign_comp <= n // 8 + 64  # incompressible, stored


def test_state_full_and_delta_round_trip_across_missed_versions():
    spec = _spec()
    g = torch.Generator().manual_seed(1)
    v0 = AdapterState(0, torch.rand(spec.n_bits, generator=g) < 0.5, torch.randn(spec.n_scales, generator=g))
    v3 = AdapterState(3, v0.negative ^ (torch.rand(spec.n_bits, generator=g) < 0.05), torch.randn(spec.n_scales, generator=g))
    full = decode_state(encode_state(v3, spec, round=3), spec)
    assert full.version == 3 and torch.equal(full.negative, v3.negative)
    assert torch.equal(full.scales, v3.scales.half().float())
    before = v0.clone()
    delta_frame = encode_state(v3, spec, round=3, base=v0)  # the client missed versions 1 and 2
    assert read_header(delta_frame).kind == FrameKind.STATE_DELTA and read_header(delta_frame).base_version == 0
    got = decode_state(delta_frame, spec, base=v0)
    assert got.equals(full) and v0.equals(before)  # base untouched
    with pytest.raises(BaseVersionError, match="request the full state"):
        decode_state(delta_frame, spec, base=AdapterState(2, v0.negative, v0.scales))
    with pytest.raises(BaseVersionError):
        decode_state(delta_frame, spec)


def test_state_delta_scales_are_fp16_xor_of_the_held_ones_and_cost_little_when_they_barely_move():
    spec = _spec(((256, 192, 8),))
    g = torch.Generator().manual_seed(2)
    v1 = AdapterState(1, torch.rand(spec.n_bits, generator=g) < 0.5, torch.rand(spec.n_scales, generator=g) + 0.5)
    same = AdapterState(2, v1.negative.clone(), v1.scales.clone())
    nudged = AdapterState(2, v1.negative.clone(), v1.scales * (1 + 1e-3 * torch.randn(spec.n_scales, generator=g)))
    for new in (same, nudged):
        frame = encode_state(new, spec, base=v1)
        h = read_header(frame)
        assert h.scale_encoding == ScaleEncoding.FP16_XOR
        got = decode_state(frame, spec, base=v1)
        assert torch.equal(got.scales, new.scales.half().float())  # exact, like a full frame
        raw = zstandard.ZstdDecompressor().decompress(frame[-h.scale_comp:])
        want = (new.scales.half().numpy().view(np.uint16) ^ v1.scales.half().numpy().view(np.uint16))
        assert raw == want.view(np.uint8).reshape(-1, 2).T.tobytes()  # low bytes, then high bytes
    full = read_header(encode_state(nudged, spec)).scale_comp
    assert read_header(encode_state(same, spec, base=v1)).scale_comp < 64  # all zeros
    assert read_header(encode_state(nudged, spec, base=v1)).scale_comp < 0.7 * full  # high bytes mostly zero


def test_dictionary_is_used_and_must_match():
    spec = _spec(((64, 64, 8),))
    samples = [encode_update(_update(spec, 0.02, seed=s), spec)[HEADER_BYTES:] for s in range(40)]
    dictionary = train_dictionary(samples, size=4096)
    opts = CodecOptions(dictionary=dictionary)
    update = _update(spec, 0.02, seed=99)
    frame = encode_update(update, spec, opts)
    assert read_header(frame).dict_id == opts.dict_id != 0
    assert torch.equal(decode_update(frame, spec, opts).flips, update.flips)
    with pytest.raises(ModelMismatchError, match="dictionary"):
        decode_update(frame, spec, CodecOptions())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"level": 30}, "level"),
        ({"scale_encoding": "int4"}, "scale_encoding"),
        ({"dictionary": "abc"}, "dictionary"),
    ],
)
def test_bad_codec_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CodecOptions(**kwargs)
    with pytest.raises(ValueError, match="unknown codec option"):
        CodecOptions.from_dict({"levle": 3})


def test_encoder_rejects_bad_updates():
    spec = _spec()
    u = _update(spec, 0.1)
    with pytest.raises(ValueError, match="non-finite"):
        encode_update(Update(0, 0, u.flips, torch.full((spec.n_scales,), float("nan"))), spec)
    with pytest.raises(ValueError, match="overflows fp16"):
        encode_update(Update(0, 0, u.flips, torch.full((spec.n_scales,), 1e6)), spec)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        encode_update(Update(0, 0, u.flips[:-1], u.scale_delta), spec)
    with pytest.raises(ValueError, match="scale-stream"):
        encode_update(Update(0, 0, u.flips, u.scale_delta[:-1]), spec)
    with pytest.raises(ValueError, match="round"):
        encode_update(Update(-1, 0, u.flips, u.scale_delta), spec)


@pytest.mark.parametrize("bits16, want", [(0x3C01, 0x3C00), (0x3C05, 0x3C08), (0x3C04, 0x3C00), (0x3C0C, 0x3C10),
                                          (0xBC0D, 0xBC10), (0x7BFF, 0x7BF8)])
def test_state_mantissa_rounding_by_hand(bits16, want):
    """7 of 10 mantissa bits: nearest, ties to even; never rounded up past fp16's largest value."""
    spec = _spec(((8, 8, 1),))
    value = np.array([bits16], dtype=np.uint16).view(np.float16).astype(np.float32)
    state = AdapterState(1, torch.zeros(spec.n_bits, dtype=torch.bool), torch.from_numpy(np.resize(value, spec.n_scales)))
    opts = CodecOptions(state_mantissa_bits=7)
    got = decode_state(encode_state(state, spec, opts), spec, opts).scales.numpy().astype(np.float16).view(np.uint16)
    assert got.tolist() == [want] * spec.n_scales
    base = AdapterState(0, state.negative, torch.ones(spec.n_scales))
    delta = decode_state(encode_state(state, spec, opts, base=base), spec, opts, base=base)
    assert delta.scales.numpy().astype(np.float16).view(np.uint16).tolist() == [want] * spec.n_scales
    with pytest.raises(ValueError, match="state_mantissa_bits"):
        CodecOptions(state_mantissa_bits=11)


@pytest.mark.parametrize("bits, codes", [(2, [1, -1, 0, 0]), (4, [6, -7, 1, 0])])
def test_quantized_state_delta_by_hand(bits, codes):
    """codec.state-scale-encoding q2 / q4: the difference to the receiver's scales as nearest-rounded
    codes; of the candidate steps (max |x| / L times 2^(-j/2)) the one with the least squared error."""
    from lordba_fl.wire.codes import fp16_round

    spec = _spec(((5, 4, 1),), scales=("out",))
    opts = CodecOptions(state_mantissa_bits=10, state_scale_encoding=f"q{bits}")
    neg = torch.zeros(spec.n_bits, dtype=torch.bool)
    base = AdapterState(1, neg, torch.full((4,), 2.0))
    target = AdapterState(2, neg, torch.tensor([2.9, 1.0, 2.1, 2.0]))  # differences 0.9, -1, 0.1, 0
    frame = encode_state(target, spec, opts, base=base)
    assert read_header(frame).scale_encoding == {2: ScaleEncoding.Q2, 4: ScaleEncoding.Q4}[bits]
    got = decode_state(frame, spec, opts, base=base)
    step = fp16_round(np.float32([1.0 / ((1 << (bits - 1)) - 1)]), up=True).astype(np.float32)  # no clipping wins here
    want = (np.float32(2.0) + np.array(codes, np.float32) * step).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got.scales.numpy(), want)
    assert got.version == 2 and torch.equal(got.negative, neg)
    # a full frame is fp16 whatever the delta encoding
    assert read_header(encode_state(target, spec, opts)).scale_encoding == ScaleEncoding.FP16
    with pytest.raises(ValueError, match="state_scale_encoding"):
        CodecOptions(state_scale_encoding="q5")


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantized_state_deltas_never_move_away_and_repeated_ones_converge(bits):
    spec = _spec(((64, 48, 4), (32, 96, 4)), scales=("mid", "out"))
    opts = CodecOptions(state_mantissa_bits=7, state_scale_encoding=f"q{bits}")
    g = torch.Generator().manual_seed(bits)
    neg = torch.rand(spec.n_bits, generator=g) < 0.5
    held = decode_state(encode_state(AdapterState(0, neg, torch.rand(spec.n_scales, generator=g) + 0.5), spec, opts),
                        spec, opts)  # what a node holds: 7-bit mantissas
    target = AdapterState(1, neg, held.scales + 0.05 * torch.randn(spec.n_scales, generator=g))
    # nothing changed: the node keeps exactly what it holds
    same = decode_state(encode_state(AdapterState(1, neg, held.scales), spec, opts, base=held), spec, opts, base=held)
    assert torch.equal(same.scales, held.scales)
    ulp = target.scales.abs() * 2.0**-7  # the held values' rounding
    errors = []
    for _ in range(12):  # the same target sent again and again: the node's error shrinks to the rounding
        new = decode_state(encode_state(target, spec, opts, base=held), spec, opts, base=held)
        assert bool(((target.scales - new.scales).abs() <= (target.scales - held.scales).abs() + ulp).all())
        errors.append(float((target.scales - new.scales).norm()))
        held = AdapterState(0, neg, new.scales)
    assert errors[-1] <= float(ulp.norm()) and errors[0] > errors[-1]
    fp16_xor = read_header(encode_state(target, spec, CodecOptions(state_mantissa_bits=7), base=held)).scale_raw
    assert read_header(encode_state(target, spec, opts, base=held)).scale_raw < fp16_xor * bits / 16 + 64


def test_scale_fraction_carries_the_largest_segments_by_hand():
    """codec scale_fraction: mid segments always, then in/out segments by mean squared delta, largest
    first, within the share of in/out entries; the rest decodes to exactly 0 (up) or the held scales
    (down)."""
    from lordba_fl.methods.lordba.codec import carried_entries

    # segments (mid, out) per layer: out sizes 4, 2, 6 -> 12 out entries; half of them: 6
    spec = _spec(((3, 4, 2), (3, 2, 2), (3, 6, 2)), scales=("mid", "out"))
    assert spec.scale_segments.tolist() == [2, 4, 2, 2, 2, 6]
    delta = np.zeros(spec.n_scales, np.float32)
    delta[0:2] = 0.001  # mid of layer 0: tiny, sent anyway
    delta[2:6] = [0.3, 0.0, 0.0, 0.0]  # mean square 0.0225
    delta[8:10] = [0.2, -0.2]  # 0.04: the largest
    delta[12:18] = 0.1  # 0.01: the smallest
    keep = carried_entries(delta, spec, 0.5)
    # by mean square: layer 1's out (2 entries), then layer 0's out (4: 6 in all, the share), not layer 2's
    want = np.array([1] * 2 + [1] * 4 + [1] * 2 + [1] * 2 + [1] * 2 + [0] * 6, bool)
    np.testing.assert_array_equal(keep, want)
    assert carried_entries(delta, spec, 1.0) is None
    # at least one segment even under a share smaller than any: the largest
    np.testing.assert_array_equal(carried_entries(delta, spec, 0.01)[2:], [0] * 4 + [1] * 2 + [1] * 2 + [1] * 2 + [0] * 6)
    opts = CodecOptions(scale_encoding="fp16", scale_fraction=0.5)
    up = decode_update(encode_update(Update(1, 0, torch.zeros(spec.n_bits, dtype=torch.bool), torch.from_numpy(delta)),
                                     spec, opts), spec, opts).scale_delta.numpy()
    np.testing.assert_array_equal(up, np.where(want, delta, 0).astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(scale_roundtrip(torch.from_numpy(delta), spec, opts, 0), up)  # what error feedback subtracts
    # down: a quantized state delta leaves the unsent segments exactly as the node holds them
    down_opts = CodecOptions(state_mantissa_bits=10, state_scale_encoding="q4", scale_fraction=0.5)
    neg = torch.zeros(spec.n_bits, dtype=torch.bool)
    held = AdapterState(1, neg, torch.full((spec.n_scales,), 0.5))
    new = decode_state(encode_state(AdapterState(2, neg, held.scales + torch.from_numpy(delta)), spec, down_opts, base=held),
                       spec, down_opts, base=held)
    assert torch.equal(new.scales[12:], held.scales[12:]) and not torch.equal(new.scales[8:10], held.scales[8:10])
    for bad in (0.0, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="scale_fraction"):
            CodecOptions(scale_fraction=bad)


def test_a_delta_against_a_base_with_more_mantissa_bits_is_exact():
    """Version 0 is seeded, not broadcast: its scales (e.g. 1/96) need not have the broadcast's 7
    mantissa bits; a delta against it decodes to exactly what a full frame of the new state does."""
    spec = _spec(((96, 8, 2),), scales=("in", "mid", "out"))
    opts = CodecOptions(state_mantissa_bits=7)
    g = torch.Generator().manual_seed(5)
    neg = torch.rand(spec.n_bits, generator=g) < 0.5
    v0 = AdapterState(0, neg, torch.full((spec.n_scales,), 1 / 96))  # not 7-bit representable
    new = AdapterState(3, neg, torch.rand(spec.n_scales, generator=g) + 0.01)
    full = decode_state(encode_state(new, spec, opts), spec, opts)
    got = decode_state(encode_state(new, spec, opts, base=v0), spec, opts, base=v0)
    assert torch.equal(got.scales, full.scales)
