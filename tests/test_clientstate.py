"""Compact client state: exact sizes, error bounds of fp16 / q8 streams, AdamW moments that resume."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lordba_fl.methods.lordba.clientstate import (
    BLOCK,
    StateError,
    encoded_size,
    load_optimizer_,
    pack_floats,
    pack_optimizer,
    unpack_floats,
)


def _values(seed: int, n: int, spread: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * torch.exp2(torch.randn(n, generator=g, dtype=torch.float64) * spread)
    x[torch.rand(n, generator=g) < 0.05] = 0.0  # some exact zeros
    return x.float()


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3 * BLOCK + 5), seed=st.integers(0, 10_000), spread=st.floats(0.0, 6.0))
def test_streams_round_trip_within_their_bounds(n, seed, spread):
    x = _values(seed, n, spread)
    for dtype in ("fp32", "fp16", "q8"):
        buf = pack_floats(x, dtype)
        assert len(buf) == encoded_size(n, dtype)
        y = unpack_floats(buf, n, dtype)
        assert y.shape == (n,)
        if dtype != "fp16":  # fp16 may flush values below 2^-24 of the block maximum to zero (bound below)
            assert torch.equal(y == 0, x == 0) and torch.equal(torch.signbit(y[x != 0]), torch.signbit(x[x != 0]))
        if dtype == "fp32":
            assert torch.equal(x, y)
    # fp16: relative to the block maximum, at most half an fp16 ulp of a value in [-1, 1] (2^-11), plus
    # the fp32 cast of the result
    xb = np.pad(x.double().numpy(), (0, (-n) % BLOCK)).reshape(-1, BLOCK)
    amax = np.abs(xb).max(1, keepdims=True)
    y16 = np.pad(unpack_floats(pack_floats(x, "fp16"), n, "fp16").double().numpy(), (0, (-n) % BLOCK)).reshape(-1, BLOCK)
    assert np.all(np.abs(y16 - xb) <= amax * 2.0**-11 + np.abs(xb) * 2.0**-23)
    # q8: |log2|y| - log2|x|| <= (hi - lo) / (2 (levels - 1)) per block (+ fp32 slack); a stream with
    # no negative value gets 255 levels, a signed one 127
    for stream, steps in ((x, 126), (x.abs(), 254)):
        xs = np.pad(stream.double().numpy(), (0, (-n) % BLOCK)).reshape(-1, BLOCK)
        y8 = np.pad(unpack_floats(pack_floats(stream, "q8"), n, "q8").double().numpy(), (0, (-n) % BLOCK)).reshape(-1, BLOCK)
        for xr, yr in zip(xs, y8):
            nz = xr != 0
            if nz.any():
                lx = np.log2(np.abs(xr[nz]))
                bound = (lx.max() - lx.min()) / (2 * steps) + 2e-6 * (1 + np.abs(lx).max())
                assert np.abs(np.log2(np.abs(yr[nz])) - lx).max() <= bound


def test_q8_layout_by_hand():
    # signed, one block: lo = log2(0.25) = -2, hi = log2(4) = 2; 1.0 sits at level 1 + round(0.5 * 126) = 64
    buf = pack_floats(torch.tensor([0.25, -4.0, 1.0, 0.0]), "q8")
    assert buf[0] == 0 and np.frombuffer(buf[1:9], "<f4").tolist() == [-2.0, 2.0]
    assert list(buf[9:]) == [1, 0x80 | 127, 64, 0]
    assert unpack_floats(buf, 4, "q8").tolist() == [0.25, -4.0, 1.0, 0.0]
    # non-negative: 255 levels, 1.0 at level 1 + round(0.5 * 254) = 128
    buf = pack_floats(torch.tensor([0.25, 4.0, 1.0, 0.0]), "q8")
    assert buf[0] == 1 and list(buf[9:]) == [1, 255, 128, 0]
    assert unpack_floats(buf, 4, "q8").tolist() == [0.25, 4.0, 1.0, 0.0]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: pack_floats(torch.tensor([1.0, float("nan")]), "q8"), "NaN or inf"),
        (lambda: pack_floats(torch.ones(3), "int4"), "must be one of"),
        (lambda: unpack_floats(b"\x00" * 10, 3, "q8"), "has 10 bytes; 3 values as q8 need 12"),
        (lambda: unpack_floats(b"\x07" + b"\x00" * 11, 3, "q8"), "flag 7; expected 0 or 1"),
    ],
)
def test_bad_state_names_the_fix(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _train(opt, w, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss = ((w - torch.arange(w.numel(), dtype=torch.float32)) ** 2).sum()
        loss.backward()
        opt.step()


def _resumed_error(dtype: str | None) -> float:
    """Max |w - w_ref| after 3 + 3 AdamW steps with the moments kept as ``dtype`` (None: forgotten)
    vs 6 uninterrupted steps (lr 0.1, gradients spanning ~2^13 in one block), in units of w: |w| < 2."""
    w0 = torch.linspace(-1, 1, 50)
    ref = torch.nn.Parameter(w0.clone())
    _train(torch.optim.AdamW([ref], lr=0.1, weight_decay=0.0), ref, 6)
    w = torch.nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([w], lr=0.1, weight_decay=0.0)
    _train(opt, w, 3)
    fresh = torch.optim.AdamW([w], lr=0.1, weight_decay=0.0)
    if dtype is not None:
        load_optimizer_(fresh, pack_optimizer(opt, dtype), dtype)
    _train(fresh, w, 3)
    return float((w - ref).abs().max().detach())


def test_adamw_resumes_from_its_stored_moments():
    errors = {d: _resumed_error(d) for d in ("fp32", "fp16", "q8", None)}
    # fp32 stores sqrt(v) too: squaring it back costs an ulp of v, ~1e-8 in w; each of the 3 resumed
    # steps may then round w the other way: |w| < 2, so an ulp of w is 2^-22 (CPUs with AVX-512 BF16
    # or AMX fuse AdamW's arithmetic differently and land one ulp off: 1.19e-7 measured)
    assert errors["fp32"] <= 3 * 2.0**-22 + 1e-8
    # fp16: 2^-11 of the block maximum per moment -> ~3 lr 2^-11 at most over 3 steps
    assert errors["fp16"] <= 3 * 0.1 * 2.0**-11
    # q8: ~3.6% relative error per moment (13 octaves over 127 levels) -> a few 1e-3; still well
    # below forgetting the moments
    assert errors["q8"] <= 5e-3 and errors["q8"] < 0.5 * errors[None]


def test_optimizer_state_refuses_other_parameters():
    a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([a], lr=0.1)
    _train(opt, a, 1)
    with pytest.raises(StateError, match="covers 1 parameters; this optimizer has 2"):
        load_optimizer_(torch.optim.AdamW([a, b], lr=0.1), pack_optimizer(opt, "q8"), "q8")
    with pytest.raises(ValueError, match="set train.optimizer=adamw"):
        pack_optimizer(torch.optim.SGD([a], lr=0.1), "q8")
