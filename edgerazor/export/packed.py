"""The packed format: the trained integer codes at their true bit-width, bit-exact to training.

A directory with ``model.safetensors`` (per quantized layer: packed high-precision rows, packed
low-precision rows, fp16 scales and the bit-packed row mask; every other tensor as trained),
``edgerazor_packed.json`` (format version, recipe, allocation, W-A-KV, per-layer layout with the
codec of each row part and its activation quantization, the KV-cache quantization, a manifest with
the sha256 and size of every other file, size report), ``edgerazor_packed.sha256`` (the metadata's
own checksum), ``config.json`` and the tokenizer files. ``edgerazor.export.packed_format`` holds the
checks a loader runs. The exporter only reads codes (``weight_quant.codes_and_scales``): nothing is
re-quantized from dequantized floats. A part's codec is the quantizer's declared ``codec`` or the
generic ``sym{qmax}`` of ``edgerazor.export.pack``; its name alone says how to read the bytes.
An export is written beside its target and renamed into place; it never replaces anything but a
previous packed export, and only when asked to (``overwrite``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from edgerazor.errors import EdgeRazorError
from edgerazor.export import pack
from edgerazor.export.files import check_target, staged
from edgerazor.export.packed_format import (  # noqa: F401 - the format's names, re-exported
    CHECKSUM_FILE, FORMAT, FORMAT_VERSION, METADATA_FILE, TOKENIZER_FILES, V1_FILES, WEIGHTS_FILE, checksum_line,
    codec_of, manifest_of, quant_structure, read_packed, tokenizer_summary,
)
from edgerazor.quant.bits import SCALE_BITS
from edgerazor.quant.modules import QuantConv3d, QuantEmbedding, QuantLinear


PACKED_KINDS = ("decoder", "table", "encoder")


@dataclass
class TensorSize:
    name: str
    kind: str  # "decoder", "table" (embedding / lm_head) or "encoder" (vision, ...) for packed layers, else the dtype
    params: int
    bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.params if self.params else 0.0


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def pack_layer(name: str, module: QuantLinear | QuantEmbedding | QuantConv3d) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Packed tensors and layout metadata of one quantized layer (a Conv3d as its flattened ``[out, in*t*h*w]``)."""
    wq = module.weight_quant
    codes, scales = wq.codes_and_scales(module.weight.reshape(module.weight.shape[0], -1))
    mask = wq.precision_mask.cpu()
    high_name, low_name = wq.names
    tensors = {f"{name}.scales": torch.from_numpy(pack.pack_scales(_np(scales))),
               f"{name}.mask": torch.from_numpy(pack.pack_mask(_np(mask)))}
    layout = {
        "kind": ("embedding" if isinstance(module, QuantEmbedding)
                 else "conv3d" if isinstance(module, QuantConv3d) else "linear"),
        "d_out": int(codes.shape[0]), "d_in": int(wq.d_in), "padded_d_in": int(wq.padded_dim),
        "group_size": int(wq.group_size), "high": high_name, "low": low_name,
        "high_rows": int(mask.sum()),
    }
    for part, quantizer, quantizer_name, rows in (("high", wq.high, high_name, mask), ("low", wq.low, low_name, ~mask)):
        if quantizer is None or not bool(rows.any()):
            continue
        codec = codec_of(quantizer, quantizer_name, name)
        tensors[f"{name}.codes_{part}"] = torch.from_numpy(pack.get_codec(codec)[0](_np(codes[rows])))
        layout[f"codec_{part}"] = codec
    return tensors, layout


def _quantized_modules(model: torch.nn.Module) -> list[tuple[str, QuantLinear | QuantEmbedding | QuantConv3d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding, QuantConv3d))]


def not_a_packed_export(path: Path) -> str | None:
    """None when ``path`` is a packed export (any version) holding nothing but its own files; else why not."""
    if not path.is_dir():
        return "it is not a directory"
    try:
        meta = json.loads((path / METADATA_FILE).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return f"it has no readable {METADATA_FILE}"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return f"its {METADATA_FILE} does not say format {FORMAT!r}"
    manifest = meta.get("manifest")
    own = (set(manifest) if isinstance(manifest, dict) else set(V1_FILES)) | {METADATA_FILE, CHECKSUM_FILE}
    parents = {p for rel in own for p in Path(rel).parents}
    foreign = sorted(rel for p in path.rglob("*")
                     if (rel := p.relative_to(path).as_posix()) not in own and Path(rel) not in parents)
    if foreign:
        return f"it also holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, which the export did not write"
    return None


def export_packed(model: torch.nn.Module, tokenizer, out_dir: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write ``model`` (fake-quantized by ``edgerazor.quantize``) as a packed directory, atomically.

    An existing ``out_dir`` is refused unless ``overwrite`` and it is a previous packed export (holding
    nothing else); the new export is written beside it, checked as a loader would, and renamed into place.
    """
    meta = getattr(model.config, "edgerazor", None)
    if not meta:
        raise EdgeRazorError("the model is not quantized by EdgeRazor (config.edgerazor is missing)")
    if tokenizer is None:
        raise EdgeRazorError("a packed export needs the tokenizer: the student directory has no tokenizer files")
    out_dir = Path(out_dir)
    target = {"overwrite": overwrite, "foreign": not_a_packed_export, "what": "packed export"}
    check_target(out_dir, **target)  # before the packing work

    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    sizes: list[TensorSize] = []
    packed_weights: dict[int, str] = {}
    activations, kv_cache = quant_structure(model)
    for name, module in _quantized_modules(model):
        owner = packed_weights.get(id(module.weight))
        if owner is not None:  # tied to an already packed tensor: store it once
            layers[name] = {**layers[owner], "activation": activations[name], "tied_to": owner}
            continue
        packed_weights[id(module.weight)] = name
        layer_tensors, layout = pack_layer(name, module)
        tensors.update(layer_tensors)
        layers[name] = layout | {"activation": activations[name]}
        kind = ("table" if isinstance(module, QuantEmbedding) or module is model.get_output_embeddings()
                else "decoder" if module.weight_quant.component == "decoder" else "encoder")
        sizes.append(TensorSize(name, kind, layout["d_out"] * layout["d_in"],
                                sum(t.numel() * t.element_size() for t in layer_tensors.values())))
    quantized_params = {f"{n}.weight" for n in layers}
    for key, value in model.state_dict().items():
        if key in quantized_params or key.endswith("precision_mask") or key in tensors:
            continue
        tensors[key] = value.detach().cpu().contiguous()
        sizes.append(TensorSize(key, str(value.dtype).removeprefix("torch."), value.numel(),
                                value.numel() * value.element_size()))
    report = size_report(sizes, model)
    with staged(out_dir, directory=True, **target) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        metadata = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "recipe": meta["recipe"],
            "adapter": meta.get("adapter"),
            "allocation": meta["recipe"]["quant"]["weight"]["allocation"],
            "w_a_kv": _w_a_kv(meta["recipe"]),
            "layers": layers,
            "kv_cache": kv_cache,
            "tokenizer": tokenizer_summary(tokenizer),
            "manifest": manifest_of(tmp),
            "size": report,
        }
        encoded = json.dumps(metadata, indent=1).encode("utf-8")
        (tmp / METADATA_FILE).write_bytes(encoded)
        (tmp / CHECKSUM_FILE).write_text(checksum_line(encoded))
        read_packed(tmp)  # what a loader checks, before the export replaces anything
    return metadata


def _w_a_kv(recipe: dict[str, Any]) -> str:
    from edgerazor.recipe import recipe_from_dict

    return recipe_from_dict(recipe).quant.w_a_kv


def size_report(sizes: list[TensorSize], model: torch.nn.Module) -> dict[str, Any]:
    """Bytes on disk per tensor and overall, against BF16 and against the paper's accounting."""
    from edgerazor.quant.bits import count_bits

    theory = count_bits(model)
    def bits(kind: str) -> float:
        chosen = [s for s in sizes if s.kind == kind]
        params = sum(s.params for s in chosen)
        return 8 * sum(s.bytes for s in chosen) / params if params else 0.0

    total_bytes = sum(s.bytes for s in sizes)
    bf16_bytes = 2 * theory.total_params
    return {
        "tensors": [asdict(s) | {"bits_per_weight": s.bits_per_weight} for s in sizes],
        "total_bytes": total_bytes,
        "bf16_bytes": bf16_bytes,
        "compression_vs_bf16": bf16_bytes / total_bytes,
        # decoder linears (SQMP rows): theory is the recipe's bits + 16/G for the scales
        "decoder_bits_per_weight": bits("decoder"),
        "decoder_theory_bits_per_weight": theory.effective_bits + SCALE_BITS / _decoder_group(sizes, model),
        "bits_per_quantized_weight": 8 * sum(s.bytes for s in sizes if s.kind in PACKED_KINDS)
        / max(1, sum(s.params for s in sizes if s.kind in PACKED_KINDS)),
        "theory_bits_per_quantized_weight": theory.bits_per_quantized_weight,
    }


def _decoder_group(sizes: list[TensorSize], model: torch.nn.Module) -> int:
    for name, module in _quantized_modules(model):
        if any(s.name == name and s.kind == "decoder" for s in sizes):
            return module.weight_quant.group_size
    return 1
