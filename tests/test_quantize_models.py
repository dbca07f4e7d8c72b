"""``quantize()`` on tiny random-weight Qwen3 / Llama models built from real transformers configs.

Covers the model surgery (which modules become what, tied weights, the report), exact layer
forwards against a plain re-computation of the spec's quantizers, include/exclude globs,
save/load with the stored row masks, group-size errors and padding, and KV8 through the
attention-function wrapper (on/off, under gradient checkpointing, in ``generate()`` with a cache,
eager and sdpa).
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3ForCausalLM

import edgerazor
from edgerazor import EdgeRazorError, QuantizationError
from edgerazor.quant import QuantEmbedding, QuantLinear
from edgerazor.quant.kv import KVFakeQuant

from tests.helpers import tiny_llama_config, tiny_qwen3_config

EPS = 1e-5
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def recipe(scheme: str = "1.88-8-8", group_size: int | None = 64, **quant) -> dict:
    weight = dict(quant.pop("weight", {}))
    if group_size is not None:
        weight.setdefault("group_size", group_size)
    return {"quant": {"scheme": scheme, "weight": weight, **quant}}


def qwen3(seed: int = 0, **overrides) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(tiny_qwen3_config(**overrides)).eval()


def llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def token_ids(model, batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=g)


def decoder_linear_names(model) -> list[str]:
    return [
        name for name, m in model.named_modules()
        if name.startswith("model.layers.") and name.rsplit(".", 1)[-1] in DECODER_LINEARS
    ]


# ---- plain re-computation of the spec's quantizers (independent of edgerazor.quant.grouping) ----

def fp16(scale: torch.Tensor) -> torch.Tensor:
    return scale.to(torch.float16).to(torch.float32)


def ref_weight_dequant(weight: torch.Tensor, mask: torch.Tensor, group: int) -> torch.Tensor:
    """Row i: int4 absmax if mask[i] else ternary (beta=2); per group of ``group`` along d_in, zero-padded."""
    w = weight.detach().float()
    d_out, d_in = w.shape
    padded = math.ceil(d_in / group) * group
    g = F.pad(w, (0, padded - d_in)).reshape(d_out, padded // group, group)
    s_int4 = (g.abs().amax(-1) / 7).clamp(min=EPS)
    s_tern = (2.0 * g.abs().mean(-1)).clamp(min=EPS)
    row = mask.view(-1, 1)
    s = fp16(torch.where(row, s_int4, s_tern))
    qmax = torch.where(row, 7.0, 1.0).unsqueeze(-1)
    q = torch.clamp(torch.round(g / s.unsqueeze(-1)), -qmax, qmax)
    return (q * s.unsqueeze(-1)).reshape(d_out, padded)[:, :d_in]


def ref_act_fake_quant(x: torch.Tensor, group: int) -> torch.Tensor:
    """int8 absmax per token, per group along the last dim (zero-padded to a multiple of ``group``)."""
    d = x.shape[-1]
    padded = math.ceil(d / group) * group
    g = F.pad(x.float(), (0, padded - d)).reshape(*x.shape[:-1], padded // group, group)
    s = fp16((g.abs().amax(-1) / 127).clamp(min=EPS)).unsqueeze(-1)
    q = torch.clamp(torch.round(g / s), -127, 127)
    return (q * s).reshape(*x.shape[:-1], padded)[..., :d]


def super_group_mask(d_out: int, period: int) -> torch.Tensor:
    return torch.arange(d_out) % period == 0


class KVCounter:
    """Counts calls of every ``edgerazor_kv`` submodule (each attention forward quantizes K and V)."""

    def __init__(self, model):
        self.calls = 0
        self.handles = [
            m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, KVFakeQuant)
        ]
        assert self.handles, "no KVFakeQuant modules attached"

    def _hook(self, module, args, output):
        if module.enabled:
            assert not torch.equal(output, args[0]), "KV quantizer ran but changed nothing"
        self.calls += 1

    def remove(self):
        for h in self.handles:
            h.remove()


# ---- surgery and report ----

@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_every_layer_replaced_and_tables_are_4bit(family):
    model = qwen3() if family == "qwen3" else llama()
    linear_names = decoder_linear_names(model)
    n_params = sum(p.numel() for p in model.parameters())
    assert len(linear_names) == 7 * model.config.num_hidden_layers
    report = edgerazor.quantize(model, recipe() if family == "qwen3" else recipe(group_size=None))

    for name in linear_names:
        module = model.get_submodule(name)
        assert type(module) is QuantLinear, name
        assert module.weight_quant.names == ("int4", "ternary")
        assert module.input_quant is not None  # A8
    assert not [n for n, m in model.named_modules() if type(m) is nn.Linear]
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert type(embed) is QuantEmbedding and type(head) is QuantLinear
    for table in (embed, head):
        wq = table.weight_quant
        assert wq.names == ("int4", None) and wq.low is None and wq.high.qmax == 7
        assert bool(wq.precision_mask.all())
        codes, _ = wq.codes_and_scales(table.weight)
        assert int(codes.abs().max()) == 7  # really 4-bit codes in [-7, 7]
    # no new parameters (masks are buffers), tie kept
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert head.weight is embed.weight

    # report: one entry per quantized layer, bits / G / real 4-bit fraction
    by_name = {r.name: r for r in report.layers}
    assert set(by_name) == set(linear_names) | {"model.embed_tokens", "lm_head"}
    expected_g = 64  # recipe's 64 for Qwen3; the MobileLLM adapter's default 64 for Llama
    for name in linear_names:
        r = by_name[name]
        assert (r.kind, r.high, r.low, r.group_size, r.activation_bits) == ("linear", "int4", "ternary", expected_g, 8)
        assert r.high_fraction == pytest.approx(1 / 8)
        assert r.padded_d_in == r.d_in == model.get_submodule(name).in_features
    assert by_name["model.embed_tokens"].kind == "embedding" and by_name["model.embed_tokens"].activation_bits == 16
    assert by_name["lm_head"].kind == "lm_head"
    for name in ("model.embed_tokens", "lm_head"):
        assert (by_name[name].high, by_name[name].low, by_name[name].high_fraction) == ("int4", None, 1.0)
    assert report.w_a_kv == "1.88-8-8"
    assert report.adapter == ("qwen3" if family == "qwen3" else "mobilellm")
    assert report.kv_layers == model.config.num_hidden_layers and report.kv_group_size == 32
    assert model.config.edgerazor["recipe"]["quant"]["weight"]["group_size"] == (64 if family == "qwen3" else None)


@pytest.mark.parametrize("scheme, period", [("1.88-16-16", 8), ("2.79-16-16", 2), ("2.39-16-16", 3),
                                            ("4-16-16", 1), ("1.58-16-16", 0)])
def test_report_fraction_is_the_real_super_group_fraction(scheme, period):
    model = qwen3(intermediate_size=200)  # gate/up d_out=200: not a multiple of 8 or 3
    report = edgerazor.quantize(model, recipe(scheme, weight={"pad": True}))  # down_proj d_in 200 -> 256
    for r in report.layers:
        if r.kind != "linear":
            continue
        mask = model.get_submodule(r.name).weight_quant.precision_mask
        if period == 0:
            assert not bool(mask.any()) and r.high_fraction == 0.0 and r.low == "ternary"
            continue
        assert torch.equal(mask, super_group_mask(r.d_out, period)), r.name
        assert r.high_fraction == pytest.approx(math.ceil(r.d_out / period) / r.d_out)
        assert r.low == (None if period == 1 else "ternary")
        assert r.activation_bits == 16 and model.get_submodule(r.name).input_quant is None
    fractions = {r.d_out: r.high_fraction for r in report.layers if r.kind == "linear"}
    assert {r.padded_d_in for r in report.layers if r.name.endswith("down_proj")} == {256}
    if period == 3:
        assert fractions[200] == pytest.approx(67 / 200) and fractions[200] != pytest.approx(1 / 3)
    assert report.kv_layers == 0 and not model.config._attn_implementation.startswith("edgerazor_kv:")


def test_tied_weights_stay_tied_through_an_optimizer_step():
    model = qwen3()
    edgerazor.quantize(model, recipe())
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    shared = embed.weight
    assert head.weight is shared
    assert sum(p is shared for p in model.parameters()) == 1  # deduplicated, as an optimizer sees it
    before = shared.detach().clone()
    ids = token_ids(model)
    with torch.no_grad():
        logits_before = model(ids).logits
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = model(ids, labels=ids)
    out.loss.backward()
    assert shared.grad is not None and shared.grad.abs().sum() > 0  # STE passes gradient through both uses
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("proj.weight"))
    opt.step()
    model.eval()
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight is shared
    assert not torch.equal(shared.detach(), before)
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, logits_before)  # scales follow the latent weights


# ---- exact layer forwards ----

@pytest.mark.parametrize("a_bits", [16, 8])
def test_quant_linear_forward_is_exact(a_bits):
    model = qwen3()
    edgerazor.quantize(model, recipe(f"1.88-{a_bits}-16"))
    torch.manual_seed(3)
    x = torch.randn(2, 5, 256)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.0.mlp.down_proj"):
        layer = model.get_submodule(name)
        xin = x[..., : layer.in_features].clone().requires_grad_(True)
        mask = layer.weight_quant.precision_mask
        assert torch.equal(mask, super_group_mask(layer.out_features, 8))
        w_hat = layer.weight_quant.dequantized(layer.weight)
        ref = ref_weight_dequant(layer.weight, mask, 64)
        assert torch.equal(w_hat, ref), name
        assert not torch.equal(w_hat, layer.weight.detach())
        # 4-bit rows have codes in [-7, 7], ternary rows in {-1, 0, 1}
        codes, scales = layer.weight_quant.codes_and_scales(layer.weight)
        assert int(codes[mask].abs().max()) == 7 and int(codes[~mask].abs().max()) == 1
        assert torch.equal(scales, scales.half().float())

        y = layer(xin)
        if a_bits == 16:
            assert layer.input_quant is None
            x_used = xin.detach()
        else:
            x_used = ref_act_fake_quant(xin.detach(), 64)
            assert not torch.equal(x_used, xin.detach())
        assert y.dtype == torch.float32
        assert torch.equal(y, F.linear(x_used, w_hat)), name
        assert not torch.equal(y, F.linear(xin.detach(), layer.weight.detach()))

        # STE: the weight gradient is the gradient w.r.t. W_hat, the input gradient passes through
        grad_out = torch.randn_like(y)
        y.backward(grad_out)
        w_leaf = w_hat.clone().requires_grad_(True)
        x_leaf = x_used.clone().requires_grad_(True)
        F.linear(x_leaf, w_leaf).backward(grad_out)
        assert torch.equal(layer.weight.grad, w_leaf.grad)
        assert torch.equal(xin.grad, x_leaf.grad)
        layer.weight.grad = None


def test_embedding_rows_equal_dequantized_table():
    model = qwen3()
    edgerazor.quantize(model, recipe())
    embed = model.get_input_embeddings()
    table = embed.weight_quant.dequantized(embed.weight)
    assert torch.equal(table, ref_weight_dequant(embed.weight, torch.ones(512, dtype=torch.bool), 64))
    ids = torch.tensor([[0, 5, 511, 5], [42, 42, 7, 300]])
    out = embed(ids)
    assert torch.equal(out, table[ids])
    assert not torch.equal(out, embed.weight.detach()[ids])
    assert torch.equal(model.model.embed_tokens(ids), out)


# ---- include / exclude ----

def test_exclude_glob_leaves_mlp_plain():
    model = llama()
    report = edgerazor.quantize(model, recipe(exclude=["*.mlp.*"]))
    for name in decoder_linear_names(model):
        module = model.get_submodule(name)
        if ".mlp." in name:
            assert type(module) is nn.Linear, name
        else:
            assert type(module) is QuantLinear, name
    assert not any(".mlp." in r.name for r in report.layers)
    assert type(model.get_input_embeddings()) is QuantEmbedding
    assert report.kv_layers == 2


def test_include_glob_limits_layers_and_kv():
    model = qwen3()
    report = edgerazor.quantize(model, recipe(include=["model.layers.0.*"]))
    for name in decoder_linear_names(model):
        expected = QuantLinear if name.startswith("model.layers.0.") else nn.Linear
        assert type(model.get_submodule(name)) is expected, name
    assert report.kv_layers == 1
    assert isinstance(getattr(model.model.layers[0].self_attn, "edgerazor_kv", None), KVFakeQuant)
    assert not hasattr(model.model.layers[1].self_attn, "edgerazor_kv")
    assert {r.name for r in report.layers if r.kind == "linear"} == {
        n for n in decoder_linear_names(model) if n.startswith("model.layers.0.")
    }


def test_exclude_tables_keeps_them_16bit():
    model = llama(tie_word_embeddings=False)
    report = edgerazor.quantize(model, recipe(exclude=["lm_head", "model.embed_tokens"]))
    assert type(model.get_input_embeddings()) is nn.Embedding
    assert type(model.get_output_embeddings()) is nn.Linear
    assert {r.kind for r in report.layers} == {"linear"}


# ---- save / load ----

def test_save_load_reads_the_stored_mask(tmp_path):
    model = qwen3()
    edgerazor.quantize(model, recipe())
    target = "model.layers.1.mlp.down_proj"
    custom = torch.zeros(128, dtype=torch.bool)
    custom[[1, 2, 3, 50, 77, 127]] = True
    assert not torch.equal(custom, super_group_mask(128, 8))
    model.get_submodule(target).weight_quant.precision_mask.copy_(custom)
    ids = token_ids(model)
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path)

    loaded, tokenizer = edgerazor.load(tmp_path)
    assert tokenizer is None
    assert not loaded.training
    assert torch.equal(loaded.get_submodule(target).weight_quant.precision_mask, custom)
    for name in decoder_linear_names(loaded):
        if name != target:
            m = loaded.get_submodule(name)
            assert torch.equal(m.weight_quant.precision_mask, super_group_mask(m.out_features, 8))
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    assert loaded.config._attn_implementation.startswith("edgerazor_kv:")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)

    # the logits depend on the mask: the super-group mask gives different ones
    loaded.get_submodule(target).weight_quant.precision_mask.copy_(super_group_mask(128, 8))
    with torch.no_grad():
        assert not torch.equal(loaded(ids).logits, logits)


def test_load_untied_llama_roundtrip(tmp_path):
    model = llama(tie_word_embeddings=False)
    edgerazor.quantize(model, recipe("2.79-8-8", group_size=None, lm_head={"quantizer": "int8"}))
    head_mask = model.lm_head.weight_quant.precision_mask
    assert model.lm_head.weight_quant.names == ("int8", None) and bool(head_mask.all())
    ids = token_ids(model)
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = edgerazor.load_quantized(tmp_path)
    assert loaded.lm_head.weight is not loaded.get_input_embeddings().weight
    assert loaded.lm_head.weight_quant.names == ("int8", None)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)


def test_load_without_edgerazor_config_entry(tmp_path):
    model = qwen3()
    edgerazor.quantize(model, recipe())
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    data = json.loads(config_file.read_text())
    assert "edgerazor" in data

    bad = dict(data, edgerazor=dict(data["edgerazor"], format_version=99))
    config_file.write_text(json.dumps(bad))
    with pytest.raises(EdgeRazorError, match="format_version"):
        edgerazor.load(tmp_path)

    del data["edgerazor"]
    config_file.write_text(json.dumps(data))
    with pytest.raises(EdgeRazorError, match=r"no 'edgerazor' entry.*not an EdgeRazor checkpoint"):
        edgerazor.load(tmp_path)

    config_file.unlink()
    with pytest.raises(EdgeRazorError, match="no config.json"):
        edgerazor.load(tmp_path)


# ---- group size ----

def mobilellm_350m_config(**overrides) -> LlamaConfig:
    kwargs = dict(vocab_size=32000, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                  num_attention_heads=15, num_key_value_heads=5, head_dim=64, tie_word_embeddings=True)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def test_group_size_not_dividing_raises_naming_layer():
    with torch.device("meta"):
        model = LlamaForCausalLM(mobilellm_350m_config())
    with pytest.raises(QuantizationError, match=r"'model\.layers\.0\.self_attn\.q_proj'.*256.*960") as exc:
        edgerazor.quantize(model, recipe(group_size=256))
    assert "pad" in str(exc.value)
    # nothing was swapped: the model can still be quantized with a fitting group size
    assert not any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())
    report = edgerazor.quantize(model, recipe(group_size=64))
    assert all(r.group_size == 64 and r.padded_d_in == r.d_in for r in report.layers)


def test_group_error_in_a_later_layer_leaves_model_untouched():
    model = qwen3(intermediate_size=200)  # down_proj d_in = 200: not a multiple of 64
    with pytest.raises(QuantizationError, match=r"'model\.layers\.0\.mlp\.down_proj'.*200"):
        edgerazor.quantize(model, recipe())
    assert not any(isinstance(m, (QuantLinear, QuantEmbedding, KVFakeQuant)) for m in model.modules())
    assert model.config._attn_implementation == "sdpa" and not hasattr(model.config, "edgerazor")


def test_pad_on_meta_mobilellm_reports_padded_dim():
    with torch.device("meta"):
        model = LlamaForCausalLM(mobilellm_350m_config())
    report = edgerazor.quantize(model, recipe(group_size=256, weight={"pad": True}))
    by_name = {r.name: r for r in report.layers}
    q = by_name["model.layers.0.self_attn.q_proj"]
    assert (q.d_in, q.padded_d_in, q.group_size) == (960, 1024, 256)
    down = by_name["model.layers.31.mlp.down_proj"]
    assert (down.d_in, down.padded_d_in) == (2560, 2560)
    assert by_name["model.embed_tokens"].padded_d_in == 1024 and by_name["lm_head"].padded_d_in == 1024
    assert len(report.layers) == 32 * 7 + 2
    assert report.kv_layers == 32 and report.kv_group_size == 64
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.weight_quant.padded_dim == 1024 and layer.input_quant.padded_dim == 1024


def test_pad_on_tiny_model_forward_is_exact():
    torch.manual_seed(0)
    cfg = tiny_llama_config(hidden_size=96, intermediate_size=160, num_attention_heads=3,
                            num_key_value_heads=1, head_dim=32)
    model = LlamaForCausalLM(cfg).eval()
    with pytest.raises(QuantizationError, match="q_proj"):
        edgerazor.quantize(model, recipe())
    report = edgerazor.quantize(model, recipe(weight={"pad": True}))
    by_name = {r.name: r for r in report.layers}
    assert by_name["model.layers.0.self_attn.q_proj"].padded_d_in == 128
    assert by_name["model.layers.0.mlp.down_proj"].padded_d_in == 192
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"):
        layer = model.get_submodule(name)
        mask = layer.weight_quant.precision_mask
        w_hat = layer.weight_quant.dequantized(layer.weight)
        assert w_hat.shape == layer.weight.shape
        # each row is zero-padded on its own: the last (partial) group's scale counts the zeros
        assert torch.equal(w_hat, ref_weight_dequant(layer.weight, mask, 64)), name
        x = torch.randn(2, 3, layer.in_features)
        with torch.no_grad():
            assert torch.equal(layer(x), F.linear(ref_act_fake_quant(x, 64), w_hat)), name
    with torch.no_grad():
        logits = model(token_ids(model)).logits
    assert logits.shape == (2, 12, 384) and torch.isfinite(logits).all()


# ---- KV8 ----

def test_kv_quant_off_changes_logits():
    model = qwen3()
    edgerazor.quantize(model, recipe())
    ids = token_ids(model)
    counter = KVCounter(model)
    with torch.no_grad():
        on = model(ids).logits
    assert counter.calls == 2 * 2  # K and V in each of 2 layers
    assert edgerazor.set_kv_quant_enabled(model, False) == 2
    with torch.no_grad():
        off = model(ids).logits
    assert not torch.allclose(on, off, atol=1e-4)
    edgerazor.set_kv_quant_enabled(model, True)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, on)


def test_kv_quant_matches_reference_inside_attention():
    """The K/V the wrapper hands to attention are per-token int8 over head_dim groups."""
    model = qwen3()
    edgerazor.quantize(model, recipe(kv_cache={"group_size": 16}))
    seen = []
    kv = model.model.layers[0].self_attn.edgerazor_kv
    assert kv.group_size == 16
    handle = kv.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), out.detach())))
    with torch.no_grad():
        model(token_ids(model))
    handle.remove()
    assert len(seen) == 2
    for raw, out in seen:
        assert raw.shape[-1] == 32
        assert torch.equal(out, ref_act_fake_quant(raw, 16))


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_kv8_stays_on_under_gradient_checkpointing(family):
    model = qwen3() if family == "qwen3" else llama()
    edgerazor.quantize(model, recipe() if family == "qwen3" else recipe(group_size=None))
    ids = token_ids(model)
    n_layers = model.config.num_hidden_layers
    with torch.no_grad():
        ref_on = model(ids).logits
        edgerazor.set_kv_quant_enabled(model, False)
        ref_off = model(ids).logits
        edgerazor.set_kv_quant_enabled(model, True)
    assert not torch.allclose(ref_on, ref_off, atol=1e-4)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()
    model.train()
    assert model.model.layers[0].gradient_checkpointing
    counter = KVCounter(model)
    logits = model(ids).logits
    assert counter.calls == 2 * n_layers
    logits.float().pow(2).mean().backward()
    # the backward recomputed each checkpointed layer, KV quantizer included
    assert counter.calls == 4 * n_layers
    assert torch.allclose(logits.detach(), ref_on, rtol=0, atol=1e-6)
    assert not torch.allclose(logits.detach(), ref_off, atol=1e-4)

    edgerazor.set_kv_quant_enabled(model, False)
    off_ckpt = model(ids).logits.detach()
    assert torch.allclose(off_ckpt, ref_off, rtol=0, atol=1e-6)
    counter.remove()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_with_cache_matches_full_forward(attn):
    model = qwen3(attn_implementation=attn)
    edgerazor.quantize(model, recipe())
    assert model.config._attn_implementation == f"edgerazor_kv:{attn}"
    prompt = token_ids(model, batch=2, length=7)
    new = 6
    step_lens = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda m, args: step_lens.append(args[0].shape[1])
    )
    counter = KVCounter(model)
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, use_cache=True, output_logits=True, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=0)
    hook.remove()
    assert step_lens == [7] + [1] * (new - 1)  # the cache was used: one new token per step
    assert counter.calls == 2 * 2 * new  # KV8 ran in every step
    counter.remove()
    seq = out.sequences
    assert seq.shape == (2, 7 + new) and len(out.logits) == new
    step_logits = torch.stack(out.logits, dim=1)  # [B, new, V]

    with torch.no_grad():
        full_on = model(seq[:, :-1]).logits[:, 6:]
        edgerazor.set_kv_quant_enabled(model, False)
        full_off = model(seq[:, :-1]).logits[:, 6:]
    assert torch.allclose(step_logits, full_on, rtol=0, atol=1e-5)
    assert torch.equal(seq[:, 7:], full_on.argmax(-1))  # greedy picked the argmax of the full forward
    assert not torch.allclose(step_logits, full_off, atol=1e-4)

    with torch.no_grad():  # generating with KV off gives KV-off logits
        out_off = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1, do_sample=False,
                                 use_cache=True, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    assert not torch.allclose(out_off.logits[0], step_logits[:, 0], atol=1e-4)
    assert torch.allclose(out_off.logits[0], full_off[:, 0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_eager_and_sdpa_agree(family):
    build = qwen3 if family == "qwen3" else llama
    logits = {}
    for attn in ("eager", "sdpa"):
        model = build(attn_implementation=attn)
        assert model.config._attn_implementation == attn
        edgerazor.quantize(model, recipe())
        assert model.config._attn_implementation == f"edgerazor_kv:{attn}"
        counter = KVCounter(model)
        with torch.no_grad():
            logits[attn] = model(token_ids(model)).logits
            assert counter.calls == 2 * model.config.num_hidden_layers
            edgerazor.set_kv_quant_enabled(model, False)
            off = model(token_ids(model)).logits
        assert not torch.allclose(logits[attn], off, atol=1e-4)
    assert torch.allclose(logits["eager"], logits["sdpa"], rtol=0, atol=1e-4)


# ---- refusals ----

def test_requantizing_raises():
    model = qwen3()
    edgerazor.quantize(model, recipe())
    with pytest.raises(QuantizationError, match="already quantized"):
        edgerazor.quantize(model, recipe())
    partial = llama()
    edgerazor.quantize(partial, recipe(include=["model.layers.1.*"], embedding={"quantizer": None},
                                       lm_head={"quantizer": None}))
    with pytest.raises(QuantizationError, match="already quantized"):
        edgerazor.quantize(partial, recipe())


@pytest.mark.parametrize("quant", [
    {"lm_head": {"quantizer": "int8"}},
    {"lm_head": {"group_size": 32}},
    {"embedding": {"quantizer": None}},
])
def test_tied_tables_with_different_quantizers_raise(quant):
    model = qwen3()
    with pytest.raises(QuantizationError, match=r"'lm_head'.*'model\.embed_tokens'.*tie_word_embeddings"):
        edgerazor.quantize(model, recipe(**quant))
    # refused before any surgery
    assert not any(isinstance(m, (QuantLinear, QuantEmbedding, KVFakeQuant)) for m in model.modules())
    assert model.config._attn_implementation == "sdpa"
    # untied, the same recipe is fine
    untied = qwen3(tie_word_embeddings=False)
    edgerazor.quantize(untied, recipe(**quant))
