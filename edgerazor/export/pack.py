"""Pure, documented bit-packing of integer codes (no torch module state, no I/O).

Layouts (little-endian within a byte, along the last axis; the last byte is zero-filled):
- ternary, 2 bits: ``q + 1`` in {0, 1, 2}; element ``i`` at bits ``2 * (i % 4)`` of byte ``i // 4``.
- ternary, base 3: five trits per byte, ``byte = sum_k (q_k + 1) * 3**k`` (0..242): 1.6 bits/weight.
- int4: ``q + 8`` in [1, 15] (q in [-7, 7]); element ``i`` in the low nibble when ``i`` is even.
- int8: the codes themselves, as bytes.
- ``sym{qmax}`` (generic, any 1 <= qmax <= 127): ``q + qmax`` in ``w = (2 * qmax).bit_length()`` bits as
  one little-endian bit stream per row: bit ``b`` of element ``i`` is stream bit ``i * w + b``, and stream
  bit ``j`` is bit ``j % 8`` of byte ``j // 8`` (``sym3``: 3 bits per code, 8 codes in 3 bytes).
- masks: one bit per row, ``numpy.packbits(..., bitorder="little")``.
Every unpack takes the original length ``n`` of the last axis. ``codec_for`` picks a quantizer's codec:
the one it declares (``codec``), else ``sym{qmax}``.
"""

from __future__ import annotations

import numpy as np

_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)


def _check_codes(codes: np.ndarray, low: int, high: int, what: str) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim == 0:
        raise ValueError(f"{what}: codes must have at least one dimension, got a scalar")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"{what}: codes must be integers, got dtype {codes.dtype}")
    if codes.size and (codes.min() < low or codes.max() > high):
        raise ValueError(f"{what}: codes must lie in [{low}, {high}], found [{codes.min()}, {codes.max()}]")
    return codes.astype(np.int16)


def _pad_last(x: np.ndarray, multiple: int, fill: int = 0) -> np.ndarray:
    extra = -x.shape[-1] % multiple
    if not extra:
        return x
    return np.concatenate([x, np.full((*x.shape[:-1], extra), fill, dtype=x.dtype)], axis=-1)


def _check_packed(packed: np.ndarray, n: int, per_byte: int, what: str) -> np.ndarray:
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise ValueError(f"{what}: packed data must be uint8, got {packed.dtype}")
    if packed.ndim == 0 or n < 0:
        raise ValueError(f"{what}: need a packed array with a last axis and n >= 0")
    expected = -(-n // per_byte)
    if packed.shape[-1] != expected:
        raise ValueError(f"{what}: last axis has {packed.shape[-1]} bytes, expected {expected} for n={n}")
    return packed


def pack_ternary_2bit(codes: np.ndarray) -> np.ndarray:
    q = _pad_last(_check_codes(codes, -1, 1, "pack_ternary_2bit") + 1, 4, 1).astype(np.uint8)
    q = q.reshape(*q.shape[:-1], -1, 4)
    return (q[..., 0] | (q[..., 1] << 2) | (q[..., 2] << 4) | (q[..., 3] << 6)).astype(np.uint8)


def unpack_ternary_2bit(packed: np.ndarray, n: int) -> np.ndarray:
    packed = _check_packed(packed, n, 4, "unpack_ternary_2bit")
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)
    q = (packed[..., None] >> shifts) & 3
    q = q.reshape(*packed.shape[:-1], -1)[..., :n]
    if q.size and q.max() > 2:
        raise ValueError("unpack_ternary_2bit: found the invalid 2-bit value 3 (corrupted data)")
    return q.astype(np.int8) - 1


def pack_ternary_base3(codes: np.ndarray) -> np.ndarray:
    q = _pad_last(_check_codes(codes, -1, 1, "pack_ternary_base3") + 1, 5, 0).astype(np.uint8)
    q = q.reshape(*q.shape[:-1], -1, 5)
    return (q * _POW3).sum(axis=-1, dtype=np.uint16).astype(np.uint8)


def unpack_ternary_base3(packed: np.ndarray, n: int) -> np.ndarray:
    packed = _check_packed(packed, n, 5, "unpack_ternary_base3")
    if packed.size and packed.max() > 242:
        raise ValueError(f"unpack_ternary_base3: byte value {packed.max()} > 242 is not five trits (corrupted data)")
    q = (packed[..., None] // _POW3) % 3
    return q.reshape(*packed.shape[:-1], -1)[..., :n].astype(np.int8) - 1


def pack_int4(codes: np.ndarray) -> np.ndarray:
    q = _pad_last(_check_codes(codes, -7, 7, "pack_int4") + 8, 2, 8).astype(np.uint8)
    q = q.reshape(*q.shape[:-1], -1, 2)
    return (q[..., 0] | (q[..., 1] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, n: int) -> np.ndarray:
    packed = _check_packed(packed, n, 2, "unpack_int4")
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)[..., :n]
    if q.size and q.min() < 1:
        raise ValueError("unpack_int4: found nibble 0 (code -8), outside the symmetric range [-7, 7]")
    return q.astype(np.int8) - 8


def pack_int8(codes: np.ndarray) -> np.ndarray:
    return _check_codes(codes, -127, 127, "pack_int8").astype(np.int8).view(np.uint8)


def unpack_int8(packed: np.ndarray, n: int) -> np.ndarray:
    packed = _check_packed(packed, n, 1, "unpack_int8")
    q = packed.view(np.int8)
    if q.size and q.min() < -127:
        raise ValueError("unpack_int8: found -128, outside the symmetric range [-127, 127]")
    return q.copy()


def pack_scales(scales: np.ndarray) -> np.ndarray:
    """fp16 scales; raises unless every value is exactly representable (training rounds them)."""
    scales = np.asarray(scales)
    half = scales.astype(np.float16)
    if not np.array_equal(half.astype(scales.dtype), scales):
        raise ValueError("pack_scales: scales are not fp16 values; quantize with fp16-rounded scales first")
    return half


def pack_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype != np.bool_ or mask.ndim != 1:
        raise ValueError(f"pack_mask: need a 1-D bool row mask, got {mask.dtype} with shape {mask.shape}")
    return np.packbits(mask, bitorder="little")


def unpack_mask(packed: np.ndarray, n: int) -> np.ndarray:
    packed = _check_packed(packed, n, 8, "unpack_mask")
    return np.unpackbits(packed, count=n, bitorder="little").astype(bool)


#: name -> (pack, unpack, codes per byte, bits per code)
CODECS = {
    "ternary_2bit": (pack_ternary_2bit, unpack_ternary_2bit, 4, 2.0),
    "ternary_base3": (pack_ternary_base3, unpack_ternary_base3, 5, 1.6),
    "int4": (pack_int4, unpack_int4, 2, 4.0),
    "int8": (pack_int8, unpack_int8, 1, 8.0),
}

#: fixed-layout codec -> the largest |code| it holds
CODEC_QMAX = {"ternary_2bit": 1, "ternary_base3": 1, "int4": 7, "int8": 127}

SYMMETRIC_PREFIX = "sym"
MAX_QMAX = 127  # codes are int8


def symmetric_width(qmax: int) -> int:
    """Bits per code of ``sym{qmax}``: the fewest that hold ``q + qmax`` in [0, 2 * qmax]."""
    return (2 * qmax).bit_length()


def pack_symmetric(codes: np.ndarray, qmax: int) -> np.ndarray:
    what = f"pack {SYMMETRIC_PREFIX}{qmax}"
    width = symmetric_width(qmax)
    q = _check_codes(codes, -qmax, qmax, what) + qmax
    bits = ((q[..., None] >> np.arange(width, dtype=np.int16)) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(*q.shape[:-1], -1), axis=-1, bitorder="little")


def unpack_symmetric(packed: np.ndarray, n: int, qmax: int) -> np.ndarray:
    what = f"unpack {SYMMETRIC_PREFIX}{qmax}"
    width = symmetric_width(qmax)
    packed = _check_packed(packed, n * width, 8, f"{what} ({width} bits per code, n={n})")
    bits = np.unpackbits(packed, axis=-1, count=n * width, bitorder="little")
    q = (bits.reshape(*packed.shape[:-1], n, width).astype(np.int16) << np.arange(width, dtype=np.int16)).sum(-1)
    if q.size and q.max() > 2 * qmax:
        raise ValueError(f"{what}: found the field value {q.max()} > {2 * qmax} (corrupted data)")
    return (q - qmax).astype(np.int8)


def symmetric_qmax(name: str) -> int | None:
    """``qmax`` of a generic codec name (``"sym3"`` -> 3), None for any other name."""
    digits = name[len(SYMMETRIC_PREFIX):] if name.startswith(SYMMETRIC_PREFIX) else ""
    if not digits.isdigit() or digits != str(int(digits)) or not 1 <= int(digits) <= MAX_QMAX:
        return None
    return int(digits)


def codec_names() -> str:
    """For error messages: every codec name this module packs."""
    return f"{', '.join(CODECS)}, {SYMMETRIC_PREFIX}1..{SYMMETRIC_PREFIX}{MAX_QMAX}"


def get_codec(name: str) -> tuple:
    """``(pack, unpack, qmax, bits per code)`` of a fixed codec or of ``sym{qmax}``; ValueError if unknown."""
    if name in CODECS:
        pack_fn, unpack_fn, _, bits = CODECS[name]
        return pack_fn, unpack_fn, CODEC_QMAX[name], bits
    qmax = symmetric_qmax(name)
    if qmax is None:
        raise ValueError(f"unknown codec {name!r}; known: {codec_names()}")
    return (lambda codes: pack_symmetric(codes, qmax), lambda packed, n: unpack_symmetric(packed, n, qmax),
            qmax, float(symmetric_width(qmax)))


def codec_for(qmax: int, declared: str | None = None) -> str:
    """The codec a quantizer's codes are packed with: ``declared`` if it holds [-qmax, qmax], else ``sym{qmax}``."""
    if declared is None:
        if not 1 <= qmax <= MAX_QMAX:
            raise ValueError(f"qmax {qmax} has no codec (codes are int8: 1 <= qmax <= {MAX_QMAX})")
        return f"{SYMMETRIC_PREFIX}{qmax}"
    held = get_codec(declared)[2]
    if qmax > held:
        raise ValueError(f"codec {declared!r} holds codes in [-{held}, {held}], not [-{qmax}, {qmax}]")
    return declared
