"""Qwen3 (dense) causal LMs, and Qwen2: the paper uses group size 256 for Qwen3."""

from edgerazor.adapters import ModelAdapter
from edgerazor.hookspecs import hookimpl

QWEN3 = ModelAdapter(
    name="qwen3",
    model_types=("qwen3", "qwen2"),
    decoder_patterns=("model.layers.*",),
    layers_path="model.layers",
    default_group_size=256,
    description="Qwen3ForCausalLM (and Qwen2), tied or untied embeddings",
    gguf_archs={"qwen3": "qwen3"},
)


@hookimpl
def register_adapters(register):
    register(QWEN3.name, QWEN3)
