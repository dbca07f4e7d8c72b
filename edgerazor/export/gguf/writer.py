"""Planning every tensor of a quantized model as a GGML type (from the codes) and writing the GGUF file."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgerazor.errors import EdgeRazorError
from edgerazor.adapters import ModelAdapter, adapter_for_model
from edgerazor.export.gguf.architecture import LLAMA_CPP_ARCH_NOTES, PERMUTED_ARCHS, llama_permute, write_hparams
from edgerazor.export.files import check_target, staged
from edgerazor.export.gguf.blocks import BLOCKS, CODE_RANGE, bits_per_weight, encode
from edgerazor.export.gguf.check import EXPORTER_KEY, ExpectedTensor, check_gguf, not_an_edgerazor_gguf
from edgerazor.export.gguf.report import GGUFReport, GGUFTensor, gguf_module
from edgerazor.export.gguf.vocabulary import write_tokenizer, detect_pre_tokenizer, normalizer_note
from edgerazor.quant.grouping import dequantize
from edgerazor.quant.modules import WeightFakeQuant
from edgerazor.version import __version__

REQUESTED_TYPES = ("auto", "tq1_0", "tq2_0", "q4_0")


def _row_kinds(wq: WeightFakeQuant) -> tuple[list[int], float]:
    """(qmax of every quantizer used by some row, mean storage bits over rows)."""
    mask = wq.precision_mask.cpu()
    n_high = int(mask.sum())
    n_low = mask.numel() - n_high
    qmaxes, bits = [], 0.0
    if n_high or wq.low is None:
        qmaxes.append(int(wq.high.qmax))
        bits += n_high * float(wq.high.bits)
    if n_low and wq.low is not None:
        qmaxes.append(int(wq.low.qmax))
        bits += n_low * float(wq.low.bits)
    return qmaxes, bits / max(mask.numel(), 1)


def _fits(ggml_type: str, qmaxes: list[int], group: int, d_in: int) -> bool:
    lo, hi = CODE_RANGE[ggml_type]
    block = BLOCKS[ggml_type][0]
    return max(qmaxes) <= min(hi, -lo) and group % block == 0 and d_in % block == 0


def _choose_type(qmaxes: list[int], group: int, d_in: int, requested: str) -> tuple[str, str | None, str]:
    """(ggml type to write, reason it is a fallback or None, the ideal type)."""
    tq = "TQ1_0" if requested == "tq1_0" else "TQ2_0"
    if set(qmaxes) == {1}:
        ideal = "Q4_0" if requested == "q4_0" else tq
    elif len(set(qmaxes)) == 1 and qmaxes[0] <= 7:
        ideal = "Q4_0"
    elif len(set(qmaxes)) == 1 and qmaxes[0] <= 127:
        ideal = "Q8_0"
    else:
        ideal = None
    if ideal is not None and _fits(ideal, qmaxes, group, d_in):
        return ideal, None, ideal
    if ideal is None:
        kinds = " and ".join("ternary" if q == 1 else f"{q.bit_length() + 1}-bit" for q in sorted(qmaxes))
        reason = f"mixes precisions across rows ({kinds}), which no single ggml type stores at its own size"
    else:
        block = BLOCKS[ideal][0]
        reason = (f"is not exact in {ideal}: {ideal} needs the group size (G={group}) and row length "
                  f"({d_in}) to be multiples of {block}")
    for fallback in ("Q4_0", "Q8_0"):
        if _fits(fallback, qmaxes, group, d_in):
            return fallback, reason, ideal or "per-row"
    return "F32", reason, ideal or "per-row"


def _requested_type(requested: str, qmaxes: list[int]) -> str | None:
    """The type an explicit ``type`` asks for this tensor: tq1_0 / tq2_0 for any tensor holding ternary
    rows, q4_0 for any tensor whose codes fit 4 bits; None where the request does not speak of it."""
    if requested in ("tq1_0", "tq2_0") and 1 in qmaxes:
        return requested.upper()
    if requested == "q4_0" and max(qmaxes) <= 7:
        return "Q4_0"
    return None


@dataclass
class _Planned:
    name: str
    source: str
    ggml_type: str
    data: np.ndarray  # bytes (quantized) or float32 values
    shape: tuple[int, ...]
    theoretical: float | None
    fallback: bool = False
    note: str | None = None  # the fallback's reason and size cost (also in the report's notes)


def _quantized_tensor(
    gguf_name: str, source: str, weight: torch.Tensor, wq: WeightFakeQuant, requested: str,
    strict: bool, permute_heads: int | None, notes: list[str],
) -> _Planned:
    codes_t, scales_t = wq.codes_and_scales(weight)
    qmaxes, row_bits = _row_kinds(wq)
    theoretical = row_bits + 16.0 / wq.group_size
    ggml_type, reason, _ = _choose_type(qmaxes, wq.group_size, wq.d_in, requested)
    wanted = _requested_type(requested, qmaxes)
    if wanted is not None and ggml_type != wanted:
        raise EdgeRazorError(
            f"GGUF type {requested!r} cannot hold tensor {gguf_name!r} ({source}, {wq.names[0]}/{wq.names[1] or '-'}, "
            f"G={wq.group_size}): it {reason}; export with type 'auto' to write it losslessly as {ggml_type}"
        )
    shape = (codes_t.shape[0], wq.d_in)
    if reason is not None:
        bpw = bits_per_weight(ggml_type)
        message = (
            f"{gguf_name} ({source}, {wq.names[0]}/{wq.names[1] or '-'}, G={wq.group_size}) {reason}; "
            f"written losslessly as {ggml_type} at {bpw:.3f} bits/weight vs {theoretical:.3f} theoretical "
            f"({bpw / theoretical:.2f}x the size)"
        )
        if strict:
            raise EdgeRazorError(f"strict GGUF export refuses tensor {gguf_name!r}: {message}")
        notes.append(message)
    note = message if reason is not None else None
    if ggml_type == "F32":  # the dequantized weights themselves (float32 holds s * q exactly)
        values = dequantize(codes_t, scales_t, wq.group_size).cpu().numpy()[:, : wq.d_in]
        if permute_heads:
            values = llama_permute(values, permute_heads)
        return _Planned(gguf_name, source, "F32", np.ascontiguousarray(values, dtype=np.float32), shape,
                        theoretical, fallback=reason is not None, note=note)
    codes = codes_t.cpu().numpy()[:, : wq.d_in]
    scales = scales_t.cpu().numpy().astype(np.float32)
    if permute_heads:  # rows move with their codes and scales: still exact
        codes, scales = llama_permute(codes, permute_heads), llama_permute(scales, permute_heads)
    return _Planned(gguf_name, source, ggml_type, encode(ggml_type, codes, scales, wq.group_size), shape,
                    theoretical, fallback=reason is not None, note=note)


def _owner(model: nn.Module, param_name: str) -> tuple[str, nn.Module]:
    module_name = param_name.rpartition(".")[0]
    return module_name, model.get_submodule(module_name)


#: float types for weight matrices the recipe left unquantized (norms and other vectors stay F32)
FLOAT_TYPES = ("f32", "f16", "bf16")


def _float_tensor(values: np.ndarray, float_type: str) -> tuple[str, np.ndarray]:
    gguf = gguf_module()
    if float_type == "f16":
        return "F16", values.astype(np.float16)
    if float_type == "bf16":
        return "BF16", gguf.quants.quantize(values, gguf.GGMLQuantizationType.BF16)
    return "F32", np.ascontiguousarray(values, dtype=np.float32)


def _plan_tensors(model: nn.Module, adapter: ModelAdapter, arch: str, requested: str, strict: bool, notes: list[str],
                  float_type: str = "f32") -> list[_Planned]:
    config = model.config
    tmap = adapter.gguf_tensor_names(config)
    elsewhere = outside_text_gguf(adapter, config)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and embed is not None and head.weight is embed.weight
    text = config.get_text_config()
    n_head = int(text.num_attention_heads)
    n_kv = int(getattr(text, "num_key_value_heads", None) or n_head)
    planned: list[_Planned] = []
    seen: set[int] = set()
    for param_name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue  # a tied lm_head: llama.cpp reuses token_embd when "output" is absent
        seen.add(id(param))
        if any(param_name.startswith(prefix) for prefix in elsewhere):
            continue  # an encoder: its own file (mmproj) or, with a reason, none
        gguf_name = tmap.get_name(param_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise EdgeRazorError(
                f"parameter {param_name!r} has no llama.cpp {arch} tensor name; refusing to drop it silently"
            )
        if tied and gguf_name.startswith("output."):
            continue
        module_name, module = _owner(model, param_name)
        permute = None
        if arch in PERMUTED_ARCHS:
            if module_name.endswith("self_attn.q_proj"):
                permute = n_head
            elif module_name.endswith("self_attn.k_proj"):
                permute = n_kv
        wq = getattr(module, "weight_quant", None)
        if param_name.endswith(".weight") and isinstance(wq, WeightFakeQuant):
            planned.append(_quantized_tensor(gguf_name, param_name, param, wq, requested, strict, permute, notes))
            continue
        values = param.detach().float().cpu().numpy()
        if permute:
            values = llama_permute(values, permute)
        ggml_type, data = "F32", np.ascontiguousarray(values, dtype=np.float32)
        if values.ndim == 2:
            ggml_type, data = _float_tensor(values, float_type)
            notes.append(f"{gguf_name} ({param_name}) is not quantized by the recipe: written as {ggml_type}")
        planned.append(_Planned(gguf_name, param_name, ggml_type, data, tuple(values.shape), None))
    if not tied and head is not None and not any(p.name.startswith("output.") for p in planned):
        raise EdgeRazorError("untied lm_head was not exported (no 'output' tensor); refusing an incomplete GGUF")
    return planned


def outside_text_gguf(adapter: ModelAdapter, config) -> dict[str, str]:
    """Parameter-name prefixes that do not belong in the text GGUF -> where they go instead.

    A multimodal family's adapter declares them with ``gguf_outside_text(config)`` (its encoders go to an
    mmproj file, or nowhere with a reason); text-only adapters have none."""
    return dict(adapter.gguf_outside_text(config))


def _file_type(planned: list[_Planned]):
    gguf = gguf_module()
    counts: dict[str, int] = {}
    for p in planned:
        if p.ggml_type != "F32":
            counts[p.ggml_type] = counts.get(p.ggml_type, 0) + int(np.prod(p.shape))
    if not counts:
        return gguf.LlamaFileType.ALL_F32
    main = max(counts, key=counts.get)
    return getattr(gguf.LlamaFileType, f"MOSTLY_{main}")


def write_gguf(model: nn.Module, tokenizer, path: str | os.PathLike, type: str = "auto", strict: bool = False,
               quiet: bool = False, float_type: str = "f32", overwrite: bool = False) -> GGUFReport:
    """Write ``model`` (quantized by ``edgerazor.quantize``) and ``tokenizer`` as one GGUF file.

    ``type``: "auto" (all-ternary tensors with G % 256 == 0 -> TQ2_0, 4-bit -> Q4_0, mixed 4-bit /
    ternary -> Q4_0 losslessly with a note), "tq2_0" / "tq1_0" (that type for every tensor holding
    ternary rows), "q4_0" (every 4-bit or ternary tensor in Q4_0); an explicit type a tensor cannot
    take exactly is an error naming the tensor, never a silent fallback. ``strict=True`` refuses any
    tensor that can only be written in a wider type than its own (a note otherwise). Weight matrices
    the recipe left unquantized are written as ``float_type`` (f32: exact; f16 / bf16: 16-bit
    baselines, e.g. an unquantized model for speed comparisons). An existing ``path`` is refused
    unless ``overwrite`` and it is a GGUF file EdgeRazor wrote. The file is written beside ``path``,
    read back with gguf-py and checked (every tensor's name, type, shape and bytes, every key) and
    only then renamed into place, so ``path`` is either the old file or the whole new one.
    """
    gguf = gguf_module()
    if type not in REQUESTED_TYPES:
        raise EdgeRazorError(f"GGUF type {type!r} is not one of {', '.join(REQUESTED_TYPES)}")
    path = Path(path)
    target = {"overwrite": overwrite, "foreign": not_an_edgerazor_gguf, "what": "GGUF file"}
    check_target(path, **target)
    config = model.config
    adapter = adapter_for_model(model)
    arch = adapter.gguf_architecture(config)  # the family's adapter knows its llama.cpp architecture
    if tokenizer is None:
        raise EdgeRazorError("GGUF export needs the tokenizer: llama.cpp reads the vocabulary from the file")
    pre = detect_pre_tokenizer(tokenizer)
    notes: list[str] = [note] if (note := normalizer_note(tokenizer)) else []
    if float_type not in FLOAT_TYPES:
        raise EdgeRazorError(f"GGUF float type {float_type!r} is not one of {', '.join(FLOAT_TYPES)}")
    planned = _plan_tensors(model, adapter, arch, type, strict, notes, float_type)
    if arch in LLAMA_CPP_ARCH_NOTES:
        notes.append(LLAMA_CPP_ARCH_NOTES[arch])
    for prefix, where in outside_text_gguf(adapter, config).items():
        notes.append(f"parameters {prefix}* are not in this file: {where}")
    meta = getattr(config, "edgerazor", None) or {}
    q = (meta.get("recipe") or {}).get("quant") or {}
    if (q.get("kv_cache") or {}).get("bits") == 8 or (q.get("activation") or {}).get("bits") == 8:
        notes.append("the recipe trains with 8-bit activations / KV cache: run llama.cpp with "
                     "-ctk q8_0 -ctv q8_0 (KV) - weights-only formats cannot carry those settings")

    def write_keys(writer) -> None:
        name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
        if name:
            writer.add_name(Path(str(name)).name)
        writer.add_string(EXPORTER_KEY, __version__)
        write_hparams(writer, config, arch)
        writer.add_file_type(_file_type(planned))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_tokenizer(writer, tokenizer, int(config.get_text_config().vocab_size), pre)

    report = write_checked(path, target, getattr(gguf.MODEL_ARCH, arch.upper()), write_keys, planned,
                           GGUFReport(path, arch, pre, notes=notes))
    if not quiet:
        # the fallbacks as one summary table, not a line per tensor (their notes stay in the report)
        per_tensor = {p.note for p in planned if p.note}
        for note in notes:
            if note not in per_tensor:
                print(f"note: {note}")
        table = report.fallback_table()
        if table is not None:
            from rich.console import Console

            Console().print(table)
    return report


def write_checked(path: Path, target: dict, arch, write_keys: Callable, planned: list[_Planned],
                  report: GGUFReport) -> GGUFReport:
    """Write a GGUF file (keys by ``write_keys(writer)``, then the planned tensors) into a staged sibling of
    ``path``, read it back with gguf-py against what was meant before it replaces anything (``staged``'s
    rules, ``target``), and fill ``report`` with its size and tensors. Text models and mmproj files alike."""
    gguf = gguf_module()
    with staged(path, directory=False, **target) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        try:
            write_keys(writer)
            for p in planned:
                raw_dtype = None if p.ggml_type in ("F32", "F16") else getattr(gguf.GGMLQuantizationType, p.ggml_type)
                writer.add_tensor(p.name, p.data, raw_dtype=raw_dtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        check_gguf(tmp, {p.name: ExpectedTensor(p.ggml_type, p.shape, int(p.data.nbytes), _sha256(p.data))
                         for p in planned},
                   {key: value.value for key, value in writer.kv_data[0].items()})
    report.file_bytes = path.stat().st_size
    for p in planned:
        report.tensors.append(GGUFTensor(
            p.name, p.source, p.ggml_type, p.shape, int(p.data.nbytes),
            8.0 * p.data.nbytes / int(np.prod(p.shape)), p.theoretical, p.fallback,
        ))
    return report


def _sha256(data: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(data).view(np.uint8)).hexdigest()
