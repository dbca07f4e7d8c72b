"""A model adapter for GPT-NeoX (Pythia), a family EdgeRazor does not ship.

GPT-NeoX keeps its decoder at ``gpt_neox.layers`` (not ``model.layers``), fuses q/k/v into one
``query_key_value`` linear and names its attention width ``head_size``: exactly what the adapter
contract exists for. Everything else (loading, components, data) is the default behaviour.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from edgerazor import hookimpl
from edgerazor.adapters import ModelAdapter


class GPTNeoXAdapter(ModelAdapter):
    def attention_modules(self, model, patterns):
        """GPT-NeoX attention modules call transformers' attention interface, so KV8 reaches them."""
        return [
            (name, module, int(module.head_size))
            for name, module in model.named_modules()
            if type(module).__name__ == "GPTNeoXAttention" and any(fnmatchcase(name, p) for p in patterns)
        ]


GPT_NEOX = GPTNeoXAdapter(
    name="gpt_neox",
    model_types=("gpt_neox",),
    decoder_patterns=("gpt_neox.layers.*",),
    layers_path="gpt_neox.layers",
    default_group_size=64,
    description="GPT-NeoX / Pythia (example third-party adapter)",
)


@hookimpl
def register_adapters(register):
    register(GPT_NEOX.name, GPT_NEOX)
