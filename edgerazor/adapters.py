"""Model adapters: what EdgeRazor must know about an architecture family.

An adapter names the transformers ``model_type`` values it serves, where the decoder lives
(so recipes can use the default ``include`` patterns), and the paper's group size for it.
Adapters are plugins (``register_adapters``); the built-ins live in ``edgerazor.model_adapters``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


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

        from torch import nn

        return [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and any(fnmatchcase(name, p) for p in self.decoder_patterns)
        ]
