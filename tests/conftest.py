"""Shared fixtures: tiny random-weight models built from real transformers configs (see tests/helpers.py)."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, Qwen3ForCausalLM

from edgerazor.plugin_manager import reload_plugins
from tests.helpers import (
    PLUGIN_DIR, PLUGIN_EP, PLUGIN_MODULE, PLUGINS_ENV, TINY_TEXT, forget_plugin_modules, require_shared,
    tiny_llama_config, tiny_qwen3_config,
)


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
    return require_shared()


# ---------------------------------------------------------------- the real third-party distribution


@pytest.fixture
def restore_plugins(monkeypatch):
    """Undo the test's sys.path / environment changes, then rebuild the process-wide plugin system."""
    yield monkeypatch
    monkeypatch.undo()
    forget_plugin_modules()
    importlib.invalidate_caches()
    system = reload_plugins()
    assert PLUGIN_EP not in dict(system.pm.list_name_plugin())


def _build_backend_available() -> bool:
    """Whether setuptools here can build a wheel without build isolation (bdist_wheel built in, or wheel)."""
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return False
    major_minor = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    return major_minor >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """tests/thirdparty_plugin installed with pip into a private site directory."""
    root = tmp_path_factory.mktemp("thirdparty")
    source = root / "src"
    shutil.copytree(PLUGIN_DIR, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = root / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-input", "--disable-pip-version-check", "-q"]
    if _build_backend_available():
        cmd.append("--no-build-isolation")  # fast and offline; otherwise pip fetches setuptools itself
    proc = subprocess.run([*cmd, "--target", str(site), str(source)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"
    assert (site / PLUGIN_MODULE / "__init__.py").is_file()
    assert list(site.glob("edgerazor_example_plugin-0.2.0.dist-info"))
    return site


@pytest.fixture
def example_plugin(plugin_site, restore_plugins):
    monkeypatch = restore_plugins
    monkeypatch.delenv(PLUGINS_ENV, raising=False)
    monkeypatch.syspath_prepend(str(plugin_site))
    forget_plugin_modules()
    return reload_plugins()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A saved tiny Qwen3 teacher with its tokenizer, and ``corpus.txt`` to distil on (for ``edgerazor run``)."""
    from tests.tokenizer_utils import train_tiny_tokenizer

    tok = train_tiny_tokenizer([TINY_TEXT], vocab_size=384)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_qwen3_config(vocab_size=len(tok), num_hidden_layers=2))
    path = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "corpus.txt").write_text(TINY_TEXT * 3)
    return path
