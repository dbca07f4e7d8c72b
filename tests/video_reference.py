"""An independent re-computation of Qwen2-VL's video preprocessing, for tests and the checked-in fixture.

Written from the algorithm in transformers 5.24 (``Qwen2VLVideoProcessor.sample_frames`` with ``fps``,
``smart_resize``, torchvision's CPU resize of uint8 frames, the fused CLIP rescale-and-normalize,
``patchify``, and ``Qwen2_5OmniProcessor``'s ``video_second_per_grid``), in a different shape from
``edgerazor.data.video``: numpy arithmetic and explicit loops over patches, so a mistake in one is not
repeated in the other.
"""

from __future__ import annotations

import numpy as np
import torch

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def synthetic_frames(t: int, h: int, w: int) -> np.ndarray:
    """uint8 [T, H, W, 3]: a deterministic pattern with edges and gradients, so resizing matters."""
    tt, yy, xx, cc = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), np.arange(3), indexing="ij")
    return ((7 * tt + 3 * yy + 5 * xx + 11 * cc + (xx * yy) % 17) % 256).astype(np.uint8)


def ref_size(h: int, w: int, factor: int, lo: int, hi: int) -> tuple[int, int]:
    hh, ww = int(np.round(h / factor)) * factor, int(np.round(w / factor)) * factor
    if hh * ww > hi:
        b = np.sqrt(h * w / hi)
        return max(factor, int(np.floor(h / b / factor)) * factor), max(factor, int(np.floor(w / b / factor)) * factor)
    if hh * ww < lo:
        b = np.sqrt(lo / (h * w))
        return int(np.ceil(h * b / factor)) * factor, int(np.ceil(w * b / factor)) * factor
    return hh, ww


def ref_indices(total: int, video_fps: float, fps: float, tp: int = 2, min_frames: int = 4, max_frames: int = 768):
    top = (min(max_frames, total) // tp) * tp
    n = min(max(total / video_fps * fps, min_frames), top, total)
    n = int(np.floor(n / tp)) * tp
    # the processor's float32 arange, truncated; its rounding sometimes appends index == total (out of range,
    # where the processor fails): that one is left out
    return [int(v) for v in torch.arange(0, total, total / n, dtype=torch.float32).tolist() if int(v) < total]


def ref_process(frames_thwc: np.ndarray, lo: int, hi: int, p: int = 14, m: int = 2, tp: int = 2):
    """(patches [N, 3*tp*p*p] float32, (gt, gh, gw)) by explicit loops over the merge order."""
    x = torch.from_numpy(np.ascontiguousarray(frames_thwc.transpose(0, 3, 1, 2)))
    h, w = ref_size(x.shape[2], x.shape[3], p * m, lo, hi)
    if (h, w) != tuple(x.shape[2:]):
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    while x.shape[0] % tp:
        x = torch.cat([x, x[-1:]])
    v = x.numpy().astype(np.float32)
    v = (v - (MEAN * np.float32(255.0))[None, :, None, None]) / (STD * np.float32(255.0))[None, :, None, None]
    gt, gh, gw = v.shape[0] // tp, h // p, w // p
    rows = []
    for t in range(gt):
        for by in range(gh // m):
            for bx in range(gw // m):
                for iy in range(m):
                    for ix in range(m):
                        y0, x0 = (by * m + iy) * p, (bx * m + ix) * p
                        cube = v[t * tp:(t + 1) * tp, :, y0:y0 + p, x0:x0 + p]  # [tp, C, p, p]
                        rows.append(np.stack([cube[:, c] for c in range(3)]).reshape(-1))  # C, tp, y, x
    return np.stack(rows), (gt, gh, gw)
