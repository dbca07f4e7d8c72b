"""Size accounting the paper's way (Tables 17-20).

A quantized weight costs its quantizer's bits (1.58 ternary, 4, 8) plus 16/G for its group's
fp16 scale; everything left unquantized costs 16 bits. Tied weights are counted once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from edgerazor.plugin_manager import get_plugins
from edgerazor.quant.modules import QuantConv3d, QuantEmbedding, QuantLinear

SCALE_BITS = 16


@dataclass
class BitsSummary:
    total_params: int
    quantized_params: int
    quantized_fraction: float
    effective_bits: float  # mean weight bits of the quantized decoder linears (no scales): 1.8825 at rho=1/8
    bits_per_quantized_weight: float  # all quantized tensors, scales included
    total_bits: float
    bf16_bytes: float
    quantized_bytes: float
    compression_ratio: float

    def to_dict(self) -> dict:
        return asdict(self)


def count_bits(model: nn.Module) -> BitsSummary:
    """Count a quantized model's storage; works on meta-device models."""
    quantizers = get_plugins().registry("quantizers")
    params = {id(p): p.numel() for p in model.parameters()}
    total_params = sum(params.values())
    seen: set[int] = set()
    q_params = 0
    q_bits = 0.0
    decoder_params, decoder_bits = 0, 0.0
    for module in model.modules():
        if not isinstance(module, (QuantLinear, QuantEmbedding, QuantConv3d)) or id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        wq = module.weight_quant
        d_out, d_in = module.weight.shape[0], wq.d_in  # a Conv3d counts as its flattened [out, in*t*h*w]
        high_rows = int(wq.precision_mask.sum())
        high_bits = quantizers.get(wq.names[0]).bits
        low_bits = quantizers.get(wq.names[1]).bits if wq.names[1] else high_bits
        weight_bits = d_in * (high_rows * high_bits + (d_out - high_rows) * low_bits)
        scale_bits = d_out * (wq.padded_dim // wq.group_size) * SCALE_BITS
        q_params += d_out * d_in
        q_bits += weight_bits + scale_bits
        if isinstance(module, QuantLinear) and wq.component == "decoder" and module is not model.get_output_embeddings():
            decoder_params += d_out * d_in
            decoder_bits += weight_bits
    total_bits = q_bits + (total_params - q_params) * 16
    return BitsSummary(
        total_params=total_params,
        quantized_params=q_params,
        quantized_fraction=q_params / total_params if total_params else 0.0,
        effective_bits=decoder_bits / decoder_params if decoder_params else 16.0,
        bits_per_quantized_weight=q_bits / q_params if q_params else 16.0,
        total_bits=total_bits,
        bf16_bytes=total_params * 2,
        quantized_bytes=total_bits / 8,
        compression_ratio=total_params * 16 / total_bits,
    )


def component_counts(model: nn.Module, adapter) -> dict[str, dict[str, int]]:
    """``{component: {"params", "quantized_params"}}`` by the adapter's component names, plus ``other``
    (norms outside the decoder layers, ...): where a model's parameters are and which are quantized."""
    from fnmatch import fnmatchcase

    tables = {"embedding": model.get_input_embeddings(), "lm_head": model.get_output_embeddings()}
    table_ids = {id(m.weight): name for name, m in tables.items() if m is not None}
    comps = [c for c in adapter.components() if c.name not in tables]
    out = {c.name: {"params": 0, "quantized_params": 0} for c in adapter.components()} | {
        "other": {"params": 0, "quantized_params": 0}}
    seen: set[int] = set()
    for name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            owner = table_ids.get(id(param)) or next(
                (c.name for c in comps if any(fnmatchcase(name, pat) for pat in c.patterns)), "other")
            out[owner]["params"] += param.numel()
            wq = getattr(module, "weight_quant", None)
            if p_name == "weight" and wq is not None:
                out[owner]["quantized_params"] += param.numel()
    return out
