"""Example third-party formats (a second entry point of this distribution, see docs/plugins.md).

Registers
* the quantizer ``int3``: symmetric absmax, codes in [-3, 3], counted as 3 bits per weight. It
  declares no ``codec``, so the packed format stores it in EdgeRazor's generic ``sym3`` codec
  (3 bits per code); nothing in EdgeRazor names it.
* the exporter ``codes_npz``: every quantized layer's integer codes (int8, ``[d_out, padded d_in]``)
  and fp16 group scales in one ``codes.npz`` (keys ``<layer>.codes`` and ``<layer>.scales``, a tied
  weight once), written with numpy. Option ``compressed`` (default False) uses ``numpy.savez_compressed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgerazor import hookimpl


@dataclass(frozen=True)
class Int3:
    """``s = max |W| / 3`` per group; codes ``clip(round(w / s), -3, 3)``."""

    qmax: int = 3
    bits: float = 3.0

    def scale(self, groups: torch.Tensor) -> torch.Tensor:
        return (groups.abs().amax(dim=-1) / self.qmax).clamp(min=1e-5)


def codes_npz(model, out_dir, tokenizer=None, compressed: bool = False, **options) -> Path:
    """Write the integer codes and fp16 scales of every quantized layer; returns the .npz path."""
    arrays: dict[str, np.ndarray] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        weight_quant = getattr(module, "weight_quant", None)
        if weight_quant is None or id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        codes, scales = weight_quant.codes_and_scales(module.weight)
        arrays[f"{name}.codes"] = codes.cpu().numpy()
        arrays[f"{name}.scales"] = scales.cpu().numpy().astype(np.float16)
    path = Path(out_dir) / "codes.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


@hookimpl
def register_quantizers(register):
    register("int3", Int3())


@hookimpl
def register_exporters(register):
    register("codes_npz", codes_npz)
