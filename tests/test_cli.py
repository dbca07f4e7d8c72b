"""The command line: --version, a start that imports neither torch nor transformers, and ``generate``."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import Qwen3ForCausalLM, set_seed

import edgerazor
from edgerazor.cli import _generation_inputs, main
from tests.helpers import REPO, tiny_qwen3_config
from tests.tokenizer_utils import train_tiny_tokenizer

# Runs ``main(argv)`` in a fresh interpreter, then reports which heavy modules it imported.
_PROBE = """
import json, sys
from edgerazor.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print(json.dumps(heavy), file=sys.stderr)
"""


def _heavy_imports(*argv: str) -> tuple[list[str], str]:
    env = dict(os.environ, EDGERAZOR_PLUGINS="")  # the built-ins only: third-party code is not ours to time
    proc = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stderr.strip().splitlines()[-1]), proc.stdout


def test_version():
    expected = importlib.metadata.version("edgerazor")
    assert edgerazor.__version__ == expected
    proc = subprocess.run([sys.executable, "-m", "edgerazor.cli", "--version"], capture_output=True, text=True,
                          check=True)
    assert proc.stdout.strip() == f"edgerazor {expected}"


@pytest.mark.parametrize("argv", [["--help"], ["plugins"], ["plugins", "--json"]])
def test_help_and_plugins_import_neither_torch_nor_transformers(argv):
    heavy, out = _heavy_imports(*argv)
    assert heavy == []
    if argv == ["plugins", "--json"]:  # the plugins really were loaded and described
        registered = {name for info in json.loads(out) for names in info["registers"].values() for name in names}
        assert {"ternary", "int4", "super_group", "eakld", "adaptive", "packed", "gguf"} <= registered


def test_public_names_load_on_first_use():
    from edgerazor.quant import quantize

    assert edgerazor.quantize is quantize and "quantize" in dir(edgerazor)
    assert set(edgerazor.__all__) <= set(dir(edgerazor))
    with pytest.raises(AttributeError, match="no_such_name"):
        edgerazor.no_such_name  # noqa: B018


# ------------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------------

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int\n    y: int\n" * 30


def _save_student(path, tokenizer):
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_qwen3_config(vocab_size=len(tokenizer)))
    edgerazor.quantize(model, {"quant": {"weight": {"group_size": 64}}})
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A quantized tiny Qwen3 saved with a ChatML tokenizer, as ``edgerazor run`` saves a student."""
    return _save_student(tmp_path_factory.mktemp("student"), train_tiny_tokenizer([TEXT], vocab_size=384))


def _generate(capsys, path, *args) -> str:
    assert main(["generate", str(path), "--max-new-tokens", "16", *args]) == 0
    return capsys.readouterr().out


def test_seed_makes_sampling_reproducible(student, capsys):
    sample = ["--prompt", "def", "--temperature", "1.5"]
    first = _generate(capsys, student, *sample, "--seed", "0")
    again = _generate(capsys, student, *sample, "--seed", "0")
    other = _generate(capsys, student, *sample, "--seed", "1")
    assert first == again and first != other
    assert len(first.strip()) > len("def")  # tokens were generated after the prompt


def test_chat_sends_the_prompt_as_a_user_turn(student, capsys):
    model, tokenizer = edgerazor.load(student)
    inputs = _generation_inputs(tokenizer, "hello", True, student)
    assert tokenizer.decode(inputs["input_ids"][0]) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    # the command prints exactly the reply the model samples after that templated prompt (same seed)
    set_seed(3)
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=16, do_sample=True, temperature=1.5,
                             pad_token_id=tokenizer.pad_token_id)
    reply = tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    out = _generate(capsys, student, "--prompt", "hello", "--chat", "--temperature", "1.5", "--seed", "3")
    assert reply.strip() and out.strip() == reply.strip() and "<|im_start|>" not in out


def test_chat_needs_a_chat_template(student, tmp_path, capsys):
    tokenizer = train_tiny_tokenizer([TEXT], vocab_size=384)
    tokenizer.chat_template = None
    path = _save_student(tmp_path / "plain", tokenizer)
    assert main(["generate", str(path), "--prompt", "hi", "--chat"]) == 2
    assert "the tokenizer has no chat template" in capsys.readouterr().err
    assert len(_generate(capsys, path, "--prompt", "def")) > len("def")  # without --chat it completes the prompt
