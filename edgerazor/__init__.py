"""EdgeRazor: mixed-precision quantization-aware distillation of LLMs to 1.58-4 bits."""

from edgerazor.errors import EdgeRazorError, PluginError, QuantizationError, RecipeError
from edgerazor.hookspecs import hookimpl
from edgerazor.quant import count_bits, quantize, set_kv_quant_enabled
from edgerazor.quant.checkpoint import load_quantized
from edgerazor.runtime.loading import load
from edgerazor.recipe import Recipe, load_recipe

__all__ = [
    "EdgeRazorError", "PluginError", "QuantizationError", "Recipe", "RecipeError", "count_bits",
    "hookimpl", "load", "load_quantized", "load_recipe", "quantize", "set_kv_quant_enabled",
]
