"""The adapter contract: choosing an adapter (auto, by name, refusals), the generic fallback, and a
third-party adapter (GPT-NeoX, from tests/thirdparty_plugin) that distils and exports end to end."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
import yaml
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, MistralConfig, MistralForCausalLM

import edgerazor
from edgerazor.adapters import AdapterError, Component, ModelAdapter, adapter_for_model, resolve_adapter
from edgerazor.plugin_manager import get_plugins
from tests.helpers import console_script, env_with
from tests.tokenizer_utils import train_tiny_tokenizer

RECIPE = {
    "name": "neox",
    "quant": {"scheme": "1.88-8-8", "weight": {"group_size": 64}, "kv_cache": {"group_size": 32}},
    "distill": {"selector_options": {"k": 1}},
    "train": {"max_steps": 3, "per_device_batch_size": 2, "learning_rate": 1e-3, "logging_steps": 1,
              "save_steps": 3, "seed": 0},
}


def tiny_mistral() -> MistralForCausalLM:
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                           sliding_window=None, tie_word_embeddings=False)
    return MistralForCausalLM(config).eval()


def tiny_neox(vocab_size: int = 256) -> GPTNeoXForCausalLM:
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=128, eos_token_id=0, pad_token_id=1)
    return GPTNeoXForCausalLM(config).eval()


# ----------------------------------------------------------------------------------- selection


def test_auto_picks_the_family_adapter_and_falls_back_to_generic():
    assert resolve_adapter("qwen3").name == "qwen3"
    assert resolve_adapter("qwen3", "auto").name == "qwen3"
    assert resolve_adapter("llama").name == "mobilellm"
    assert resolve_adapter("mistral").name == "generic"  # no family adapter: the standard-layout fallback
    assert resolve_adapter("gemma").name == "generic"


def test_an_adapter_that_does_not_serve_the_model_type_is_refused():
    with pytest.raises(AdapterError, match=r"adapter 'mobilellm' does not serve model_type 'qwen3'.*qwen3 \(qwen3, qwen2\)"):
        resolve_adapter("qwen3", "mobilellm")


def test_unknown_model_type_lists_adapters_and_what_they_serve():
    with pytest.raises(AdapterError) as info:
        resolve_adapter("phi9")
    message = str(info.value)
    assert "no model adapter serves model_type 'phi9'" in message
    assert "mobilellm (llama, mobilellm)" in message and "qwen3 (qwen3, qwen2)" in message
    assert "generic (any causal LM with the standard layout)" in message


def test_two_specific_adapters_for_one_model_type_must_be_chosen(restore_plugins):
    class Second:
        @edgerazor.hookimpl
        def register_adapters(self, register):
            register("qwen3_alt", ModelAdapter(name="qwen3_alt", model_types=("qwen3",)))

    get_plugins().register(Second(), name="second")
    with pytest.raises(AdapterError, match="several adapters serve model_type 'qwen3': qwen3, qwen3_alt"):
        resolve_adapter("qwen3")
    assert resolve_adapter("qwen3", "qwen3_alt").name == "qwen3_alt"


def test_components_carry_the_papers_group_sizes():
    qwen3, mobilellm = resolve_adapter("qwen3"), resolve_adapter("llama")
    assert [c.name for c in qwen3.components()] == ["decoder", "embedding", "lm_head"]
    assert qwen3.components()[0] == Component("decoder", ("model.layers.*",), True, 256, qwen3.components()[0].description)
    assert mobilellm.components()[0].group_size == 64


# ----------------------------------------------------------------------------- generic adapter


def test_generic_adapter_quantizes_a_mistral_model_with_kv8_and_lafd(tmp_path):
    model = tiny_mistral()
    report = edgerazor.quantize(model, {"quant": {"scheme": "1.88-8-8"}})
    assert report.adapter == "generic"
    assert report.kv_layers == 2
    decoder = [r for r in report.layers if r.kind == "linear"]
    assert len(decoder) == 2 * 7 and all(r.group_size == 128 for r in decoder)
    adapter = adapter_for_model(model)
    assert adapter.name == "generic" and len(adapter.decoder_layers(model)) == 2
    assert adapter.gguf_architecture(model.config) == "llama"
    # and it survives save_pretrained / edgerazor.load with the same logits
    model.save_pretrained(tmp_path / "m")
    loaded, _ = edgerazor.load(tmp_path / "m")
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_generic_adapter_refuses_a_model_without_the_standard_layout():
    model = tiny_neox()
    adapter = resolve_adapter("gpt_neox")
    assert adapter.name == "generic"
    with pytest.raises(AdapterError, match=r"GPTNeoXForCausalLM has no decoder layer list at 'model.layers'"):
        adapter.decoder_layers(model)
    with pytest.raises(AdapterError, match=r"GGUF export of model_type 'gpt_neox' is not supported by adapter 'generic'"):
        adapter.gguf_architecture(model.config)


# ------------------------------------------------------------------------- the run command


def _save_teacher(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _text_data(path, rows: int = 40) -> None:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    with path.open("w") as f:
        for i in range(rows):
            f.write(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(30))}) + "\n")


def test_run_refuses_a_mismatched_adapter_before_loading_weights(tmp_path):
    from transformers import Qwen3Config

    from edgerazor.run import run_command

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    Qwen3Config(vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=2).save_pretrained(teacher)
    # config.json only: loading weights would fail with another error, so this one comes first
    with pytest.raises(AdapterError, match="adapter 'mobilellm' does not serve model_type 'qwen3'"):
        run_command(None, str(teacher), "mobilellm", [], tmp_path / "out", False)


@pytest.mark.slow
def test_thirdparty_adapter_distils_and_exports_end_to_end(plugin_site, tmp_path):
    """``edgerazor run --adapter gpt_neox`` (a pip-installed plugin) distils a tiny GPT-NeoX teacher,
    and its student exports packed and loads back with identical logits; the core knows nothing of GPT-NeoX."""
    data = tmp_path / "train.jsonl"
    _text_data(data)
    tokenizer = train_tiny_tokenizer([json.loads(line)["text"] for line in data.read_text().splitlines()], 256)
    teacher = _save_teacher(tiny_neox(len(tokenizer)), tokenizer, tmp_path / "teacher")
    recipe = dict(RECIPE, data={"sources": [{"path": str(data)}], "max_length": 32, "eval_fraction": 0.25})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    script, env = console_script(), env_with(plugin_site)

    def cli(*args, check=True):
        proc = subprocess.run([script, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
        if check:
            assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    out = tmp_path / "run"
    cli("run", "--recipe", tmp_path / "recipe.yaml", "--teacher", teacher, "--adapter", "gpt_neox", "--output", out)
    results = json.loads((out / "results.json").read_text())
    assert results["adapter"] == "gpt_neox" and results["train_steps"] == 3
    assert all(results[k] > 1 for k in ("teacher_ppl", "rtn_ppl", "student_ppl"))
    config = json.loads((out / "student" / "config.json").read_text())
    assert config["edgerazor"]["adapter"] == "gpt_neox"

    cli("export", out, "--format", "packed", "--out", tmp_path / "packed")
    probe = (
        "import sys, torch, edgerazor\n"
        "a, _ = edgerazor.load(sys.argv[1]); b, _ = edgerazor.load(sys.argv[2])\n"
        "ids = torch.arange(3, 35).unsqueeze(0)\n"
        "kv = sum(type(m).__name__ == 'KVFakeQuant' for m in a.modules())\n"
        "with torch.no_grad(): same = torch.equal(a(ids).logits, b(ids).logits)\n"
        "print(kv, same)\n"
    )
    import sys

    proc = subprocess.run([sys.executable, "-c", probe, str(out / "student"), str(tmp_path / "packed")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["2", "True"]  # KV8 in both attention layers; packed == fake-quant, exactly

    # auto picks the plugin's adapter for gpt_neox; without the plugin, auto falls back to generic and refuses
    auto = cli("run", "--recipe", tmp_path / "recipe.yaml", "--teacher", teacher, "--output", tmp_path / "auto",
               "--set", "train.max_steps=1")
    assert json.loads((tmp_path / "auto" / "results.json").read_text())["adapter"] == "gpt_neox", auto.stderr
    env = dict(env, EDGERAZOR_PLUGINS="")
    refused = cli("run", "--recipe", tmp_path / "recipe.yaml", "--teacher", teacher, "--output", tmp_path / "none",
                  check=False)
    assert refused.returncode == 2
    assert "edgerazor: error: adapter 'generic': GPTNeoXForCausalLM has no decoder layer list" in refused.stderr


def test_the_adapters_think_tags_reach_the_training_rows(tmp_path):
    """A family with other reasoning delimiters strips its own blocks from responses, not Qwen3's."""
    from edgerazor.recipe import DataSection

    data = tmp_path / "pr.jsonl"
    rows = [{"prompt": "2+2?", "response": "[reason]count up[/reason]4"},
            {"prompt": "3+3?", "response": "<think>keep me</think>6"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tokenizer = train_tiny_tokenizer(["2+2? 4 3+3? 6 count up keep me reason think"] * 20, 300)
    section = DataSection.model_validate({"sources": [{"path": str(data), "format": "prompt_response"}],
                                          "strip_think": True, "max_length": 64})
    family = ModelAdapter(name="brackets", model_types=("x",), think_tags=("[reason]", "[/reason]"))
    train, _ = family.build_datasets(section, tokenizer)
    texts = sorted(tokenizer.decode([t for t in row["labels"] if t >= 0]) for row in train)
    assert texts[0].startswith("4") and "count up" not in texts[0]
    assert "<think>keep me</think>6" in texts[1]
    assert family.strip_think("a[reason]x[/reason]  b") == "ab"
