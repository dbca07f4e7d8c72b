"""GGUF architecture metadata: llama.cpp arch names, hyperparameters, M-RoPE sections and the Llama rotary
permutation. Hyperparameters come from the text config (``config.get_text_config()``), so a multimodal
model's language model is described the same way as a text-only one."""

from __future__ import annotations

import numpy as np

from edgerazor.errors import EdgeRazorError

#: llama.cpp architectures whose converter permutes q/k rows for interleaved RoPE (``LlamaModel.permute``)
PERMUTED_ARCHS = frozenset({"llama"})
#: llama.cpp architectures with multimodal RoPE (``LLAMA_ROPE_TYPE_MROPE``): they need the rotary sections
MROPE_ARCHS = frozenset({"qwen2vl"})
#: what the pinned llama.cpp does differently from the file for an architecture (reported with the export)
LLAMA_CPP_ARCH_NOTES = {
    "qwen2vl": "llama.cpp (llama-cpp-python 0.3.36's copy) never reads qwen2vl.attention.layer_norm_rms_epsilon "
               "and normalises with epsilon 0 instead of the model's; negligible unless a hidden state's mean "
               "square is near the epsilon",
}


def llama_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's HF -> GGUF rotary permutation of q/k rows (``convert_hf_to_gguf.py``,
    ``LlamaModel.permute``): HF's rotate-half pairs (i, i + d/2) become interleaved pairs (2i, 2i+1).
    Works on any per-row array (weights, codes, scales, biases)."""
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _rope_params(config) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]
    return params if isinstance(params, dict) else {}


def mrope_sections(config, head_dim: int) -> list[int]:
    """llama.cpp's four rotary sections (temporal, height, width, unused) from the config's ``mrope_section``.

    Each section counts rotary frequency pairs, so they must add up to ``head_dim / 2``; for text the three
    positions are equal and M-RoPE is plain RoPE."""
    scaling = getattr(config, "rope_scaling", None) or {}
    section = _rope_params(config).get("mrope_section") or (scaling.get("mrope_section") if isinstance(scaling, dict) else None)
    if not section:
        raise EdgeRazorError("this llama.cpp architecture uses M-RoPE, but the model config has no mrope_section")
    section = [int(s) for s in section]
    if len(section) > 4 or sum(section) != head_dim // 2:
        raise EdgeRazorError(f"mrope_section {section} must have at most 4 entries adding up to head_dim / 2 = "
                             f"{head_dim // 2}; refusing to write rotary sections llama.cpp would misread")
    return section + [0] * (4 - len(section))


def _rope_theta(config) -> float:
    params = _rope_params(config)
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = (params.get("rope_type") if isinstance(params, dict) else None) or (
        scaling.get("rope_type") or scaling.get("type") if isinstance(scaling, dict) else None) or "default"
    if rope_type != "default":
        raise EdgeRazorError(
            f"GGUF export supports plain RoPE only; this model uses rope_type {rope_type!r} "
            "(llama3 / yarn / linear scaling need extra GGUF keys or a rope_freqs tensor that this writer "
            "does not produce) - refusing rather than writing a model that runs with the wrong positions"
        )
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    if theta is None:
        theta = getattr(config, "rope_theta", None)
    if theta is None:
        raise EdgeRazorError("model config has no rope_theta (nor rope_parameters['rope_theta'])")
    return float(theta)


def write_hparams(writer, config, arch: str) -> None:
    config = config.get_text_config()
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(n_head))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or n_head))
    writer.add_key_length(int(head_dim))
    writer.add_value_length(int(head_dim))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_rope_freq_base(_rope_theta(config))
    if arch in MROPE_ARCHS:
        writer.add_rope_dimension_sections(mrope_sections(config, int(head_dim)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    if arch == "qwen3" and getattr(config, "use_sliding_window", False):
        raise EdgeRazorError("Qwen3 with use_sliding_window=true is not supported by llama.cpp's qwen3 graph")
