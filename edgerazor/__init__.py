"""EdgeRazor: mixed-precision quantization-aware distillation of LLMs to 1.58-4 bits.

The public names are imported on first use (module ``__getattr__``), so ``import edgerazor`` and
the command line's ``--help`` stay fast: torch and transformers load only when a name needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from edgerazor.errors import EdgeRazorError, PluginError, QuantizationError, RecipeError
from edgerazor.version import __version__

#: public name -> module that defines it
_LAZY = {
    "hookimpl": "edgerazor.hookspecs",
    "count_bits": "edgerazor.quant",
    "quantize": "edgerazor.quant",
    "set_kv_quant_enabled": "edgerazor.quant",
    "load_quantized": "edgerazor.quant.checkpoint",
    "load": "edgerazor.runtime.loading",
    "Recipe": "edgerazor.recipe",
    "load_recipe": "edgerazor.recipe",
}

__all__ = [
    "EdgeRazorError", "PluginError", "QuantizationError", "Recipe", "RecipeError", "__version__", "count_bits",
    "hookimpl", "load", "load_quantized", "load_recipe", "quantize", "set_kv_quant_enabled",
]

if TYPE_CHECKING:
    from edgerazor.hookspecs import hookimpl
    from edgerazor.quant import count_bits, quantize, set_kv_quant_enabled
    from edgerazor.quant.checkpoint import load_quantized
    from edgerazor.recipe import Recipe, load_recipe
    from edgerazor.runtime.loading import load


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edgerazor' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
