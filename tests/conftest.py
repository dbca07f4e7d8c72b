"""Shared fixtures: tiny random-weight models built from real transformers configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REPO = Path(__file__).resolve().parents[1]


def tiny_qwen3_config(**overrides) -> Qwen3Config:
    kwargs = dict(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
        max_position_embeddings=256,
    )
    kwargs.update(overrides)
    return Qwen3Config(**kwargs)


def tiny_llama_config(**overrides) -> LlamaConfig:
    """MobileLLM-like: Llama module names, tied embeddings, GQA."""
    kwargs = dict(
        vocab_size=384, hidden_size=192, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
        max_position_embeddings=256,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


@pytest.fixture
def tiny_qwen3() -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    return Qwen3ForCausalLM(tiny_qwen3_config()).eval()


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        message = f"{SHARED} is absent: the shared data folder must sit beside the repository"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI always has it: absence is a broken set-up, not a skip
        pytest.skip(message)
    return SHARED
