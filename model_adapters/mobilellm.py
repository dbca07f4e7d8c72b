"""MobileLLM, served as LlamaForCausalLM (Llama module names): the paper uses group size 64."""

from edgerazor.adapters import ModelAdapter
from edgerazor.hookspecs import hookimpl

MOBILELLM = ModelAdapter(
    name="mobilellm",
    model_types=("llama", "mobilellm"),
    decoder_patterns=("model.layers.*",),
    layers_path="model.layers",
    default_group_size=64,
    description="MobileLLM / Llama-architecture causal LMs (hidden 960 needs G in {32, 64, 192, ...})",
    gguf_archs={"llama": "llama", "mobilellm": "llama"},
)


@hookimpl
def register_adapters(register):
    register(MOBILELLM.name, MOBILELLM)
