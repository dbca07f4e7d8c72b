"""Fake-quantized drop-in modules that keep the original Parameters (so tied weights stay tied).

``QuantLinear`` quantizes its weight per row and group (rows chosen by the stored
``precision_mask`` buffer use ``high``, the others ``low``) and optionally its input activations
per token and group. ``QuantEmbedding`` quantizes only the rows it looks up: groups never cross
rows, so this equals quantizing the whole table first, at a fraction of the cost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgerazor.quant.grouping import (
    GroupQuantizer,
    dequantize,
    fake_quantize,
    quantize_rows,
    straight_through,
)


def _pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    return x if x.shape[-1] == size else F.pad(x, (0, size - x.shape[-1]))


class ActivationFakeQuant(nn.Module):
    """Dynamic per-token, per-group fake quantization of a linear layer's input."""

    def __init__(self, quantizer: GroupQuantizer, quantizer_name: str, group_size: int, padded_dim: int) -> None:
        super().__init__()
        self.quantizer, self.quantizer_name = quantizer, quantizer_name
        self.group_size, self.padded_dim = group_size, padded_dim
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        d_in = x.shape[-1]
        return fake_quantize(_pad_last(x, self.padded_dim), self.quantizer, self.group_size)[..., :d_in]

    def extra_repr(self) -> str:
        return f"{self.quantizer_name}, group_size={self.group_size}, enabled={self.enabled}"


class WeightFakeQuant(nn.Module):
    """Row-mixed weight quantization state: quantizers, group size and the row mask buffer."""

    def __init__(
        self,
        d_out: int,
        d_in: int,
        high: GroupQuantizer,
        low: GroupQuantizer | None,
        names: tuple[str, str | None],
        group_size: int,
        mask: torch.Tensor,
        component: str = "decoder",
    ) -> None:
        super().__init__()
        self.high, self.low, self.names = high, low, names
        self.component = component  # the adapter component it belongs to (size accounting per component)
        self.group_size = group_size
        self.d_in = d_in
        self.padded_dim = -(-d_in // group_size) * group_size
        self.register_buffer("precision_mask", mask.to(torch.bool).reshape(d_out).clone())

    @torch.no_grad()
    def codes_and_scales(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 codes ``[d_out, padded_d_in]`` and fp16-valued scales ``[d_out, padded_d_in // G]``."""
        padded = _pad_last(weight.detach(), self.padded_dim)
        return quantize_rows(padded, self.precision_mask, self.high, self.low, self.group_size)

    @torch.no_grad()
    def dequantized(self, weight: torch.Tensor) -> torch.Tensor:
        codes, scales = self.codes_and_scales(weight)
        return dequantize(codes, scales, self.group_size)[:, : self.d_in]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return straight_through(weight, self.dequantized(weight))

    def high_fraction(self) -> float:
        return float(self.precision_mask.float().mean()) if self.precision_mask.numel() else 0.0

    def extra_repr(self) -> str:
        return (
            f"high={self.names[0]}, low={self.names[1]}, group_size={self.group_size}, "
            f"high_rows={int(self.precision_mask.sum())}/{self.precision_mask.numel()}"
        )


class QuantLinear(nn.Linear):
    """``nn.Linear`` whose forward uses the fake-quantized weight (and optionally input)."""

    weight_quant: WeightFakeQuant
    input_quant: ActivationFakeQuant | None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, weight_quant: WeightFakeQuant, input_quant: ActivationFakeQuant | None
    ) -> "QuantLinear":
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight = linear.weight  # the same Parameter: ties and optimizer state survive
        module.bias = linear.bias
        module.weight_quant = weight_quant
        module.input_quant = input_quant
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return F.linear(x, self.weight_quant(self.weight), self.bias)


class QuantEmbedding(nn.Embedding):
    """``nn.Embedding`` returning fake-quantized rows (groups along the hidden dimension)."""

    weight_quant: WeightFakeQuant

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, weight_quant: WeightFakeQuant) -> "QuantEmbedding":
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        for attr in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                     "scale_grad_by_freq", "sparse"):
            setattr(module, attr, getattr(embedding, attr))
        module.weight = embedding.weight
        module.weight_quant = weight_quant
        return module

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = super().forward(input_ids)
        wq = self.weight_quant
        with torch.no_grad():
            flat = _pad_last(rows.detach().reshape(-1, rows.shape[-1]), wq.padded_dim)
            mask = wq.precision_mask[input_ids.reshape(-1)]
            codes, scales = quantize_rows(flat, mask, wq.high, wq.low, wq.group_size)
            rows_hat = dequantize(codes, scales, wq.group_size)[:, : rows.shape[-1]].reshape(rows.shape)
        return straight_through(rows, rows_hat)


class QuantConv3d(nn.Conv3d):
    """``nn.Conv3d`` (a video patch embedding) with its weight fake-quantized per output channel.

    The weight ``[out, in, t, h, w]`` is flattened to ``[out, in * t * h * w]`` rows and quantized
    like a linear weight (groups of G along the flattened kernel, zero-padded when the recipe asks,
    fp16 scales, straight-through estimator), so exporters treat it as one more quantized matrix.
    """

    weight_quant: WeightFakeQuant

    @classmethod
    def from_conv3d(cls, conv: nn.Conv3d, weight_quant: WeightFakeQuant) -> "QuantConv3d":
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                     "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(module, attr, getattr(conv, attr))
        module.weight = conv.weight
        module.bias = conv.bias
        module.weight_quant = weight_quant
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w_hat = self.weight_quant(w.reshape(w.shape[0], -1)).reshape(w.shape)
        return self._conv_forward(x, w_hat, self.bias)
