"""Building transformers models from configs: published shapes on the meta device, tiny test models."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, PretrainedConfig

from edgerazor.errors import EdgeRazorError


def load_config(path: str | Path) -> PretrainedConfig:
    """A config from a ``config.json`` file or a directory holding one."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise EdgeRazorError(f"model config {file} does not exist")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise EdgeRazorError(f"model config {file} is not valid JSON: {exc}") from None
    if "model_type" not in data:
        raise EdgeRazorError(f"model config {file} has no 'model_type' key (expected e.g. 'qwen3' or 'llama')")
    data = dict(data)
    model_type = data.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as exc:
        raise EdgeRazorError(f"model config {file}: {exc}") from None


def model_class(config: PretrainedConfig):
    """The architecture the config names, else the causal-LM auto class."""
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def build_model(config: PretrainedConfig, device: str = "meta"):
    """Instantiate ``config``'s architecture; on ``meta`` no memory is allocated."""
    cls = model_class(config)
    with torch.device(device):
        if cls is transformers.AutoModelForCausalLM:
            return cls.from_config(config)
        return cls(config)
