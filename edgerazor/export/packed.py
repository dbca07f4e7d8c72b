"""The packed format: the trained integer codes at their true bit-width, bit-exact to training.

A directory with ``model.safetensors`` (per quantized layer: packed high-precision rows, packed
low-precision rows, fp16 scales and the bit-packed row mask; every other tensor as trained),
``edgerazor_packed.json`` (format version, recipe, allocation, W-A-KV, per-layer layout, file
checksum, size report), ``config.json`` and the tokenizer files. The exporter only reads codes
(``weight_quant.codes_and_scales``): nothing is re-quantized from dequantized floats.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from edgerazor.errors import EdgeRazorError
from edgerazor.export import pack
from edgerazor.quant.bits import SCALE_BITS
from edgerazor.quant.modules import QuantEmbedding, QuantLinear

FORMAT = "edgerazor-packed"
FORMAT_VERSION = 1
METADATA_FILE = "edgerazor_packed.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

#: quantizer name -> codec in ``edgerazor.export.pack``
CODEC_FOR = {"ternary": "ternary_base3", "int4": "int4", "int8": "int8"}


@dataclass
class TensorSize:
    name: str
    kind: str  # "decoder" or "table" (embedding / lm_head) for packed layers, else the stored dtype
    params: int
    bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.params if self.params else 0.0


def _codec(quantizer: str, layer: str) -> str:
    try:
        return CODEC_FOR[quantizer]
    except KeyError:
        raise EdgeRazorError(
            f"layer {layer!r}: quantizer {quantizer!r} has no packed codec; packable: {', '.join(CODEC_FOR)}"
        ) from None


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def pack_layer(name: str, module: QuantLinear | QuantEmbedding) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Packed tensors and layout metadata of one quantized layer."""
    wq = module.weight_quant
    codes, scales = wq.codes_and_scales(module.weight)
    mask = wq.precision_mask.cpu()
    high_name, low_name = wq.names
    tensors = {f"{name}.scales": torch.from_numpy(pack.pack_scales(_np(scales))),
               f"{name}.mask": torch.from_numpy(pack.pack_mask(_np(mask)))}
    layout = {
        "kind": "embedding" if isinstance(module, QuantEmbedding) else "linear",
        "d_out": int(codes.shape[0]), "d_in": int(wq.d_in), "padded_d_in": int(wq.padded_dim),
        "group_size": int(wq.group_size), "high": high_name, "low": low_name,
        "high_rows": int(mask.sum()),
    }
    for part, quantizer, rows in (("high", high_name, mask), ("low", low_name, ~mask)):
        if quantizer is None or not bool(rows.any()):
            continue
        codec = _codec(quantizer, name)
        tensors[f"{name}.codes_{part}"] = torch.from_numpy(pack.CODECS[codec][0](_np(codes[rows])))
        layout[f"codec_{part}"] = codec
    return tensors, layout


def _quantized_modules(model: torch.nn.Module) -> list[tuple[str, QuantLinear | QuantEmbedding]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_packed(model: torch.nn.Module, tokenizer, out_dir: str | Path) -> dict[str, Any]:
    """Write ``model`` (fake-quantized by ``edgerazor.quantize``) as a packed directory, atomically."""
    meta = getattr(model.config, "edgerazor", None)
    if not meta:
        raise EdgeRazorError("the model is not quantized by EdgeRazor (config.edgerazor is missing)")
    if tokenizer is None:
        raise EdgeRazorError("a packed export needs the tokenizer: the student directory has no tokenizer files")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    sizes: list[TensorSize] = []
    packed_weights: dict[int, str] = {}
    for name, module in _quantized_modules(model):
        owner = packed_weights.get(id(module.weight))
        if owner is not None:  # tied to an already packed tensor: store it once
            layers[name] = {**layers[owner], "tied_to": owner}
            continue
        packed_weights[id(module.weight)] = name
        layer_tensors, layout = pack_layer(name, module)
        tensors.update(layer_tensors)
        layers[name] = layout
        kind = "table" if isinstance(module, QuantEmbedding) or module is model.get_output_embeddings() else "decoder"
        sizes.append(TensorSize(name, kind, layout["d_out"] * layout["d_in"],
                                sum(t.numel() * t.element_size() for t in layer_tensors.values())))
    quantized_params = {f"{n}.weight" for n in layers}
    for key, value in model.state_dict().items():
        if key in quantized_params or key.endswith("precision_mask") or key in tensors:
            continue
        tensors[key] = value.detach().cpu().contiguous()
        sizes.append(TensorSize(key, str(value.dtype).removeprefix("torch."), value.numel(),
                                value.numel() * value.element_size()))
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
    model.config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)

    report = size_report(sizes, model)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "recipe": meta["recipe"],
        "adapter": meta.get("adapter"),
        "allocation": meta["recipe"]["quant"]["weight"]["allocation"],
        "w_a_kv": _w_a_kv(meta["recipe"]),
        "layers": layers,
        "weights_sha256": _sha256(tmp / WEIGHTS_FILE),
        "size": report,
    }
    (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
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
        "bits_per_quantized_weight": 8 * sum(s.bytes for s in sizes if s.kind in ("decoder", "table"))
        / max(1, sum(s.params for s in sizes if s.kind in ("decoder", "table"))),
        "theory_bits_per_quantized_weight": theory.bits_per_quantized_weight,
    }


def _decoder_group(sizes: list[TensorSize], model: torch.nn.Module) -> int:
    for name, module in _quantized_modules(model):
        if any(s.name == name and s.kind == "decoder" for s in sizes):
            return module.weight_quant.group_size
    return 1
