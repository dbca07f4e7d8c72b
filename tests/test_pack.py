"""Pure pack/unpack functions: round trips for random shapes, and every documented error."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edgerazor.export import pack

RANGES = {"ternary_2bit": 1, "ternary_base3": 1, "int4": 7, "int8": 127}
shapes = st.lists(st.integers(1, 13), min_size=1, max_size=3).map(tuple)


@pytest.mark.parametrize("codec", sorted(pack.CODECS))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_round_trip_random_shapes(codec, data):
    qmax = RANGES[codec]
    codes = data.draw(arrays(np.int8, shapes, elements=st.integers(-qmax, qmax)))
    pack_fn, unpack_fn, per_byte, _ = pack.CODECS[codec]
    packed = pack_fn(codes)
    assert packed.dtype == np.uint8
    assert packed.shape == (*codes.shape[:-1], -(-codes.shape[-1] // per_byte))
    np.testing.assert_array_equal(unpack_fn(packed, codes.shape[-1]), codes)


@settings(max_examples=60, deadline=None)
@given(mask=arrays(np.bool_, st.integers(1, 70)))
def test_mask_round_trip(mask):
    np.testing.assert_array_equal(pack.unpack_mask(pack.pack_mask(mask), mask.size), mask)


def test_documented_layouts():
    assert pack.pack_ternary_2bit(np.array([-1, 0, 1, 1])).tolist() == [0 | 1 << 2 | 2 << 4 | 2 << 6]
    assert pack.pack_ternary_base3(np.array([1, 0, -1, 0, 1])).tolist() == [2 + 1 * 3 + 0 * 9 + 1 * 27 + 2 * 81]
    assert pack.pack_int4(np.array([-7, 7, 3])).tolist() == [1 | 15 << 4, 11 | 8 << 4]
    assert pack.pack_int8(np.array([-127, 5])).tolist() == [129, 5]
    assert pack.CODECS["ternary_base3"][3] == 1.6


@pytest.mark.parametrize("codec, bad", [("ternary_2bit", 2), ("ternary_base3", -2), ("int4", 8), ("int4", -8),
                                        ("int8", -128)])
def test_out_of_range_codes(codec, bad):
    with pytest.raises(ValueError, match=r"codes must lie in"):
        pack.CODECS[codec][0](np.array([0, bad]))


def test_shape_and_dtype_errors():
    with pytest.raises(ValueError, match="expected 2 for n=8"):
        pack.unpack_ternary_2bit(np.zeros(3, np.uint8), 8)
    with pytest.raises(ValueError, match="must be uint8"):
        pack.unpack_int4(np.zeros(2, np.int32), 4)
    with pytest.raises(ValueError, match="at least one dimension"):
        pack.pack_int4(np.array(3))
    with pytest.raises(ValueError, match="must be integers"):
        pack.pack_int8(np.array([0.5]))
    with pytest.raises(ValueError, match="1-D bool row mask"):
        pack.pack_mask(np.array([1, 0]))


def test_corrupted_bytes_are_detected():
    with pytest.raises(ValueError, match="> 242"):
        pack.unpack_ternary_base3(np.array([243], np.uint8), 5)
    with pytest.raises(ValueError, match="invalid 2-bit value 3"):
        pack.unpack_ternary_2bit(np.array([0xFF], np.uint8), 4)
    with pytest.raises(ValueError, match="nibble 0"):
        pack.unpack_int4(np.array([0x80], np.uint8), 2)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_generic_symmetric_codec_round_trips(data):
    qmax = data.draw(st.integers(1, 127))
    codes = data.draw(arrays(np.int8, shapes, elements=st.integers(-qmax, qmax)))
    pack_fn, unpack_fn, held, bits = pack.get_codec(f"sym{qmax}")
    width = qmax.bit_length() + 1  # the bits of 2 * qmax
    assert (held, bits) == (qmax, float(width))
    packed = pack_fn(codes)
    assert packed.dtype == np.uint8 and packed.shape == (*codes.shape[:-1], -(-codes.shape[-1] * width // 8))
    np.testing.assert_array_equal(unpack_fn(packed, codes.shape[-1]), codes)


def test_generic_symmetric_codec_layout_and_errors():
    # sym3: q + 3 in 3 bits, little-endian stream: fields 0, 6, 3 -> bits 000 011 110 -> bytes 0xF0, 0x00
    assert pack.pack_symmetric(np.array([-3, 3, 0]), 3).tolist() == [0b11110000, 0]
    # sym1 is the 2-bit ternary stream (padding aside)
    codes = np.array([-1, 0, 1, 1, 0, -1, 1, 0])
    assert pack.pack_symmetric(codes, 1).tolist() == pack.pack_ternary_2bit(codes).tolist()
    with pytest.raises(ValueError, match=r"codes must lie in \[-3, 3\]"):
        pack.pack_symmetric(np.array([4]), 3)
    with pytest.raises(ValueError, match="field value 7 > 6"):
        pack.unpack_symmetric(np.array([0b111], np.uint8), 1, 3)
    with pytest.raises(ValueError, match=r"unknown codec 'sym0'"):
        pack.get_codec("sym0")
    assert pack.symmetric_qmax("sym03") is None and pack.symmetric_qmax("sym128") is None


def test_codec_for_a_quantizer():
    assert pack.codec_for(3) == "sym3" and pack.codec_for(1) == "sym1"
    assert pack.codec_for(1, "ternary_base3") == "ternary_base3" and pack.codec_for(7, "int4") == "int4"
    assert pack.codec_for(5, "int4") == "int4" and pack.codec_for(3, "sym7") == "sym7"  # a wider codec holds it
    with pytest.raises(ValueError, match=r"codec 'ternary_base3' holds codes in \[-1, 1\], not \[-7, 7\]"):
        pack.codec_for(7, "ternary_base3")
    with pytest.raises(ValueError, match="unknown codec 'int5'"):
        pack.codec_for(7, "int5")


def test_scales_must_be_fp16_values():
    ok = np.array([0.5, 1.0009765625], np.float32)
    assert pack.pack_scales(ok).dtype == np.float16
    with pytest.raises(ValueError, match="not fp16 values"):
        pack.pack_scales(np.array([0.1], np.float32))
