"""The Qwen2.5-Omni adapter on tiny random-weight thinkers built from the real transformers configs.

Covers loading from a thinker and from a full Omni checkpoint (tensors compared), the vision encoder
quantized with its Conv3d patch embedding (1176 weights per channel, zero-padded to a multiple of G),
``quant.components`` validation, KV8 with M-RoPE under gradient checkpointing, save/load, LAFD's
residual stream, and the size accounting of the published 7B shape (GGUF and mmproj: tests/test_gguf_omni.py).
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    Qwen2_5OmniConfig,
    Qwen2_5OmniForConditionalGeneration,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
)

import edgerazor
from edgerazor import QuantizationError
from edgerazor.adapters import AdapterError, resolve_adapter
from edgerazor.distill.features import record_residual_stream
from edgerazor.quant import QuantLinear, count_bits
from edgerazor.quant.kv import KVFakeQuant
from edgerazor.quant.modules import QuantConv3d

TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False,
            rope_scaling={"type": "default", "mrope_section": [2, 3, 3]})
VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
              temporal_patch_size=2, spatial_merge_size=2, in_channels=3, fullatt_block_indexes=[1], window_size=56)
AUDIO = dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, output_dim=64,
             num_mel_bins=16, max_source_positions=50, n_window=10)
KERNEL = 3 * 2 * 14 * 14  # the patch embedding's flattened kernel: 1176


def thinker_config() -> Qwen2_5OmniThinkerConfig:
    return Qwen2_5OmniThinkerConfig(text_config=TEXT, vision_config=VISION, audio_config=AUDIO)


def thinker(seed: int = 0) -> Qwen2_5OmniThinkerForConditionalGeneration:
    torch.manual_seed(seed)
    return Qwen2_5OmniThinkerForConditionalGeneration(thinker_config()).eval()


def recipe(**quant) -> dict:
    return {"quant": {"scheme": "4-8-8", **quant}}


def token_ids(batch: int = 2, length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TEXT["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def pixels(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """One 2-frame 56x56 clip as the processor lays it out: 4x4 patches of 1176 values, grid (1, 4, 4)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, KERNEL, generator=g), torch.tensor([[1, 4, 4]])


def ref_int4(weight: torch.Tensor, group: int) -> torch.Tensor:
    """int4 absmax per group of ``group`` along the zero-padded flattened rows, fp16 scales."""
    w = weight.detach().float().reshape(weight.shape[0], -1)
    d_out, d_in = w.shape
    padded = math.ceil(d_in / group) * group
    g = F.pad(w, (0, padded - d_in)).reshape(d_out, padded // group, group)
    s = (g.abs().amax(-1) / 7).clamp(min=1e-5).to(torch.float16).to(torch.float32)
    q = torch.clamp(torch.round(g / s.unsqueeze(-1)), -7, 7)
    return (q * s.unsqueeze(-1)).reshape(d_out, padded)[:, :d_in].reshape(weight.shape)


def vision_weights(model) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if n.startswith("model.visual.") and isinstance(m, (nn.Linear, nn.Conv3d))}


# ---- adapter ----

def test_adapter_serves_thinker_and_full_omni():
    assert Qwen2_5OmniThinkerConfig.model_type == "qwen2_5_omni_thinker"
    for model_type in ("qwen2_5_omni_thinker", "qwen2_5_omni"):
        assert resolve_adapter(model_type).name == "qwen2_5_omni"
    adapter = resolve_adapter("qwen2_5_omni_thinker")
    assert adapter.default_group_size == 32
    comps = {c.name: c for c in adapter.components()}
    assert list(comps) == ["decoder", "embedding", "lm_head", "vision", "audio"]
    assert comps["vision"].quantized and comps["vision"].include_conv3d and comps["vision"].pad
    assert not comps["audio"].quantized
    model = thinker()
    assert adapter.decoder_layers(model) is model.model.language_model.layers


def tiny_full_omni() -> Qwen2_5OmniForConditionalGeneration:
    config = Qwen2_5OmniConfig(
        thinker_config=dict(text_config=TEXT, vision_config=VISION, audio_config=AUDIO),
        talker_config=dict(vocab_size=64, embedding_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                           rope_scaling={"type": "default", "mrope_section": [2, 3, 3]}),
        token2wav_config=dict(
            dit_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=16, emb_dim=16,
                            enc_emb_dim=16, enc_dim=16, enc_channels=[16, 16, 16, 16, 32], enc_attention_channels=8,
                            enc_se_channels=8, num_embeds=64),
            bigvgan_config=dict(upsample_initial_channel=32)),
    )
    torch.manual_seed(3)
    return Qwen2_5OmniForConditionalGeneration(config).eval()


def test_loads_thinker_weights_from_full_and_thinker_checkpoints(tmp_path):
    full = tiny_full_omni()
    full.save_pretrained(tmp_path / "full")
    full.thinker.save_pretrained(tmp_path / "thinker")
    expected = full.thinker.state_dict()
    adapter = resolve_adapter("qwen2_5_omni")
    assert adapter.load_config(str(tmp_path / "full")).model_type == "qwen2_5_omni_thinker"
    for where, load in (("full", adapter.load_student), ("thinker", adapter.load_teacher)):
        torch.manual_seed(99)  # a different random init: only loaded weights can be equal
        model = load(str(tmp_path / where))
        assert type(model) is Qwen2_5OmniThinkerForConditionalGeneration
        got = model.state_dict()
        assert set(got) == set(expected)
        assert all(torch.equal(got[k], expected[k]) for k in expected), where
        with torch.no_grad():
            assert torch.equal(model(token_ids()).logits, full.thinker(token_ids()).logits)


def test_other_family_refused():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    with pytest.raises(AdapterError, match="does not serve model_type 'qwen3'"):
        edgerazor.quantize(model, recipe(), adapter="qwen2_5_omni")
    with pytest.raises(AdapterError, match="Qwen2.5-Omni thinker"):  # an instance skips the name check
        edgerazor.quantize(model, recipe(), adapter=resolve_adapter("qwen2_5_omni"))


# ---- quantization of the components ----

def test_default_quantizes_decoder_tables_and_vision_with_conv3d_padded():
    model = thinker()
    report = edgerazor.quantize(model, recipe())
    by_name = {r.name: r for r in report.layers}
    vision = vision_weights(thinker())
    assert len(vision) == 1 + 2 * 7 + 2  # patch embed, 7 linears per block, 2 merger linears
    for name in vision:
        module = model.get_submodule(name)
        assert isinstance(module, QuantConv3d if name.endswith("patch_embed.proj") else QuantLinear), name
        assert by_name[name].component == "vision" and by_name[name].group_size == 32
        assert by_name[name].activation_bits == 16  # weight-only outside the decoder
    conv = by_name["model.visual.patch_embed.proj"]
    assert (conv.kind, conv.d_out, conv.d_in, conv.padded_d_in) == ("conv3d", 32, KERNEL, 1184)
    audio = [m for n, m in model.named_modules() if n.startswith("model.audio_tower.") and isinstance(m, nn.Linear)]
    assert len(audio) == 7 and all(type(m) is nn.Linear for m in audio)
    decoder = [r for r in report.layers if r.component == "decoder"]
    assert len(decoder) == 2 * 7 and all(r.name.startswith("model.language_model.layers.") for r in decoder)
    assert {r.kind for r in report.layers if r.component in ("embedding", "lm_head")} == {"embedding", "lm_head"}
    assert report.kv_layers == 2
    # the CLI table says the conv row is padded
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(report.table())
    assert f"32x{KERNEL} (zero-padded to 1184)" in console.export_text()


def test_conv3d_forward_and_gradient_are_exact():
    model = thinker()
    edgerazor.quantize(model, recipe())
    conv = model.model.visual.patch_embed.proj
    x = torch.randn(16, 3, 2, 14, 14, generator=torch.Generator().manual_seed(5))
    w_hat = ref_int4(conv.weight, 32)
    out = conv(x)
    assert torch.equal(out, F.conv3d(x, w_hat, conv.bias, conv.stride))
    assert not torch.equal(out, F.conv3d(x, conv.weight, conv.bias, conv.stride))
    out.pow(2).sum().backward()
    w_ref = w_hat.clone().requires_grad_(True)
    assert conv.bias is None  # Qwen's patch embedding has none
    F.conv3d(x, w_ref, None, conv.stride).pow(2).sum().backward()
    assert torch.equal(conv.weight.grad, w_ref.grad)  # straight-through estimator


def test_vision_group_size_dividing_the_kernel_without_padding():
    model = thinker()
    report = edgerazor.quantize(model, recipe(components={"vision": {"group_size": 24, "pad": False,
                                                                     "include_conv3d": True}},
                                              exclude=["model.visual.blocks.*", "model.visual.merger.*"]))
    conv = {r.name: r for r in report.layers}["model.visual.patch_embed.proj"]
    assert (conv.group_size, conv.padded_d_in) == (24, KERNEL)
    w = model.model.visual.patch_embed.proj.weight
    codes, scales = model.model.visual.patch_embed.proj.weight_quant.codes_and_scales(w.reshape(32, -1))
    assert scales.shape == (32, KERNEL // 24)


def test_group_size_not_dividing_a_vision_layer_without_padding_raises():
    model = thinker()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QuantizationError, match=r"model\.visual\.blocks\.0\.attn\.q.*quant\.components\.vision"):
        edgerazor.quantize(model, recipe(components={"vision": {"group_size": 24, "pad": False}}))
    assert not any(isinstance(m, (QuantLinear, QuantConv3d)) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_conv3d_can_stay_16bit_and_vision_can_be_off():
    model = thinker()
    edgerazor.quantize(model, recipe(components={"vision": {"include_conv3d": False}}))
    assert type(model.model.visual.patch_embed.proj) is nn.Conv3d
    assert isinstance(model.model.visual.blocks[0].attn.q, QuantLinear)
    model = thinker()
    edgerazor.quantize(model, recipe(components={"vision": {"quantizer": None}}))
    assert not any(isinstance(m, (QuantLinear, QuantConv3d)) for n, m in model.named_modules() if "visual" in n)


def test_audio_is_configurable():
    model = thinker()
    report = edgerazor.quantize(model, recipe(components={"audio": {"quantizer": "int4"}}))
    audio = [r for r in report.layers if r.component == "audio"]
    linears = [n for n, m in thinker().named_modules() if n.startswith("model.audio_tower.") and isinstance(m, nn.Linear)]
    assert sorted(r.name for r in audio) == sorted(linears) and len(linears) == 7
    assert type(model.model.audio_tower.conv1) is nn.Conv1d


@pytest.mark.parametrize("key, match", [("video", "no component 'video'.*vision, audio"),
                                        ("decoder", "quant.weight")])
def test_unknown_component_names_are_refused(key, match):
    with pytest.raises(QuantizationError, match=match):
        edgerazor.quantize(thinker(), recipe(components={key: {"quantizer": "int4"}}))


def test_count_bits_counts_conv3d_and_padding():
    model = thinker()
    edgerazor.quantize(model, recipe(components={"audio": {"quantizer": None}}))
    summary = count_bits(model)
    plain = thinker()
    expected_params, expected_bits = 0, 0.0
    for name, module in plain.named_modules():
        quantized = (isinstance(module, nn.Linear) and (name.startswith(("model.language_model.layers.",
                                                                          "model.visual.")) or name == "lm_head")
                     or isinstance(module, nn.Conv3d) or name == "model.language_model.embed_tokens")
        if quantized:
            d_out, d_in = module.weight.shape[0], module.weight[0].numel()
            expected_params += d_out * d_in
            expected_bits += d_out * d_in * 4 + d_out * math.ceil(d_in / 32) * 16
    total = sum(p.numel() for p in plain.parameters())
    assert summary.quantized_params == expected_params
    assert summary.total_bits == expected_bits + (total - expected_params) * 16


# ---- KV8 with M-RoPE, LAFD, save / load ----

def test_kv8_with_mrope_stays_on_under_gradient_checkpointing():
    model = thinker()
    edgerazor.quantize(model, recipe())
    ids = token_ids()
    calls = []
    handles = [m.register_forward_hook(lambda m, a, o: calls.append(not torch.equal(a[0], o)))
               for m in model.modules() if isinstance(m, KVFakeQuant)]
    assert len(handles) == 2
    with torch.no_grad():
        on = model(ids).logits
        edgerazor.set_kv_quant_enabled(model, False)
        off = model(ids).logits
        edgerazor.set_kv_quant_enabled(model, True)
    assert not torch.allclose(on, off, atol=1e-5)
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()
    model.train()
    assert model.model.language_model.gradient_checkpointing
    logits = model(ids).logits
    assert len(calls) == 2 * 2 and all(calls)
    logits.float().pow(2).mean().backward()
    assert len(calls) == 4 * 2  # recomputed in backward, KV quantizer included
    assert torch.allclose(logits.detach(), on, rtol=0, atol=1e-6)
    for h in handles:
        h.remove()


def test_lafd_reads_the_text_decoders_residual_stream():
    model = thinker()
    adapter = resolve_adapter("qwen2_5_omni_thinker")
    with record_residual_stream(adapter.decoder_layers(model)) as states, torch.no_grad():
        out = model(token_ids(), output_hidden_states=True)
    assert len(states) == 3
    for got, ref in zip(states, out.hidden_states[:-1]):  # transformers' last one is after the final norm
        assert torch.equal(got, ref)


def test_save_load_roundtrip_with_vision_and_conv3d(tmp_path):
    model = thinker()
    edgerazor.quantize(model, recipe())
    pv, grid = pixels()
    ids = token_ids()
    with torch.no_grad():
        logits = model(ids).logits
        vis = model.model.visual(pv, grid_thw=grid).pooler_output
    model.save_pretrained(tmp_path)
    loaded, _ = edgerazor.load(tmp_path)
    assert isinstance(loaded.model.visual.patch_embed.proj, QuantConv3d)
    assert loaded.model.visual.patch_embed.proj.weight_quant.padded_dim == 1184
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
        assert torch.equal(loaded.model.visual(pv, grid_thw=grid).pooler_output, vis)
        plain = thinker()
        assert not torch.equal(plain.model.visual(pv, grid_thw=grid).pooler_output, vis)


# ---- size accounting of the published shape ----

def independent_bits(group: int) -> tuple[int, int, float]:
    """(total, quantized, total bits) from the published config's numbers alone."""
    from edgerazor.shapes import builtin_models

    c = json.loads(builtin_models()["qwen2.5-omni-7b-thinker"].read_text())
    t, v, a = c["text_config"], c["vision_config"], c["audio_config"]
    h, i, L, V = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"], t["vocab_size"]
    kv = h // t["num_attention_heads"] * t["num_key_value_heads"]
    qbits = lambda d_out, d_in: d_out * d_in * 4 + d_out * math.ceil(d_in / group) * 16  # noqa: E731
    dec = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]
    dec_bias = h + 2 * kv
    vh, vi, vd = v["hidden_size"], v["intermediate_size"], v["depth"]
    merge_in = vh * v["spatial_merge_size"] ** 2
    vis = [(vh, vh)] * 4 + [(vi, vh), (vi, vh), (vh, vi)]
    vis_bias = 4 * vh + 2 * vi + vh
    kernel = v["in_channels"] * v["temporal_patch_size"] * v["patch_size"] ** 2
    merger = [(merge_in, merge_in), (v["out_hidden_size"], merge_in)]
    ad, af, al = a["d_model"], a["encoder_ffn_dim"], a["encoder_layers"]
    audio = (al * (4 * ad * ad + 3 * ad + 2 * ad * af + af + ad + 4 * ad)  # attn (k_proj has no bias), ffn, 2 norms
             + a["num_mel_bins"] * ad * 3 + ad + ad * ad * 3 + ad + 2 * ad + ad * a["output_dim"] + a["output_dim"]
             + 2 * a["output_dim"])
    quant = L * sum(o * n for o, n in dec) + 2 * V * h + vd * sum(o * n for o, n in vis) + vh * kernel \
        + sum(o * n for o, n in merger)
    bits = (L * sum(qbits(o, n) for o, n in dec) + 2 * qbits(V, h) + vd * sum(qbits(o, n) for o, n in vis)
            + qbits(vh, kernel) + sum(qbits(o, n) for o, n in merger))
    plain = L * (dec_bias + 2 * h) + h + vd * (vis_bias + 2 * vh) + vh + merge_in + v["out_hidden_size"] \
        + audio
    return quant + plain, quant, bits + plain * 16


@pytest.mark.parametrize("group", [32, 64])
def test_bits_of_the_published_shape(group, capsys):
    from edgerazor.cli import main

    total, quant, bits = independent_bits(group)
    main(["bits", "--model", "qwen2.5-omni-7b-thinker", "--group-size", str(group), "--json"])
    got = json.loads(capsys.readouterr().out)
    assert got["w_a_kv"].startswith("4-")  # the adapter's default: 4 bits throughout
    assert (got["total_params"], got["quantized_params"]) == (total, quant)
    assert got["total_bits"] == bits
    assert got["compression_ratio"] == pytest.approx(total * 16 / bits, rel=1e-12)
    assert got["components"]["audio"] == {"params": 639_647_232, "quantized_params": 0}
    assert got["paper"]["edgerazor"] == {"quantized_fraction": 0.9673, "compression_ratio": 3.45}
    expected = {32: (0.9283, 3.00), 64: (0.9283, 3.14)}[group]
    assert (round(got["quantized_fraction"], 4), round(got["compression_ratio"], 2)) == expected


def test_bits_baseline_is_decoder_only(capsys):
    from edgerazor.cli import main

    main(["bits", "--model", "qwen2.5-omni-7b-thinker", "--baseline", "--json"])
    got = json.loads(capsys.readouterr().out)
    assert got["components"]["vision"]["quantized_params"] == 0
    assert got["quantized_params"] == got["components"]["decoder"]["quantized_params"] == 28 * (
        2 * 3584 * 3584 + 2 * 512 * 3584 + 3 * 18944 * 3584)


# ---- packed export ----

SPECIAL = dict(video_token_index=300, image_token_index=299, audio_token_index=298, vision_start_token_id=301,
               vision_end_token_id=302, audio_start_token_id=303, audio_end_token_id=304, bos_token_id=1,
               eos_token_id=2, pad_token_id=0)


def test_packed_export_round_trip_with_video_is_bit_exact(tmp_path):
    from edgerazor.export.packed import export_packed
    from edgerazor.runtime.packed import PackedConv3d, PackedLinear
    from tests.tokenizer_utils import train_tiny_tokenizer

    torch.manual_seed(0)
    config = Qwen2_5OmniThinkerConfig(text_config=dict(TEXT, vocab_size=320), vision_config=VISION,
                                      audio_config=AUDIO, **SPECIAL)
    model = Qwen2_5OmniThinkerForConditionalGeneration(config).eval()
    edgerazor.quantize(model, recipe())
    tokenizer = train_tiny_tokenizer(["a small red square moves left. " * 40], vocab_size=300)
    metadata = export_packed(model, tokenizer, tmp_path / "p")
    assert metadata["layers"]["model.visual.patch_embed.proj"]["kind"] == "conv3d"
    assert metadata["layers"]["model.visual.patch_embed.proj"]["padded_d_in"] == 1184
    kinds = {t["name"]: t["kind"] for t in metadata["size"]["tensors"]}
    assert kinds["model.visual.blocks.0.mlp.down_proj"] == "encoder"
    assert kinds["model.language_model.layers.0.mlp.down_proj"] == "decoder"
    loaded, _ = edgerazor.load(tmp_path / "p")
    assert isinstance(loaded.model.visual.patch_embed.proj, PackedConv3d)
    assert isinstance(loaded.model.visual.merger.mlp[0], PackedLinear)
    pv, grid = pixels()
    video = dict(input_ids=torch.tensor([[5, 6, 301] + [300] * 4 + [302, 7, 8]]), pixel_values_videos=pv,
                 video_grid_thw=grid, video_second_per_grid=torch.tensor([1.0]))
    with torch.no_grad():
        assert torch.equal(loaded(token_ids()).logits, model(token_ids()).logits)
        want = model(**video).logits
        assert torch.equal(loaded(**video).logits, want)
        assert not torch.equal(model(**dict(video, pixel_values_videos=pv * 2)).logits, want)  # the video matters


def test_distill_steps_on_the_thinker_with_lafd_on_response_tokens(tmp_path):
    """Two real trainer steps: LAFD picks text-decoder layers, the losses see response tokens only."""
    import copy

    import datasets

    from edgerazor.distill import distill
    from edgerazor.recipe import recipe_from_dict

    teacher = thinker()
    student = copy.deepcopy(teacher)
    settings = recipe_from_dict({"quant": {"scheme": "4-8-8"},
                                 "train": {"max_steps": 2, "logging_steps": 1, "save_steps": 100,
                                           "per_device_batch_size": 2, "learning_rate": 1e-3},
                                 "distill": {"alpha_task": 0.5, "alpha_feature": 1.0, "alpha_logit": 1.0}})
    edgerazor.quantize(student, settings)
    g = torch.Generator().manual_seed(4)
    rows = []
    for _ in range(4):
        ids = torch.randint(0, TEXT["vocab_size"], (12,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 6 + ids[6:]})
    vision_before = student.model.visual.blocks[0].attn.q.weight.clone()
    decoder_before = student.model.language_model.layers[0].mlp.down_proj.weight.clone()
    trainer = distill(teacher, student, datasets.Dataset.from_list(rows), settings, tmp_path / "run",
                      lambda b: {k: torch.tensor([r[k] for r in b]) for k in ("input_ids", "labels")},
                      disable_tqdm=True)
    entry = next(h for h in trainer.state.log_history if "loss" in h)
    layers = [int(x) for x in entry["lafd_layers"].split(",")]
    assert layers and all(1 <= x <= TEXT["num_hidden_layers"] for x in layers)
    assert entry["loss_feature"] > 0 and math.isfinite(entry["loss"])
    assert not torch.equal(student.model.language_model.layers[0].mlp.down_proj.weight, decoder_before)
    assert torch.equal(student.model.visual.blocks[0].attn.q.weight, vision_before)  # text rows: no vision gradient
    recomputed = 0.5 * entry["loss_task"] + entry["loss_feature"] + entry["loss_logit"]
    assert entry["loss"] == pytest.approx(recomputed, rel=1e-5)
