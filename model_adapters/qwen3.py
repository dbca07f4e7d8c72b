"""Qwen3 (dense) causal LMs: the paper uses group size 256."""

from edgerazor.adapters import ModelAdapter
from edgerazor.hookspecs import hookimpl

QWEN3 = ModelAdapter(
    name="qwen3",
    model_types=("qwen3", "qwen2"),
    decoder_patterns=("model.layers.*",),
    default_group_size=256,
    description="Qwen3ForCausalLM (and Qwen2), tied or untied embeddings",
)


@hookimpl
def register_adapters(register):
    register(QWEN3.name, QWEN3)
