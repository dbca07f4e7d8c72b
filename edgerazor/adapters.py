"""Model adapters: the one place that knows a model family.

An adapter says which transformers ``model_type`` values it serves and, for those models, how to
load teacher and student (``from_pretrained`` of a hub id or local directory; from a config for
tests and size accounting), which components exist and what each is quantized to by default
(with the paper's group size), where the decoder layer list is (LAFD reads the residual stream
there), which modules are attention (KV-cache quantization), how training rows are built, how a
chat template and ``<think>`` blocks are handled, and the llama.cpp (GGUF) architecture with its
tensor-name map. The core asks the adapter and never guesses a family's layout itself.

Adapters are plugins (``register_adapters``). Instantiate ``ModelAdapter`` with other field values
for a family with the standard layout, or subclass it and override methods for anything else;
``GenericAdapter`` serves every decoder-only causal LM with the standard layout as a fallback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from edgerazor.errors import EdgeRazorError
from edgerazor.plugin_manager import get_plugins

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig

#: ``--adapter auto`` / ``model.adapter: auto`` (or unset): choose from the teacher's model_type.
AUTO = "auto"


class AdapterError(EdgeRazorError):
    """The adapter asked for cannot serve this model (wrong family, unknown model type, unknown layout)."""


@dataclass(frozen=True)
class Component:
    """A part of the model and how a recipe quantizes it unless told otherwise.

    ``patterns`` are module-name globs (``embedding`` and ``lm_head`` are found through
    ``get_input_embeddings`` / ``get_output_embeddings`` instead); ``quantized`` is the default
    (16-bit when False); ``group_size`` None means the decoder's. For a component beyond decoder,
    embedding and lm_head (a vision or audio encoder), ``quantizer``, ``pad`` and ``include_conv3d``
    are its defaults under the recipe's ``quant.components.<name>``: every ``nn.Linear`` under
    ``patterns`` (and every ``nn.Conv3d`` when ``include_conv3d``) is weight-quantized, rows
    zero-padded to a multiple of the group size when ``pad`` (reported per layer by ``quantize``).
    """

    name: str
    patterns: tuple[str, ...] = ()
    quantized: bool = True
    group_size: int | None = None
    description: str = ""
    quantizer: str = "int4"
    pad: bool = False
    include_conv3d: bool = False


@dataclass(frozen=True)
class ModelAdapter:
    """A model family's contract with EdgeRazor (see the module docstring and docs/plugins.md)."""

    name: str
    model_types: tuple[str, ...]
    decoder_patterns: tuple[str, ...] = ("model.layers.*",)
    layers_path: str = "model.layers"
    default_group_size: int = 256
    description: str = ""
    #: model_type -> llama.cpp architecture (``gguf.MODEL_ARCH`` member name, lower case) for GGUF export
    gguf_archs: dict[str, str] = field(default_factory=dict, compare=False)
    #: the ``<think>`` delimiters of the family's reasoning traces (``data.strip_think`` removes them)
    think_tags: tuple[str, str] = ("<think>", "</think>")
    #: served only when named explicitly or when no other adapter serves the model type
    fallback: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    # -- which models --------------------------------------------------------------------------

    def matches(self, model_type: str) -> bool:
        return model_type in self.model_types

    def check_model(self, model: nn.Module) -> None:
        """Raise ``AdapterError`` unless ``model`` has the layout this adapter relies on."""
        from torch import nn

        try:
            layers = model.get_submodule(self.layers_path)
        except AttributeError:
            layers = None
        if not isinstance(layers, nn.ModuleList):
            raise AdapterError(
                f"adapter {self.name!r}: {type(model).__name__} has no decoder layer list at {self.layers_path!r}; "
                "this model needs an adapter for its layout (see docs/plugins.md, register_adapters)"
            )

    # -- loading ------------------------------------------------------------------------------

    def model_class(self, config: PretrainedConfig):
        """The transformers class to build or load ``config`` with."""
        from edgerazor.shapes import model_class

        return model_class(config)

    def from_config(self, config: PretrainedConfig, device: str = "meta") -> nn.Module:
        """A model of ``config``'s shape with random weights (``meta``: no memory; tests, size accounting)."""
        from edgerazor.shapes import build_model

        return build_model(config, device, self.model_class(config))

    def load_config(self, location: str, trust_remote_code: bool = False) -> PretrainedConfig:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)

    def load_model(self, location: str, dtype: str = "float32", trust_remote_code: bool = False) -> nn.Module:
        """Teacher or student weights from a hub id or a local directory."""
        import torch

        config = self.load_config(location, trust_remote_code)
        cls = self.model_class(config)
        model = cls.from_pretrained(location, config=config, dtype=getattr(torch, dtype),
                                    trust_remote_code=trust_remote_code)
        self.check_model(model)
        return model

    def load_teacher(self, location: str, dtype: str = "float32", trust_remote_code: bool = False) -> nn.Module:
        return self.load_model(location, dtype, trust_remote_code).eval()

    def load_student(self, location: str, dtype: str = "float32", trust_remote_code: bool = False) -> nn.Module:
        return self.load_model(location, dtype, trust_remote_code)

    def load_tokenizer(self, location: str, trust_remote_code: bool = False):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)

    # -- structure ----------------------------------------------------------------------------

    def components(self) -> tuple[Component, ...]:
        """The parts a recipe can quantize, with their defaults (the paper's: all 4-bit or SQMP)."""
        return (
            Component("decoder", self.decoder_patterns, True, self.default_group_size,
                      "every nn.Linear of the decoder layers (SQMP rows)"),
            Component("embedding", (), True, None, "the input embedding table (4-bit)"),
            Component("lm_head", (), True, None, "the output projection (4-bit; shares the embedding when tied)"),
        )

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder's layer list, whose outputs are the residual stream LAFD distils."""
        self.check_model(model)
        return model.get_submodule(self.layers_path)

    def attention_modules(self, model: nn.Module, patterns: list[str] | tuple[str, ...]) -> list[tuple[str, nn.Module, int]]:
        """``(name, module, head_dim)`` of every attention module whose K and V the KV cache holds.

        The default finds modules with ``head_dim`` and ``k_proj`` under ``patterns`` (Llama, Qwen,
        Mistral and most transformers decoders); the attention must call transformers' attention
        interface (``config._attn_implementation``) for KV-cache quantization to reach it.
        """
        return [
            (name, module, int(module.head_dim))
            for name, module in model.named_modules()
            if any(fnmatchcase(name, p) for p in patterns) and hasattr(module, "head_dim") and hasattr(module, "k_proj")
        ]

    def decoder_linear_names(self, model: nn.Module) -> list[str]:
        from torch import nn

        return [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and any(fnmatchcase(name, p) for p in self.decoder_patterns)
        ]

    # -- data ---------------------------------------------------------------------------------

    def build_datasets(self, section, tokenizer):
        """``(train, eval)`` training rows (``input_ids``, ``labels``) for the recipe's data section."""
        from edgerazor.data import build_datasets

        return build_datasets(section, tokenizer, think_tags=self.think_tags)

    def collator(self, tokenizer):
        """What batches this family's rows for training and held-out perplexity (padded tokens, labels -100)."""
        from edgerazor.data import DistillCollator

        return DistillCollator(tokenizer)

    def model_inputs(self, batch) -> dict:
        """The keyword arguments a batch gives the model's forward (teacher, student, perplexity): labels and
        anything else the collator adds for the losses stay out."""
        return {k: batch[k] for k in ("input_ids", "attention_mask") if batch.get(k) is not None}

    def chat_template(self, tokenizer) -> str | None:
        """The chat template prompts are rendered with (the tokenizer's own by default)."""
        return getattr(tokenizer, "chat_template", None)

    def strip_think(self, text: str) -> str:
        """``text`` without the family's reasoning blocks (``<think>...</think>``) and the blank lines after them."""
        from edgerazor.data.formatting import strip_think

        return strip_think(text, self.think_tags)

    # -- GGUF ---------------------------------------------------------------------------------

    def gguf_architecture(self, config: PretrainedConfig) -> str:
        """The llama.cpp architecture name, or an ``AdapterError`` saying why there is none."""
        model_type = getattr(config, "model_type", None)
        if model_type not in self.gguf_archs:
            known = ", ".join(sorted(self.gguf_archs)) or "none"
            raise AdapterError(
                f"GGUF export of model_type {model_type!r} is not supported by adapter {self.name!r} "
                f"(it writes: {known}); the packed format works for every model, and an adapter plugin can map "
                "more model types to llama.cpp architectures (gguf_archs)"
            )
        return self.gguf_archs[model_type]

    def gguf_tensor_names(self, config: PretrainedConfig):
        """gguf-py's map from transformers parameter names to llama.cpp tensor names for this architecture."""
        arch = self.gguf_architecture(config)
        try:
            import gguf
        except ImportError:
            raise AdapterError("GGUF export needs gguf-py: pip install 'edgerazor[export]'") from None
        member = getattr(gguf.MODEL_ARCH, arch.upper(), None)
        if member is None:
            raise AdapterError(f"adapter {self.name!r}: gguf-py {gguf.__version__} knows no architecture {arch!r}")
        return gguf.get_tensor_name_map(member, int(config.get_text_config().num_hidden_layers))

    def gguf_outside_text(self, config: PretrainedConfig) -> dict[str, str]:
        """Parameter-name prefixes that are not part of the text GGUF -> where they go instead (a reason).

        Text-only families have none; a multimodal family names its encoders (an mmproj file, or nowhere)."""
        return {}

    def gguf_mmproj(self, model: nn.Module):
        """The encoder written as llama.cpp's mmproj file (an ``edgerazor.export.gguf.MmprojSpec``), or None."""
        return None


@dataclass(frozen=True)
class GenericAdapter(ModelAdapter):
    """Any decoder-only transformers causal LM with the standard layout (``model.layers``,
    ``embed_tokens``, ``lm_head``): Mistral, Gemma, Phi-3, SmolLM, ... The fallback of ``auto``."""

    def matches(self, model_type: str) -> bool:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def _served(name: str, adapter: ModelAdapter) -> str:
    return f"{name} ({'any causal LM with the standard layout' if adapter.fallback else ', '.join(adapter.model_types)})"


def resolve_adapter(model_type: str | None, name: str | None = None) -> ModelAdapter:
    """The adapter called ``name`` (which must serve ``model_type``), or with ``name`` None / ``"auto"``
    the one that serves ``model_type``: a specific adapter first, else a fallback one."""
    registry = get_plugins().registry("adapters")
    listing = "; ".join(_served(n, registry.get(n)) for n in registry.names())
    if name is not None and name != AUTO:
        adapter = registry.get(name)
        if model_type is not None and not adapter.matches(model_type):
            raise AdapterError(
                f"adapter {name!r} does not serve model_type {model_type!r}; use --adapter auto or one of: {listing}"
            )
        return adapter
    specific = [n for n in registry.names() if not registry.get(n).fallback and registry.get(n).matches(model_type)]
    if len(specific) > 1:
        raise AdapterError(
            f"several adapters serve model_type {model_type!r}: {', '.join(specific)}; choose one with --adapter"
        )
    if specific:
        return registry.get(specific[0])
    fallbacks = [n for n in registry.names() if registry.get(n).fallback and registry.get(n).matches(model_type)]
    if fallbacks:
        return registry.get(fallbacks[0])
    raise AdapterError(f"no model adapter serves model_type {model_type!r}; available adapters: {listing}")


def adapter_for_model(model: nn.Module, name: str | ModelAdapter | None = None) -> ModelAdapter:
    """``name``'s adapter, else the one ``model`` was quantized with, else the one serving its model_type."""
    if isinstance(name, ModelAdapter):
        return name
    meta = getattr(model.config, "edgerazor", None) or {}
    return resolve_adapter(model.config.model_type, name or meta.get("adapter"))


__all__ = ["AUTO", "AdapterError", "Component", "GenericAdapter", "ModelAdapter", "adapter_for_model", "resolve_adapter"]

