"""Pure GGML block encoders: integer codes + fp16 group scales -> the bytes of Q4_0 / Q8_0 / TQ2_0 / TQ1_0."""

from __future__ import annotations

import numpy as np

from edgerazor.export.pack import pack_scales

#: ggml type name -> (weights per block, bytes per block)
BLOCKS = {"Q4_0": (32, 18), "Q8_0": (32, 34), "TQ2_0": (256, 66), "TQ1_0": (256, 54)}


def _block_scales(scales: np.ndarray, group_size: int, n_cols: int, block: int, what: str) -> np.ndarray:
    """fp16 ``d`` per block ``[rows, n_cols // block]``: the scale of the group holding the block."""
    if group_size % block or n_cols % block:
        raise ValueError(f"{what}: group size {group_size} and row length {n_cols} must be multiples of {block}")
    half = pack_scales(np.asarray(scales, dtype=np.float32))  # raises unless every scale is an fp16 value
    starts = np.arange(n_cols // block) * block
    return half[:, starts // group_size]


def _codes(codes: np.ndarray, low: int, high: int, block: int, what: str) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] % block:
        raise ValueError(f"{what}: codes must be [rows, cols] with cols a multiple of {block}, got {codes.shape}")
    if codes.size and (codes.min() < low or codes.max() > high):
        raise ValueError(f"{what}: codes must lie in [{low}, {high}], found [{codes.min()}, {codes.max()}]")
    return codes.astype(np.int16)


def _with_d(d: np.ndarray, payload: np.ndarray, d_first: bool) -> np.ndarray:
    """Concatenate the fp16 ``d`` bytes before (Q4_0/Q8_0) or after (TQ*) each block payload."""
    d_bytes = np.ascontiguousarray(d.astype("<f2")).view(np.uint8).reshape(*d.shape, 2)
    parts = (d_bytes, payload) if d_first else (payload, d_bytes)
    out = np.concatenate(parts, axis=-1)
    return out.reshape(out.shape[0], -1)


def encode_q4_0(codes: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    """Q4_0 bytes ``[rows, cols / 32 * 18]``: value ``d * (nibble - 8)``, nibble = code + 8."""
    q = _codes(codes, -8, 7, 32, "encode_q4_0") + 8
    rows, cols = q.shape
    d = _block_scales(scales, group_size, cols, 32, "encode_q4_0")
    q = q.reshape(rows, cols // 32, 2, 16).astype(np.uint8)
    payload = q[:, :, 0, :] | (q[:, :, 1, :] << 4)  # byte j: element j (low), element j + 16 (high)
    return _with_d(d, payload, d_first=True)


def encode_q8_0(codes: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    """Q8_0 bytes ``[rows, cols / 32 * 34]``: value ``d * q`` with q the int8 code."""
    q = _codes(codes, -127, 127, 32, "encode_q8_0")
    rows, cols = q.shape
    d = _block_scales(scales, group_size, cols, 32, "encode_q8_0")
    payload = q.astype(np.int8).view(np.uint8).reshape(rows, cols // 32, 32)
    return _with_d(d, payload, d_first=True)


def encode_tq2_0(codes: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    """TQ2_0 bytes ``[rows, cols / 256 * 66]``: 2-bit ``q + 1`` then ``d``; value ``d * (t - 1)``."""
    q = (_codes(codes, -1, 1, 256, "encode_tq2_0") + 1).astype(np.uint8)
    rows, cols = q.shape
    d = _block_scales(scales, group_size, cols, 256, "encode_tq2_0")
    q = q.reshape(rows, cols // 256, 2, 4, 32)  # [.., chunk of 128, shift slot k, byte m]
    payload = q[..., 0, :] | (q[..., 1, :] << 2) | (q[..., 2, :] << 4) | (q[..., 3, :] << 6)
    return _with_d(d, payload.reshape(rows, cols // 256, 64), d_first=False)


def _trits_to_bytes(t: np.ndarray, weights: tuple[int, ...]) -> np.ndarray:
    """``t`` is ``[..., n_digits, width]`` in {0, 1, 2}: most significant digit first, then ggml's
    fixed-point scaling ``ceil(v * 256 / 243)`` so that ``(byte * 3**k * 3) >> 8`` reads digit k."""
    w = np.array(weights, dtype=np.uint16).reshape(len(weights), 1)
    v = (t.astype(np.uint16) * w).sum(axis=-2)
    return ((v * 256 + 242) // 243).astype(np.uint8)


def encode_tq1_0(codes: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    """TQ1_0 bytes ``[rows, cols / 256 * 54]``: 48 bytes of 5 trits, 4 bytes of 4 trits, then ``d``.

    Within a block of 256: byte ``m < 32`` holds elements ``m + 32n`` (n = 0..4), byte ``32 + m``
    (m < 16) holds ``160 + m + 16n``, and qh byte ``m < 4`` holds ``240 + m + 4n`` (n = 0..3);
    digit n has weight ``3**(4-n)`` (the first element is the most significant trit).
    """
    q = (_codes(codes, -1, 1, 256, "encode_tq1_0") + 1).astype(np.uint8)
    rows, cols = q.shape
    d = _block_scales(scales, group_size, cols, 256, "encode_tq1_0")
    q = q.reshape(rows, cols // 256, 256)
    qs0 = _trits_to_bytes(q[..., :160].reshape(rows, -1, 5, 32), (81, 27, 9, 3, 1))
    qs1 = _trits_to_bytes(q[..., 160:240].reshape(rows, -1, 5, 16), (81, 27, 9, 3, 1))
    qh = _trits_to_bytes(q[..., 240:].reshape(rows, -1, 4, 4), (81, 27, 9, 3))
    return _with_d(d, np.concatenate([qs0, qs1, qh], axis=-1), d_first=False)


ENCODERS = {"Q4_0": encode_q4_0, "Q8_0": encode_q8_0, "TQ2_0": encode_tq2_0, "TQ1_0": encode_tq1_0}
#: the code range each quantized type can hold
CODE_RANGE = {"Q4_0": (-8, 7), "Q8_0": (-127, 127), "TQ2_0": (-1, 1), "TQ1_0": (-1, 1)}


def encode(ggml_type: str, codes: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    """Encode ``codes [rows, cols]`` with fp16 ``scales [rows, cols / G]`` as ``ggml_type`` blocks."""
    return ENCODERS[ggml_type](codes, scales, group_size)


def bits_per_weight(ggml_type: str) -> float:
    if ggml_type == "F32":
        return 32.0
    n, nbytes = BLOCKS[ggml_type]
    return 8.0 * nbytes / n
