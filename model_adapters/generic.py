"""Every other decoder-only transformers causal LM with the standard layout (``model.layers``,
``embed_tokens``, ``lm_head``): Mistral, Gemma, Phi-3, SmolLM, ... ``auto`` falls back to it.

Group size 128 divides the hidden sizes of these families (2048, 3072, 4096, 576, ...); GGUF export
is offered for Mistral, whose llama.cpp architecture is ``llama``."""

from edgerazor.adapters import GenericAdapter
from edgerazor.hookspecs import hookimpl

GENERIC = GenericAdapter(
    name="generic",
    model_types=(),
    default_group_size=128,
    description="any decoder-only causal LM with model.layers / embed_tokens / lm_head (fallback of auto)",
    gguf_archs={"mistral": "llama"},
    fallback=True,
)


@hookimpl
def register_adapters(register):
    register(GENERIC.name, GENERIC)
