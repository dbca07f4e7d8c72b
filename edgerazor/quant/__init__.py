"""Fake quantization: per-group quantizer machinery, fake-quant modules, model surgery, accounting."""

from edgerazor.quant.bits import BitsSummary, count_bits
from edgerazor.quant.kv import set_kv_quant_enabled
from edgerazor.quant.modules import QuantEmbedding, QuantLinear
from edgerazor.quant.surgery import QuantReport, quantize

__all__ = ["BitsSummary", "QuantEmbedding", "QuantLinear", "QuantReport", "count_bits", "quantize",
           "set_kv_quant_enabled"]
