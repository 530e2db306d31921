import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lordba_fl.codec import CodecError, pack_bits, pack_signs, packed_row_bytes, unpack_bits, unpack_signs


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
