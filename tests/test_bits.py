"""``edgerazor bits`` reproduces the paper's Tables 18-19 from the published model shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from transformers import Qwen3ForCausalLM

from edgerazor.cli import format_size, main
from edgerazor.shapes import build_model, builtin_models, load_config
from edgerazor.quant import count_bits, quantize
from tests.helpers import tiny_qwen3_config

# Paper Tables 18-19: compression ratio at 4 / 2.79 / 1.88 / 1.58 bits (G=256, embedding and
# lm_head 4-bit) and the 4-bit G=128 decoder-only baseline with its quantized fraction.
TABLES = {
    "qwen3-0.6b": {1.0: 3.94, 0.5: 5.05, 0.125: 6.41, 0.0: 7.04, "baseline": (2.21, 0.7389)},
    "qwen3-1.7b": {1.0: 3.94, 0.5: 5.21, 0.125: 6.88, 0.0: 7.69, "baseline": (2.55, 0.8191)},
}


def bits_json(capsys, *args) -> dict:
    assert main(["bits", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("model", sorted(TABLES))
def test_tables_18_19(model, capsys):
    """From the built-in shapes: a clone of the repository alone reproduces the tables."""
    for rho, ratio in TABLES[model].items():
        if rho == "baseline":
            continue
        out = bits_json(capsys, "--model", model, "--rho", str(rho), "--group-size", "256")
        assert out["compression_ratio"] == pytest.approx(ratio, abs=0.01), (model, rho, out)
        assert out["quantized_fraction"] > 0.9998  # "99.99%": only norms stay 16-bit
        assert out["effective_bits"] == pytest.approx(rho * 4 + (1 - rho) * 1.58)
    ratio, fraction = TABLES[model]["baseline"]
    out = bits_json(capsys, "--model", model, "--baseline")
    assert out["compression_ratio"] == pytest.approx(ratio, abs=0.01)
    assert out["quantized_fraction"] == pytest.approx(fraction, abs=5e-5)
    assert out["effective_bits"] == 4.0


def test_count_bits_against_hand_count(tiny_qwen3):
    """Independent count: each weight its bits + 16/G; tied lm_head once; norms 16-bit."""
    cfg = tiny_qwen3.config
    quantize(tiny_qwen3, {"quant": {"weight": {"rho": 0.25, "group_size": 64}, "embedding": {"group_size": 32},
                                    "lm_head": {"group_size": 32}}})
    summary = count_bits(tiny_qwen3)
    h, i, L, V, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)] * L
    bits = 0.0
    for d_out, d_in in shapes:
        high = -(-d_out // 4)
        bits += d_in * (high * 4 + (d_out - high) * 1.58) + d_out * d_in * 16 / 64
    bits += V * h * (4 + 16 / 32)
    norms = L * (2 * h + 2 * hd) + h
    total = sum(a * b for a, b in shapes) + V * h + norms
    assert summary.total_params == total
    assert summary.total_bits == pytest.approx(bits + norms * 16)
    assert summary.compression_ratio == pytest.approx(total * 16 / (bits + norms * 16))


def test_group_size_must_divide_mobilellm_hidden(shared_dir, capsys):
    config = str(shared_dir / "models" / "mobilellm-350m.json")
    assert main(["bits", "--model-config", config, "--group-size", "256"]) == 2
    err = capsys.readouterr().err
    assert "group size 256 does not divide its input dimension 960" in err and "model.layers.0." in err
    out = bits_json(capsys, "--model-config", config)  # the adapter's default G=64
    assert out["quantized_fraction"] > 0.9998
    padded = bits_json(capsys, "--model-config", config, "--group-size", "256", "--set", "quant.weight.pad=true")
    assert padded["quantized_fraction"] == out["quantized_fraction"]
    model = build_model(load_config(config), "meta")
    report = quantize(model, {"quant": {"weight": {"group_size": 256, "pad": True}}})
    q_proj = next(r for r in report.layers if r.name == "model.layers.0.self_attn.q_proj")
    assert (q_proj.d_in, q_proj.padded_d_in) == (960, 1024)  # padding is reported, never a silent G change
    assert q_proj.group_size == 256


def test_meta_device_build_allocates_nothing(shared_dir):
    model = build_model(load_config(shared_dir / "models" / "qwen3-1.7b.json"), "meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    quantize(model, {"quant": {"weight": {"group_size": 256}}})
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.device == torch.device("meta")


def test_console_script_prints_a_table(shared_dir):
    result = subprocess.run(
        [sys.executable, "-m", "edgerazor.cli", "bits", "--model-config",
         str(shared_dir / "models" / "qwen3-0.6b.json"), "--rho", "0.125"],
        capture_output=True, text=True, check=True,
    )
    assert "compression ratio" in result.stdout and "6.40x" in result.stdout


def test_bad_model_config(tmp_path, capsys):
    (tmp_path / "c.json").write_text('{"hidden_size": 8}')
    assert main(["bits", "--model-config", str(tmp_path / "c.json")]) == 2
    assert "has no 'model_type' key" in capsys.readouterr().err
    assert main(["bits", "--model-config", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["qwen3-0.6b", "qwen3-1.7b", "mobilellm-350m"])
def test_builtin_name_equals_the_published_json(name, shared_dir, capsys):
    """The shipped shape is the published config.json: same file, same numbers as --model-config."""
    published = shared_dir / "models" / f"{name}.json"
    assert json.loads(builtin_models()[name].read_text()) == json.loads(published.read_text())
    by_name = bits_json(capsys, "--model", name)
    by_path = bits_json(capsys, "--model-config", str(published))
    assert by_name.pop("model") == name and by_path.pop("model") == str(published)
    assert by_name == by_path and by_name["total_params"] > 3e8


def test_builtin_models_include_every_paper_shape():
    assert {"qwen3-0.6b", "qwen3-1.7b", "mobilellm-350m", "qwen2.5-omni-7b-thinker"} <= set(builtin_models())


def test_model_from_a_local_directory(tmp_path, capsys):
    config = tiny_qwen3_config()
    config.save_pretrained(tmp_path)
    out = bits_json(capsys, "--model", str(tmp_path), "--rho", "0.25", "--group-size", "64")
    # tied embeddings are counted once, as in the model itself
    assert out["total_params"] == sum(p.numel() for p in Qwen3ForCausalLM(config).parameters())
    assert out == bits_json(capsys, "--model-config", str(tmp_path / "config.json"), "--rho", "0.25",
                            "--group-size", "64") | {"model": str(tmp_path)}


def test_unknown_builtin_name_lists_the_available_ones(capsys):
    assert main(["bits", "--model", "qwen9-1b"]) == 2
    err = capsys.readouterr().err
    assert "unknown built-in model 'qwen9-1b'" in err and all(name in err for name in builtin_models())
    assert len(err.strip().splitlines()) == 1


def test_unreachable_hub_id_fails_fast_in_one_line(tmp_path):
    """Offline (and not cached): an error naming the id at once, not huggingface_hub's half-minute of retries."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "edgerazor.cli", "bits", "--model", "someone/no-such-model"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2 and time.perf_counter() - start < 25
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "'someone/no-such-model'" in lines[0] and "HF_HUB_OFFLINE" in lines[0]


def test_sizes_are_printed_in_a_unit_that_fits(tmp_path, capsys):
    assert format_size(1.5 * 2**30) == "1.50 GiB"
    assert format_size(177.58 * 2**20) == "177.58 MiB"
    assert format_size(3 * 2**10) == "3.00 KiB"
    assert format_size(512) == "512 B"
    tiny_qwen3_config().save_pretrained(tmp_path)  # ~0.5 M parameters: about 1 MiB in BF16
    args = ["--model", str(tmp_path), "--group-size", "64"]
    out = bits_json(capsys, *args)
    assert main(["bits", *args]) == 0
    table = capsys.readouterr().out
    quantized = format_size(out["quantized_bytes"])
    assert quantized.endswith(" KiB") and quantized in table
    assert format_size(out["bf16_bytes"]) in table and "GiB" not in table
