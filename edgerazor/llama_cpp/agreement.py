"""How closely real llama.cpp reproduces the packed runtime on the same exported model.

The GGUF and the packed export hold the same integer codes, so their logits differ only by how
activations are rounded. llama.cpp quantizes every matmul input to Q8_0 (blocks of 32, fp16 scale;
for Q4_0/Q8_0 weights) or Q8_K (blocks of 256, f32 scale; for TQ1_0/TQ2_0 weights) and keeps K/V
in its cache type. ``compare`` measures llama.cpp against three references:

* ``packed``: the runtime as trained (its own A8/KV8 rounding, which llama.cpp does not implement);
* ``A16``: the runtime with its own activation/KV rounding switched off;
* ``emulated``: the runtime rounding each matmul input exactly as llama.cpp does for that tensor's
  GGUF type, K/V unrounded: what remains is float summation order.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from edgerazor.quant.kv import KVFakeQuant
from edgerazor.quant.modules import ActivationFakeQuant


class LlamaQ8_0(torch.nn.Module):
    """``quantize_row_q8_0`` (x86): blocks of 32, codes ``round(x * 127 / amax)`` (half to even),
    values ``code * fp16(amax / 127)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x.float().reshape(*x.shape[:-1], -1, 32)
        amax = g.abs().amax(-1, keepdim=True)
        codes = torch.round(g * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax)))
        return (codes * (amax / 127.0).half().float()).reshape(x.shape).to(x.dtype)


class LlamaQ8_K(torch.nn.Module):
    """``quantize_row_q8_K_ref``: blocks of 256, ``iscale = -127 / max`` with ``max`` the signed
    element of largest magnitude, codes ``min(127, round(iscale * x))``, values ``code / iscale``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x.float().reshape(*x.shape[:-1], -1, 256)
        signed_max = torch.gather(g, -1, g.abs().argmax(-1, keepdim=True))
        iscale = torch.where(signed_max != 0, -127.0 / signed_max, torch.zeros_like(signed_max))
        codes = torch.round(iscale * g).clamp(max=127)
        d = torch.where(signed_max != 0, 1.0 / iscale, torch.zeros_like(signed_max))
        return (codes * d).reshape(x.shape).to(x.dtype)


#: the activation type llama.cpp's CPU backend pairs with each weight type (``vec_dot_type``)
LLAMA_ACTIVATION_ROUNDING = {"Q4_0": LlamaQ8_0, "Q8_0": LlamaQ8_0, "TQ1_0": LlamaQ8_K, "TQ2_0": LlamaQ8_K}


def set_own_rounding(model: torch.nn.Module, enabled: bool) -> None:
    """Switch the runtime's own A8 and KV8 fake quantization on or off."""
    for module in model.modules():
        if isinstance(module, (ActivationFakeQuant, KVFakeQuant)):
            module.enabled = enabled


def emulate_llama_cpp_rounding(runtime: torch.nn.Module, report) -> None:
    """Round every matmul input as llama.cpp does for that tensor's GGUF type; K/V unrounded."""
    from edgerazor.runtime.packed import PackedLinear

    set_own_rounding(runtime, False)
    types = {t.source.removesuffix(".weight"): t.ggml_type for t in report.tensors}
    embed = runtime.get_input_embeddings()
    embed_name = next(name for name, m in runtime.named_modules() if m is embed)
    for name, module in runtime.named_modules():
        if isinstance(module, PackedLinear):
            ggml_type = types.get(name) or types[embed_name]  # a tied lm_head is token_embd in the GGUF
            module.input_quant = LLAMA_ACTIVATION_ROUNDING[ggml_type]()


@dataclasses.dataclass
class Diff:
    max_abs: float
    mean_abs: float
    top1: float

    @classmethod
    def of(cls, got: np.ndarray, reference: np.ndarray) -> "Diff":
        d = np.abs(got.astype(np.float64) - reference)
        return cls(float(d.max()), float(d.mean()), float((got.argmax(-1) == reference.argmax(-1)).mean()))

    def __str__(self) -> str:
        return f"max|diff| {self.max_abs:.4f}  mean|diff| {self.mean_abs:.5f}  top-1 {self.top1:.2%}"


@dataclasses.dataclass
class Agreement:
    report: object  # GGUFReport of the file llama.cpp ran
    own_rounding_effect: float  # max |packed(A8, KV8) - packed(A16, KV16)|
    diffs: dict  # (llama.cpp KV cache type, reference) -> Diff

    @property
    def bound(self) -> float:
        """``max|llama.cpp - packed|`` cannot exceed this (triangle inequality through the unrounded
        model; llama.cpp's rounding is no coarser than the runtime's; 0.02 for summation order)."""
        return 2.0 * self.own_rounding_effect + 0.02


def compare(model, tokenizer, ids: Sequence[int], out: str | Path, kv_types=("f32", "f16", "q8_0"),
            verbose: bool = True) -> Agreement:
    """Export ``model`` as GGUF and packed under ``out``; llama.cpp vs the packed runtime on ``ids``."""
    from edgerazor.export.gguf import write_gguf
    from edgerazor.export.packed import export_packed
    from edgerazor.llama_cpp.bindings import llama_cpp_logits
    from edgerazor.runtime.loading import load

    out = Path(out)
    report = write_gguf(model, tokenizer, out / "model.gguf", quiet=True)
    export_packed(model, tokenizer, out / "packed")
    runtime, _ = load(out / "packed")
    x = torch.tensor([list(ids)])
    with torch.no_grad():
        refs = {"packed": runtime(x).logits[0].double().numpy()}
        set_own_rounding(runtime, False)
        refs["A16"] = runtime(x).logits[0].double().numpy()
        emulate_llama_cpp_rounding(runtime, report)
        refs["emulated"] = runtime(x).logits[0].double().numpy()
    result = Agreement(report, float(np.abs(refs["packed"] - refs["A16"]).max()), {})
    if verbose:
        types = "/".join(sorted({t.ggml_type for t in report.tensors if len(t.shape) == 2}))
        print(f"[llama.cpp vs packed runtime] {out.name}: {types}, {len(ids)} tokens, logit std "
              f"{refs['packed'].std():.2f}, own A8/KV8 effect {result.own_rounding_effect:.4f} -> bound {result.bound:.4f}")
    for kv in kv_types:
        got = llama_cpp_logits(report.path, list(ids), kv_type=kv)
        for name, reference in refs.items():
            result.diffs[kv, name] = diff = Diff.of(got, reference)
            if verbose:
                print(f"  llama.cpp kv={kv:5s} vs {name:9s} {diff}")
    return result
