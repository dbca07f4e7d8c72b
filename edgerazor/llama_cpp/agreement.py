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
import os
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


#: llama.cpp architectures whose loader (in the pinned llama.cpp) never reads
#: ``attention.layer_norm_rms_epsilon``: their RMS norms run with epsilon 0 whatever the file says
RMS_EPS_IGNORED = frozenset({"qwen2vl"})


def emulate_llama_cpp_norms(runtime: torch.nn.Module, report) -> int:
    """Give the text model's RMS norms the epsilon llama.cpp really uses for ``report.arch``; returns how many
    norms changed (0 where llama.cpp reads the file's epsilon)."""
    if report.arch not in RMS_EPS_IGNORED:
        return 0
    sources = {t.source.rpartition(".")[0] for t in report.tensors if t.source}
    changed = 0
    for name, module in runtime.named_modules():
        if name in sources and hasattr(module, "variance_epsilon"):
            module.variance_epsilon = 0.0
            changed += 1
    return changed


def emulate_llama_cpp_rounding(runtime: torch.nn.Module, report) -> None:
    """Round every matmul input as llama.cpp does for that tensor's GGUF type; K/V unrounded; RMS norms with
    the epsilon llama.cpp uses for the architecture."""
    from edgerazor.runtime.packed import PackedLinear

    set_own_rounding(runtime, False)
    emulate_llama_cpp_norms(runtime, report)
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


# --------------------------------------------------------------------------------------------------
# vision encoders (mmproj) through llama.cpp's multimodal library


def clip_pixels(image: np.ndarray, mean, std) -> torch.Tensor:
    """``uint8 [H, W, 3]`` -> float32 ``[3, H, W]`` exactly as libmtmd normalises: ``(x / 255 - mean) / std``,
    each step rounded to float32 (clip.cpp's ``from_u8`` and ``normalize``)."""
    x = image.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


@dataclasses.dataclass
class VisionDiff:
    max_abs: float
    mean_abs: float
    relative: float  # max |diff| / max |reference|
    min_cosine: float  # the worst token's cosine similarity

    @classmethod
    def of(cls, got: np.ndarray, reference: np.ndarray) -> "VisionDiff":
        d = np.abs(got.astype(np.float64) - reference)
        g, r = got.astype(np.float64), reference.astype(np.float64)
        cos = (g * r).sum(-1) / (np.linalg.norm(g, axis=-1) * np.linalg.norm(r, axis=-1))
        return cls(float(d.max()), float(d.mean()), float(d.max() / np.abs(r).max()), float(cos.min()))

    def __str__(self) -> str:
        return (f"max|diff| {self.max_abs:.5f}  mean|diff| {self.mean_abs:.6f}  relative {self.relative:.2e}  "
                f"min cosine {self.min_cosine:.6f}")


@dataclasses.dataclass
class VisionAgreement:
    text_report: object  # GGUFReport of the text model
    mmproj_report: object  # GGUFReport of the mmproj file
    grid: tuple[int, int, int]
    diffs: dict  # reference name -> VisionDiff


class LlamaGELU(torch.nn.Module):
    """ggml's CPU ``gelu`` (``GGML_GELU_FP16``): the tanh approximation looked up in a table at the input
    rounded to fp16, the result stored as fp16; 0 below -10 and the identity above 10."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table)).to(x.dtype)


class LlamaIm2colConv(torch.nn.Module):
    """A patch-embedding convolution as ggml's ``conv_2d`` computes it for an F32 or F16 kernel: ``im2col``
    writes the pixels as F16 and the matmul then converts the kernel to F16 too (float accumulation)."""

    def __init__(self, conv: torch.nn.Module) -> None:
        super().__init__()
        self.conv = conv

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        w = c.weight.to(torch.float16).float()
        return torch.nn.functional.conv3d(x.to(torch.float16).float(), w, c.bias, c.stride, c.padding,
                                          c.dilation, c.groups).to(x.dtype)


def emulate_llama_cpp_vision_rounding(runtime: torch.nn.Module, report) -> None:
    """Round the vision linears' inputs as llama.cpp does for each mmproj tensor's type (F32 tensors: none),
    compute the patch embedding in F16 as ggml's ``conv_2d`` does and the encoder's exact GELUs with ggml's
    table GELU, as libmtmd's graph does."""
    from edgerazor.runtime.packed import PackedConv3d, PackedLinear

    set_own_rounding(runtime, False)
    types = {t.source.removesuffix(".weight"): t.ggml_type for t in report.tensors}
    prefix = os.path.commonprefix([t.source for t in report.tensors])
    for name, module in list(runtime.named_modules()):
        if isinstance(module, PackedLinear) and name in types:
            rounding = LLAMA_ACTIVATION_ROUNDING.get(types[name])
            module.input_quant = rounding() if rounding is not None else None
        parent, _, child = name.rpartition(".")
        if name.startswith(prefix) and isinstance(module, torch.nn.GELU) and module.approximate == "none":
            setattr(runtime.get_submodule(parent), child, LlamaGELU())
        elif name.startswith(prefix) and isinstance(module, (PackedConv3d, torch.nn.Conv3d)):
            setattr(runtime.get_submodule(parent), child, LlamaIm2colConv(module))


def compare_vision(model, tokenizer, image: np.ndarray, out: str | Path, mean, std,
                   verbose: bool = True) -> VisionAgreement:
    """Export ``model`` as GGUF + mmproj and packed under ``out``; llama.cpp's image embeddings vs the packed
    runtime's vision tower on the same pixels (``image``: ``uint8 [H, W, 3]``, H and W multiples of
    patch x merge, so libmtmd does not resize it; ``mean``/``std``: the normalisation the mmproj carries)."""
    from edgerazor.data.video import VideoSpec, patchify
    from edgerazor.export.gguf import default_mmproj_path, write_gguf, write_mmproj
    from edgerazor.export.packed import export_packed
    from edgerazor.llama_cpp.multimodal import mtmd_image_embeddings
    from edgerazor.runtime.loading import load

    out = Path(out)
    text_report = write_gguf(model, tokenizer, out / "model.gguf", quiet=True)
    mm_report = write_mmproj(model, default_mmproj_path(text_report.path), quiet=True)
    export_packed(model, tokenizer, out / "packed")
    runtime, _ = load(out / "packed")
    visual = runtime.model.visual
    spec = VideoSpec(patch_size=visual.config.patch_size, temporal_patch_size=visual.config.temporal_patch_size,
                     merge_size=visual.config.spatial_merge_size)
    frame = clip_pixels(image, mean, std)
    # one image is a clip of temporal_patch_size identical frames (as the processor and libmtmd treat it)
    pv, grid = patchify(frame.unsqueeze(0).expand(spec.temporal_patch_size, *frame.shape), spec)
    grid_thw = torch.tensor([grid])
    with torch.no_grad():
        refs = {"packed": visual(pv, grid_thw=grid_thw).pooler_output.double().numpy()}
        set_own_rounding(runtime, False)
        refs["A16"] = visual(pv, grid_thw=grid_thw).pooler_output.double().numpy()
        emulate_llama_cpp_vision_rounding(runtime, mm_report)
        refs["emulated"] = visual(pv, grid_thw=grid_thw).pooler_output.double().numpy()
    got = mtmd_image_embeddings(text_report.path, mm_report.path, image)
    result = VisionAgreement(text_report, mm_report, grid, {})
    if got.shape != refs["packed"].shape:
        raise AssertionError(f"llama.cpp returned {got.shape} embeddings, the runtime {refs['packed'].shape}")
    for name, reference in refs.items():
        result.diffs[name] = diff = VisionDiff.of(got, reference)
        if verbose:
            print(f"  llama.cpp mtmd vs {name:9s} {diff}")
    return result
