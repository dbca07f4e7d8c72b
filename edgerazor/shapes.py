"""Building transformers models from configs: published shapes on the meta device, tiny test models."""

from __future__ import annotations

import json
import os
import re
import socket
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

import torch
import transformers
from transformers import AutoConfig, PretrainedConfig

from edgerazor.errors import EdgeRazorError

#: ``owner/name`` on the Hugging Face Hub (a local path that does not exist never looks like one).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def model_config(location: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The config of a model directory or hub id (``from_pretrained``'s ``location``), failing fast:
    a missing directory is one line, an unreachable Hub is one line at once (not after retries)."""
    path = Path(location).expanduser()
    if path.is_dir():
        try:
            return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise EdgeRazorError(f"model {location!r}: {_first_line(exc)}") from None
    if path.exists():
        raise EdgeRazorError(f"model {location!r} is a file: give the model's directory (with config.json) or a hub id")
    if _HUB_ID.match(location) and not location.startswith((".", "/", "~")):
        return hub_config(location, trust_remote_code)
    raise EdgeRazorError(f"model directory {location!r} does not exist (nor is it a hub id like Qwen/Qwen3-0.6B)")


def load_config(path: str | Path) -> PretrainedConfig:
    """A config from a ``config.json`` file or a directory holding one."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise EdgeRazorError(f"model config {file} does not exist")
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise EdgeRazorError(f"model config {file} is not valid UTF-8 (byte at offset {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise EdgeRazorError(f"model config {file} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise EdgeRazorError(f"model config {file} must be a JSON object, got {type(data).__name__}")
    if "model_type" not in data:
        raise EdgeRazorError(f"model config {file} has no 'model_type' key (expected e.g. 'qwen3' or 'llama')")
    data = dict(data)
    model_type = data.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as exc:
        raise EdgeRazorError(f"model config {file}: {exc}") from None


def builtin_models() -> dict[str, Path]:
    """The paper's published model shapes shipped with EdgeRazor (``configs/models/<name>.json``)."""
    folder = resources.files("edgerazor.configs") / "models"
    return {entry.name.removesuffix(".json"): Path(str(entry))
            for entry in folder.iterdir() if entry.name.endswith(".json")}


def resolve_model(spec: str) -> tuple[PretrainedConfig, str]:
    """The config ``spec`` names, and where it came from.

    ``spec`` is a local ``config.json`` or a directory holding one, a built-in name
    (``builtin_models``), or a Hugging Face Hub id read with ``AutoConfig.from_pretrained``.
    """
    path = Path(spec).expanduser()
    if path.exists():
        return load_config(path), str(path)
    builtins = builtin_models()
    if spec in builtins:
        return load_config(builtins[spec]), str(builtins[spec])
    if _HUB_ID.match(spec):
        return hub_config(spec), spec
    if "/" in spec or os.sep in spec or spec.endswith(".json"):
        raise EdgeRazorError(f"model {spec!r}: no such file or directory")
    raise EdgeRazorError(f"unknown built-in model {spec!r}; built-in: {', '.join(sorted(builtins))} "
                         "(or give a hub id like Qwen/Qwen3-0.6B, or a local directory with a config.json)")


def hub_config(repo_id: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """``AutoConfig.from_pretrained(repo_id)``: the local cache first, the Hub only when it answers.

    huggingface_hub retries an unreachable Hub for about half a minute before giving up, so a
    connection is tried first and an unreachable Hub is one error line at once.
    """
    try:
        return _from_pretrained(repo_id, local_files_only=True, trust_remote_code=trust_remote_code)
    except OSError:
        pass  # not in the cache
    from huggingface_hub import is_offline_mode

    if is_offline_mode():
        raise EdgeRazorError(f"model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                             "unset it to download the config, or give a local directory or a built-in name")
    from huggingface_hub import constants

    if not _reachable(constants.ENDPOINT):
        raise EdgeRazorError(f"cannot reach {constants.ENDPOINT} to read the config of {repo_id!r} (not in the local "
                             "cache): give a local directory or a built-in name, or check the connection")
    try:
        return _from_pretrained(repo_id, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise EdgeRazorError(f"model {repo_id!r}: {_first_line(exc)}") from None


def _from_pretrained(repo_id: str, **kwargs) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(repo_id, **kwargs)
    except ValueError as exc:  # a config transformers cannot read (e.g. an unknown model_type)
        raise EdgeRazorError(f"model {repo_id!r}: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to ``url``'s host opens (assumed true behind a proxy, which we cannot test)."""
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return True
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def model_class(config: PretrainedConfig):
    """The architecture the config names, else the causal-LM auto class."""
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def build_model(config: PretrainedConfig, device: str = "meta", cls=None):
    """Instantiate ``config``'s architecture (or ``cls``); on ``meta`` no memory is allocated."""
    cls = cls or model_class(config)
    with torch.device(device):
        if cls is transformers.AutoModelForCausalLM:
            return cls.from_config(config)
        return cls(config)
