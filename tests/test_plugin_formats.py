"""Quantizer and exporter hooks from outside: the pip-installed example distribution's ``formats`` module
registers an ``int3`` quantizer and a ``codes_npz`` exporter, and EdgeRazor trains, counts, schedules,
packs and exports with them without naming either anywhere in its core."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM, Qwen3ForCausalLM

import edgerazor
from edgerazor.cli import main as cli_main
from edgerazor.errors import EdgeRazorError, PluginError, RecipeError
from edgerazor.export.packed import METADATA_FILE, export_packed
from edgerazor.plugin_manager import PluginSystem, reload_plugins, run_exporter
from edgerazor.quant import count_bits
from edgerazor.recipe import recipe_from_dict
from edgerazor.runtime.packed import PackedLinear
from tests.helpers import tiny_llama_config, tiny_qwen3_config
from tests.helpers import PLUGIN_DIST, PLUGIN_MODULE, PLUGIN_VERSION, console_script as _console_script
from tests.helpers import env_with as _env_with
from tests.tokenizer_utils import train_tiny_tokenizer


FORMATS_EP = "example_formats"
INT3_SCHEME = "2.29-8-8"  # one 3-bit row in every 2 over 1.58-bit ternary rows: (3 + 1.58) / 2
INT3_RECIPE = {"quant": {"scheme": INT3_SCHEME, "weight": {"high": "int3", "group_size": 64}}}


@pytest.fixture(scope="module")
def tok():
    return train_tiny_tokenizer(["To be, or not to be, that is the question. " * 40], vocab_size=320)


def _int3_qwen3(tok, sections: dict | None = None, **quant):
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_qwen3_config(vocab_size=len(tok)))
    edgerazor.quantize(model, {"quant": {**INT3_RECIPE["quant"], **quant}, **(sections or {})})
    return model.eval()


def _int3_reference(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int3 codes and scales of full rows, written out independently of EdgeRazor's machinery."""
    groups = weight.detach().float().reshape(weight.shape[0], -1, group)
    scales = (groups.abs().amax(-1) / 3).clamp(min=1e-5).half().float()
    codes = torch.clamp(torch.round(groups / scales.unsqueeze(-1)), -3, 3).to(torch.int8)
    return codes.reshape(weight.shape), scales


def test_plugins_lists_the_quantizer_and_the_exporter(example_plugin, capsys):
    assert cli_main(["plugins", "--json"]) == 0
    by_name = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert by_name[FORMATS_EP] == {
        "name": FORMATS_EP, "distribution": PLUGIN_DIST, "version": PLUGIN_VERSION,
        "hooks": ["register_exporters", "register_quantizers"],
        "registers": {"exporters": ["codes_npz"], "quantizers": ["int3"]},
    }
    assert example_plugin.registry("quantizers").names() == ["int3", "int4", "int8", "ternary"]
    assert example_plugin.registry("exporters").names() == ["codes_npz", "gguf", "packed"]
    assert example_plugin.registry("exporters").owners["codes_npz"] == FORMATS_EP


def test_int3_trains_one_step(example_plugin, tiny_qwen3):
    report = edgerazor.quantize(tiny_qwen3, INT3_RECIPE)
    assert report.w_a_kv == INT3_SCHEME
    layer = tiny_qwen3.model.layers[0].mlp.down_proj
    wq = layer.weight_quant
    assert wq.names == ("int3", "ternary") and wq.high_fraction() == 0.5
    codes, scales = wq.codes_and_scales(layer.weight)
    high = wq.precision_mask
    ref_codes, ref_scales = _int3_reference(layer.weight[high], 64)
    assert torch.equal(codes[high], ref_codes) and torch.equal(scales[high], ref_scales)
    assert codes[high].abs().max() == 3 and codes[~high].abs().max() == 1
    # the fake-quant forward computes with exactly codes * scale
    x = torch.randn(3, layer.in_features)
    dequantized = (codes.float().reshape(codes.shape[0], -1, 64) * scales.unsqueeze(-1)).reshape(codes.shape)
    assert torch.equal(layer(x), torch.nn.functional.linear(layer.input_quant(x), dequantized))

    tiny_qwen3.train()
    optimizer = torch.optim.SGD(tiny_qwen3.parameters(), lr=0.5)
    ids = torch.randint(0, 512, (2, 12))
    before = layer.weight.detach().clone()
    loss = tiny_qwen3(input_ids=ids, labels=ids).loss
    loss.backward()
    grad = layer.weight.grad
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad[high].abs().sum() > 0  # STE reaches int3 rows
    optimizer.step()
    assert not torch.equal(layer.weight.detach(), before)
    with torch.no_grad():
        after = tiny_qwen3(input_ids=ids, labels=ids).loss
    assert after < loss  # one step of a large learning rate on the same batch lowers its loss


def test_int3_is_counted_with_its_declared_bits(example_plugin, tiny_qwen3, tmp_path, capsys):
    edgerazor.quantize(tiny_qwen3, INT3_RECIPE)
    assert count_bits(tiny_qwen3).effective_bits == pytest.approx(0.5 * 3 + 0.5 * 1.58, abs=1e-12)
    tiny_qwen3.config.save_pretrained(tmp_path)
    assert cli_main(["bits", "--model-config", str(tmp_path), "--rho", "0.5", "--group-size", "64",
                     "--set", f"quant.scheme={INT3_SCHEME}", "--set", "quant.weight.high=int3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["w_a_kv"] == INT3_SCHEME and out["effective_bits"] == pytest.approx(2.29, abs=1e-12)


def test_int3_fits_a_scheme_by_its_declared_bits(example_plugin):
    quant = recipe_from_dict(INT3_RECIPE).quant
    assert quant.weight.rho == 0.5 and quant.w_a_kv == INT3_SCHEME
    all_int3 = recipe_from_dict({"quant": {"scheme": "3-8-8", "weight": {"high": "int3"}}}).quant
    assert all_int3.weight.rho == 1.0 and all_int3.w_a_kv == "3-8-8"
    # the same width with the default 4-bit high rows is no super-group: the bits come from the plugin
    with pytest.raises(RecipeError, match=r"weight bits 2.29 is not reachable .*reachable: 4, 2.79"):
        recipe_from_dict({"quant": {"scheme": INT3_SCHEME}})


@pytest.mark.parametrize("case", ["qwen3-mixed-rows-int3-tables", "llama-untied-all-int3"])
def test_int3_packs_and_loads_back_bit_exactly(example_plugin, tok, tmp_path, case):
    torch.manual_seed(0)
    if case.startswith("qwen3"):
        model = _int3_qwen3(tok, embedding={"quantizer": "int3"}, lm_head={"quantizer": "int3"})
        ternary_rows = True
    else:
        model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok), tie_word_embeddings=False))
        edgerazor.quantize(model, {"quant": {"scheme": "3-8-8", "weight": {"high": "int3", "group_size": 64},
                                             "embedding": {"quantizer": "int3"}, "lm_head": {"quantizer": "int3"}}})
        model.eval()
        ternary_rows = False
    meta = export_packed(model, tok, tmp_path / "p")
    down = meta["layers"]["model.layers.0.mlp.down_proj"]
    assert down["high"] == "int3" and down["codec_high"] == "sym3"  # chosen from qmax: the plugin names no codec
    assert down.get("codec_low") == ("ternary_base3" if ternary_rows else None)
    assert meta["layers"]["model.embed_tokens"]["codec_high"] == "sym3"
    stored = json.loads((tmp_path / "p" / METADATA_FILE).read_text())["layers"]
    assert stored["model.layers.0.mlp.down_proj"]["codec_high"] == "sym3"  # the loader reads the codec from here
    size = {t["name"]: t for t in meta["size"]["tensors"]}["model.layers.0.mlp.down_proj"]
    rows = down["high_rows"]
    expected = rows * -(-down["padded_d_in"] * 3 // 8)  # 3 bits per code, rows padded to whole bytes
    if ternary_rows:
        expected += (down["d_out"] - rows) * -(-down["padded_d_in"] // 5)
    expected += down["d_out"] * down["padded_d_in"] // 64 * 2 + -(-down["d_out"] // 8)  # fp16 scales, mask bits
    assert size["bytes"] == expected

    runtime, _ = edgerazor.load(tmp_path / "p")
    assert isinstance(runtime.model.layers[0].mlp.down_proj, PackedLinear)
    dense, _ = edgerazor.load(tmp_path / "p", dense=True)
    ids = torch.randint(0, len(tok), (2, 16))
    with torch.no_grad():
        reference = model(ids).logits
        assert torch.equal(runtime(ids).logits, reference)
        assert torch.equal(dense(ids).logits, reference)


def _student(tok, path, sections: dict | None = None):
    model = _int3_qwen3(tok, sections)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def _check_npz(model, path):
    data = np.load(path)
    quantized = {n: m for n, m in model.named_modules() if hasattr(m, "weight_quant")}
    # the tied lm_head is the embedding's weight: stored once
    assert sorted(data.files) == sorted(f"{n}.{k}" for n in quantized if n != "lm_head" for k in ("codes", "scales"))
    for name, module in quantized.items():
        if name == "lm_head":
            continue
        codes, scales = module.weight_quant.codes_and_scales(module.weight)
        assert data[f"{name}.codes"].dtype == np.int8 and np.array_equal(data[f"{name}.codes"], codes.numpy()), name
        assert data[f"{name}.scales"].dtype == np.float16
        assert np.array_equal(data[f"{name}.scales"].astype(np.float32), scales.numpy()), name
    down = data["model.layers.1.mlp.down_proj.codes"]
    mask = model.model.layers[1].mlp.down_proj.weight_quant.precision_mask.numpy()
    assert np.abs(down[mask]).max() == 3 and np.abs(down[~mask]).max() == 1  # int3 rows, ternary rows


def test_console_script_exports_with_a_thirdparty_exporter(example_plugin, plugin_site, tok, tmp_path):
    """A fresh process finds exporter and quantizer by entry point; the .npz holds the trained codes."""
    model = _student(tok, tmp_path / "run" / "student")
    out = tmp_path / "npz"
    proc = subprocess.run([_console_script(), "export", str(tmp_path / "run"), "--format", "codes_npz", "--out",
                           str(out), "--report"], capture_output=True, text=True, env=_env_with(plugin_site),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out / 'codes.npz'} (codes_npz)" in proc.stdout
    assert "has no size_report" in proc.stdout
    _check_npz(model, out / "codes.npz")


def test_export_options_reach_the_exporter_or_fail_by_name(example_plugin, tok, tmp_path, capsys):
    model = _student(tok, tmp_path / "student", {"export": {"format": "codes_npz"}})
    # no --format: the recipe's export.format names the exporter
    assert cli_main(["export", str(tmp_path / "student"), "--out", str(tmp_path / "a")]) == 0
    _check_npz(model, tmp_path / "a" / "codes.npz")
    capsys.readouterr()
    # an option the exporter does not declare is an error naming it, before anything is written
    assert cli_main(["export", str(tmp_path / "student"), "--format", "codes_npz", "--strict",
                     "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "exporter 'codes_npz' does not accept the option 'strict'; its options: compressed" in err
    assert not (tmp_path / "b").exists()
    assert cli_main(["export", str(tmp_path / "student"), "--format", "packed", "--type", "q4_0",
                     "--out", str(tmp_path / "c")]) == 2
    assert "exporter 'packed' does not accept the option 'type'; its options: overwrite" in capsys.readouterr().err
    assert cli_main(["export", str(tmp_path / "student"), "--format", "nope", "--out", str(tmp_path / "d")]) == 2
    assert "unknown exporters entry 'nope'; available: codes_npz, gguf, packed" in capsys.readouterr().err
    # a declared option is passed through
    path = run_exporter("codes_npz", model, tmp_path / "e", compressed=True)
    with zipfile.ZipFile(path) as archive:
        assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_DEFLATED}
    assert {i.compress_type for i in zipfile.ZipFile(tmp_path / "a" / "codes.npz").infolist()} == {zipfile.ZIP_STORED}
    with pytest.raises(PluginError, match="does not accept the option 'level'; its options: compressed"):
        run_exporter("codes_npz", model, tmp_path / "f", level=9)


def test_plugin_module_is_the_installed_one(example_plugin, plugin_site):
    module = sys.modules[f"{PLUGIN_MODULE}.formats"]
    assert Path(module.__file__).resolve().is_relative_to(plugin_site.resolve()), "loaded from the pip install"
    assert isinstance(example_plugin.get("quantizers", "int3"), module.Int3)
    assert example_plugin.get("exporters", "codes_npz") is module.codes_npz


def test_builtins_declare_the_papers_codecs(tok, tmp_path):
    from edgerazor.plugin_manager import get

    assert {n: get("quantizers", n).codec for n in ("ternary", "int4", "int8")} == {
        "ternary": "ternary_base3", "int4": "int4", "int8": "int8"}
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_qwen3_config(vocab_size=len(tok)))
    edgerazor.quantize(model, {"quant": {"scheme": "1.88-8-8", "weight": {"group_size": 64}}})
    layers = export_packed(model, tok, tmp_path / "p")["layers"]
    assert (layers["model.layers.0.mlp.down_proj"]["codec_high"], layers["model.layers.0.mlp.down_proj"]["codec_low"],
            layers["model.embed_tokens"]["codec_high"]) == ("int4", "ternary_base3", "int4")


class _Wide:
    """15 levels each side, but claims the 4-bit nibble codec, which holds only [-7, 7]."""

    qmax, bits, codec = 15, 5.0, "int4"

    def scale(self, groups):
        return (groups.abs().amax(-1) / 15).clamp(min=1e-5)


class _Int8Alt:
    qmax, bits = 127, 8.0

    def scale(self, groups):
        return (groups.abs().amax(-1) / 127).clamp(min=1e-5)


def _quantizer_plugin(**quantizers):
    from edgerazor import hookimpl

    def register_quantizers(register):
        for name, quantizer in quantizers.items():
            register(name, quantizer)

    return SimpleNamespace(register_quantizers=hookimpl(register_quantizers))


def test_a_declared_codec_must_hold_the_codes(restore_plugins, tok, tmp_path):
    reload_plugins().register(_quantizer_plugin(wide=_Wide()), name="wide_plugin")
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_qwen3_config(vocab_size=len(tok)))
    edgerazor.quantize(model, {"quant": {"weight": {"high": "wide", "rho": 1.0, "group_size": 64}}})
    with pytest.raises(EdgeRazorError, match=re.escape(
            "layer 'model.layers.0.self_attn.q_proj': quantizer 'wide' cannot be packed: codec 'int4' holds codes "
            "in [-7, 7], not [-15, 15]")):
        export_packed(model, tok, tmp_path / "p")


@pytest.mark.parametrize(("obj", "problem"), [
    (SimpleNamespace(qmax=200, bits=9.0, scale=lambda g: g), "a quantizer needs qmax <= 127 (codes are stored as int8)"),
    (SimpleNamespace(qmax=3, bits=3.0, codec=3, scale=lambda g: g), "a quantizer's codec must be a codec name"),
    (SimpleNamespace(qmax=3, bits=0, scale=lambda g: g), "a quantizer needs a numeric bits attribute > 0"),
])
def test_quantizer_shape_checks(obj, problem):
    with pytest.raises(PluginError, match=re.escape(problem)):
        PluginSystem(load_entry_points=False).register(_quantizer_plugin(bad=obj), name="bad_plugin")


def test_activation_and_kv_quantizers_come_from_the_recipe(restore_plugins, tiny_qwen3, example_plugin):
    example_plugin.register(_quantizer_plugin(int8_alt=_Int8Alt()), name="alt_plugin")
    recipe = {"quant": {"weight": {"group_size": 64}, "activation": {"quantizer": "int8_alt"},
                        "kv_cache": {"quantizer": "int8_alt"}}}
    edgerazor.quantize(tiny_qwen3, recipe)
    attention = tiny_qwen3.model.layers[0].self_attn
    assert isinstance(attention.q_proj.input_quant.quantizer, _Int8Alt)
    assert attention.q_proj.input_quant.quantizer_name == "int8_alt"
    assert isinstance(attention.edgerazor_kv.quantizer, _Int8Alt) and attention.edgerazor_kv.quantizer_name == "int8_alt"
    torch.manual_seed(0)
    fresh = Qwen3ForCausalLM(tiny_qwen3_config()).eval()
    with pytest.raises(EdgeRazorError, match=re.escape(
            "quant.activation.quantizer 'int3' declares 3 bits, but quant.activation.bits is 8")):
        edgerazor.quantize(fresh, {"quant": {"weight": {"group_size": 64}, "activation": {"quantizer": "int3"}}})
