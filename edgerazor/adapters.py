"""Model adapters: what EdgeRazor must know about an architecture family.

An adapter names the transformers ``model_type`` values it serves, where the decoder lives
(so recipes can use the default ``include`` patterns), and the paper's group size for it.
Adapters are plugins (``register_adapters``); the built-ins live in ``edgerazor.model_adapters``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from edgerazor.errors import PluginError


@dataclass(frozen=True)
class ModelAdapter:
    name: str
    model_types: tuple[str, ...]
    decoder_patterns: tuple[str, ...] = ("model.layers.*",)
    default_group_size: int = 256
    description: str = ""

    def matches(self, model_type: str) -> bool:
        return model_type in self.model_types

    def decoder_linear_names(self, model: nn.Module) -> list[str]:
        from fnmatch import fnmatchcase

        return [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and any(fnmatchcase(name, p) for p in self.decoder_patterns)
        ]


def resolve_adapter(model_type: str, name: str | None = None) -> ModelAdapter:
    """The adapter called ``name``, or the one that serves ``model_type``."""
    from edgerazor.plugin_manager import get_plugins

    registry = get_plugins().registry("adapters")
    if name is not None:
        return registry.get(name)
    for adapter_name in registry.names():
        adapter = registry.get(adapter_name)
        if adapter.matches(model_type):
            return adapter
    raise PluginError(
        f"no model adapter serves model_type {model_type!r}; available adapters: "
        + ", ".join(f"{n} ({', '.join(registry.get(n).model_types)})" for n in registry.names())
    )
