"""A multimodal model's encoder as an mmproj GGUF file, the second file llama.cpp's multimodal library
(``libmtmd`` / ``clip.cpp``) loads beside the text model.

The family's adapter describes the file (``gguf_mmproj(model) -> MmprojSpec``): the projector's keys and,
for every encoder parameter, its llama.cpp tensor name. Quantized matrices are written from their codes
exactly as in the text GGUF (Q4_0 / Q8_0 where the row length and group size allow, otherwise F32 with a
note); a tensor the adapter must reshape (a Conv3d patch embedding split into the per-frame Conv2d kernels
llama.cpp runs, which ggml's ``conv_2d`` only takes in F16/F32) is written from the dequantized codes as
F32, which holds every ``scale * code`` exactly. Every parameter under the spec's prefixes must land in
the file; none is dropped silently.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgerazor.adapters import adapter_for_model
from edgerazor.errors import EdgeRazorError
from edgerazor.export.files import check_target
from edgerazor.export.gguf.check import EXPORTER_KEY, not_an_edgerazor_gguf
from edgerazor.export.gguf.report import GGUFReport, gguf_module
from edgerazor.export.gguf.writer import _file_type, _Planned, _quantized_tensor, write_checked
from edgerazor.quant.modules import WeightFakeQuant
from edgerazor.version import __version__


@dataclass(frozen=True)
class MmprojTensor:
    """One tensor of the file: its llama.cpp name and the model parameter it comes from.

    ``transform`` (float weight -> array) reshapes or slices a weight for llama.cpp's graph; such a tensor is
    written as F32 from the dequantized codes (exact), and ``why_float`` says why no block type serves."""

    name: str
    source: str
    transform: Callable[[torch.Tensor], np.ndarray] | None = None
    why_float: str | None = None


@dataclass(frozen=True)
class MmprojSpec:
    """What an adapter writes as the mmproj: projector keys (``write_keys(gguf_writer)``), tensors, the
    parameter prefixes the file must cover completely, and notes for the report."""

    projector: str
    write_keys: Callable[[object], None]
    tensors: tuple[MmprojTensor, ...]
    covers: tuple[str, ...]
    notes: tuple[str, ...] = ()


def mmproj_spec(model: nn.Module) -> MmprojSpec | None:
    """The adapter's mmproj description of ``model``, or None when its family has no such file."""
    return adapter_for_model(model).gguf_mmproj(model)


def default_mmproj_path(text_gguf: Path) -> Path:
    """``mmproj-<name>.gguf`` beside the text model: the name llama.cpp's tools and model hubs look for."""
    return text_gguf.with_name(f"mmproj-{text_gguf.name}")


def _plan(model: nn.Module, spec: MmprojSpec, strict: bool, notes: list[str]):
    params = dict(model.named_parameters())
    named = {t.source for t in spec.tensors}
    missing = [n for n in params if n.startswith(spec.covers) and n not in named]
    if missing:
        raise EdgeRazorError(f"parameter {missing[0]!r} has no tensor in the {spec.projector} mmproj "
                             f"({len(missing)} in all); refusing to drop it silently")
    planned = []
    for t in spec.tensors:
        if t.source not in params:
            raise EdgeRazorError(f"the {spec.projector} mmproj names parameter {t.source!r}, which the model lacks")
        param = params[t.source]
        module = model.get_submodule(t.source.rpartition(".")[0])
        wq = getattr(module, "weight_quant", None)
        quantized = t.source.endswith(".weight") and isinstance(wq, WeightFakeQuant)
        if t.transform is not None:
            weight = param.detach()
            if quantized:
                weight = wq.dequantized(weight.reshape(weight.shape[0], -1)).reshape(weight.shape)
            values = np.ascontiguousarray(t.transform(weight.float().cpu()), dtype=np.float32)
            theoretical = None
            if quantized:
                theoretical = float(wq.high.bits) + 16.0 / wq.group_size if wq.low is None else None
                message = (f"{t.name} ({t.source}, G={wq.group_size}) {t.why_float}: written as F32 from the "
                           f"dequantized codes (exact)")
                if strict:
                    raise EdgeRazorError(f"strict GGUF export refuses tensor {t.name!r}: {message}")
                notes.append(message)
            planned.append(_Planned(t.name, t.source, "F32", values, tuple(values.shape), theoretical,
                                    fallback=quantized))
        elif quantized:
            planned.append(_quantized_tensor(t.name, t.source, param, wq, "auto", strict, None, notes))
        else:
            values = np.ascontiguousarray(param.detach().float().cpu().numpy(), dtype=np.float32)
            if values.ndim == 2:
                notes.append(f"{t.name} ({t.source}) is not quantized by the recipe: written as F32")
            planned.append(_Planned(t.name, t.source, "F32", values, tuple(values.shape), None))
    return planned


def write_mmproj(model: nn.Module, path: str | os.PathLike, strict: bool = False, overwrite: bool = False,
                 quiet: bool = False) -> GGUFReport:
    """Write the encoder of ``model`` (quantized by ``edgerazor.quantize``) as an mmproj GGUF file.

    Refused, naming the model, when its adapter describes no mmproj. Written beside ``path``, read back
    and checked like the text GGUF, then renamed into place; an existing ``path`` is replaced only with
    ``overwrite`` and only when EdgeRazor wrote it."""
    gguf = gguf_module()
    path = Path(path)
    spec = mmproj_spec(model)
    if spec is None:
        adapter = adapter_for_model(model)
        raise EdgeRazorError(f"no mmproj for this model (model_type {getattr(model.config, 'model_type', None)!r}, "
                             f"adapter {adapter.name!r}): it has no encoder that llama.cpp's multimodal library runs")
    target = {"overwrite": overwrite, "foreign": not_an_edgerazor_gguf, "what": "GGUF file"}
    check_target(path, **target)
    notes: list[str] = list(spec.notes)
    planned = _plan(model, spec, strict, notes)
    def write_keys(writer) -> None:
        writer.add_type(gguf.GGUFType.MMPROJ)
        writer.add_string(EXPORTER_KEY, __version__)
        spec.write_keys(writer)
        writer.add_file_type(_file_type(planned))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    report = write_checked(path, target, gguf.MODEL_ARCH.MMPROJ, write_keys, planned,
                           GGUFReport(path, f"mmproj:{spec.projector}", "-", notes=notes))
    if not quiet:
        print(f"wrote {path} (mmproj, projector {spec.projector}): {report.file_bytes / 2**20:.2f} MiB")
        for note in notes:
            print(f"note: {note}")
    return report
