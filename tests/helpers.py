"""Helpers shared by the tests: paths and tiny real transformers configs.

Tests import these from ``tests.helpers``; ``conftest.py`` holds only fixtures (built from these).
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

import pytest
from transformers import LlamaConfig, Qwen3Config

from edgerazor.plugin_manager import PLUGINS_ENV

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

#: a few lines of text the tiny tokenizers and teachers of the run tests train and distil on
TINY_TEXT = "First Citizen: Before we proceed any further, hear me speak.\nAll: Speak, speak.\n" * 40

#: the third-party test distribution (tests/thirdparty_plugin), installed for real by the plugin_site fixture
PLUGIN_DIR = REPO / "tests" / "thirdparty_plugin"
PLUGIN_MODULE = "edgerazor_example_plugin"
PLUGIN_DIST, PLUGIN_VERSION, PLUGIN_EP = "edgerazor-example-plugin", "0.2.0", "example"


def require_shared() -> Path:
    """The shared data folder beside the repository: skipped when absent, a failure under CI (always has it)."""
    if not SHARED.is_dir():
        message = f"{SHARED} is absent: the shared data folder must sit beside the repository"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI always has it: absence is a broken set-up, not a skip
        pytest.skip(message)
    return SHARED


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


def console_script() -> str:
    script = shutil.which("edgerazor", path=sysconfig.get_path("scripts")) or shutil.which("edgerazor")
    assert script, "the edgerazor console script is not installed (pip install -e .)"
    return script


def env_with(site: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != PLUGINS_ENV}
    env["COLUMNS"] = "240"  # rich: do not truncate the table
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    return env


def forget_plugin_modules() -> None:
    """Drop the example distribution's modules (its package and submodules such as ``.formats``), so the
    next import loads them from the site directory on sys.path then, not from an earlier install."""
    for name in [m for m in sys.modules if m == PLUGIN_MODULE or m.startswith(PLUGIN_MODULE + ".")]:
        del sys.modules[name]


def tiny_run_recipe(teacher_dir: Path, path: Path, **train) -> Path:
    """A tiny W1.88-A8-KV8 ``edgerazor run`` recipe on ``teacher_dir``'s corpus.txt, written to ``path``;
    ``train`` sets the train section (steps, batch, intervals) over a 1e-3 learning rate logged every step."""
    import yaml

    recipe = {
        "name": "tiny",
        "quant": {"scheme": "1.88-8-8", "weight": {"group_size": 64}},
        "data": {"sources": [{"path": str(teacher_dir / "corpus.txt")}], "max_length": 32, "eval_fraction": 0.25},
        "train": {"learning_rate": 1e-3, "logging_steps": 1, **train},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path
