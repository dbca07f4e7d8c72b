"""GGUF architecture metadata: llama.cpp arch names, hyperparameters and the Llama rotary permutation."""

from __future__ import annotations

import numpy as np

from edgerazor.errors import EdgeRazorError

#: llama.cpp architectures whose converter permutes q/k rows for interleaved RoPE (``LlamaModel.permute``)
PERMUTED_ARCHS = frozenset({"llama"})


def llama_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's HF -> GGUF rotary permutation of q/k rows (``convert_hf_to_gguf.py``,
    ``LlamaModel.permute``): HF's rotate-half pairs (i, i + d/2) become interleaved pairs (2i, 2i+1).
    Works on any per-row array (weights, codes, scales, biases)."""
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]
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
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    if arch == "qwen3" and getattr(config, "use_sliding_window", False):
        raise EdgeRazorError("Qwen3 with use_sliding_window=true is not supported by llama.cpp's qwen3 graph")
