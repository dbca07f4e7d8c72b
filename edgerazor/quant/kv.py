"""KV-cache fake quantization through transformers' attention-function registry.

Attention modules compute K (after RoPE) and V, append them to the cache, then call the function
registered under ``config._attn_implementation``. We register a wrapper for each inner
implementation (``edgerazor_kv:sdpa``, ...) that quantizes K and V per token and per group along
``head_dim`` before calling the inner one. Because this sits inside the attention forward, it stays
on under gradient checkpointing (where transformers drops ``past_key_values``) and in
``generate()``; the cache keeps raw K/V and quantization is per token, so re-quantizing cached
tokens at each step gives exactly what quantize-on-write would.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from edgerazor.quant.grouping import GroupQuantizer, fake_quantize

PREFIX = "edgerazor_kv:"


class KVFakeQuant(nn.Module):
    """Attached to an attention module as ``edgerazor_kv``; quantizes K and V tensors."""

    def __init__(self, quantizer: GroupQuantizer, quantizer_name: str, group_size: int) -> None:
        super().__init__()
        self.quantizer, self.quantizer_name, self.group_size = quantizer, quantizer_name, group_size
        self.enabled = True

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return fake_quantize(states, self.quantizer, self.group_size) if self.enabled else states

    def extra_repr(self) -> str:
        return f"{self.quantizer_name}, group_size={self.group_size}, enabled={self.enabled}"


def _inner_function(module: nn.Module, inner: str) -> Callable:
    if inner == "eager":
        # Each modeling file defines its own eager attention; use the attention module's.
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[inner]


def _make_wrapper(inner: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        kv = getattr(module, "edgerazor_kv", None)
        if kv is not None:
            key, value = kv(key), kv(value)
        return _inner_function(module, inner)(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"edgerazor_kv_{inner}"
    return attention


def wrap_attention_implementation(config) -> str:
    """Point ``config`` (and its sub-configs) at the KV-quantizing wrapper of its current implementation."""
    current = config._attn_implementation or "eager"
    if current.startswith(PREFIX):
        return current
    name = PREFIX + current
    if name not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(name, _make_wrapper(current))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    config._attn_implementation = name
    return name


def set_kv_quant_enabled(model: nn.Module, enabled: bool) -> int:
    """Turn KV fake quantization on or off everywhere; returns how many attention modules it touched."""
    count = 0
    for module in model.modules():
        if isinstance(module, KVFakeQuant):
            module.enabled = enabled
            count += 1
    return count
