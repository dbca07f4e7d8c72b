"""Qwen2.5-Omni thinker students as GGUF: the text decoder (llama.cpp ``qwen2vl``, M-RoPE sections) and the
vision encoder as an mmproj file (projector ``qwen2.5o``), checked as files and run in real llama.cpp.

Files (no llama.cpp needed): tensor names and types, every quantized tensor's bytes decoding to exactly the
weights training used (Q4_0 from the codes; the Conv3d patch embedding split per frame as F32), the keys
llama.cpp reads, refusals of vision configs llama.cpp's graph cannot run, and ``edgerazor export``.

llama.cpp (skipped without a build, as tests/test_llama_cpp.py): text logits against the packed runtime
with the same three references and thresholds as Qwen3 (emulating llama.cpp's activation rounding and its
qwen2vl RMS-norm epsilon, which this llama.cpp ignores: found here and shown by an unquantized model), the
image embeddings of libmtmd against the packed runtime's vision tower on the same pixels, and text + image
through the decoder at libmtmd's M-RoPE positions against the runtime's thinker.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from transformers import (
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen3ForCausalLM,
)

import edgerazor
from edgerazor import llama_cpp as lc
from edgerazor.adapters import AdapterError
from edgerazor.cli import main
from edgerazor.demo import train_tokenizer
from edgerazor.errors import EdgeRazorError, OutputExistsError
from edgerazor.export.gguf import export_gguf, write_gguf, write_mmproj
from edgerazor.quant.modules import WeightFakeQuant
from tests.helpers import TINY_TEXT, tiny_qwen3_config

gguf = pytest.importorskip("gguf")

TEXT = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False,
            rope_scaling={"type": "default", "mrope_section": [2, 3, 3]})
#: llama.cpp's Qwen2.5-VL vision graph fixes the 112-pixel attention window (the real model's)
VISION = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
              temporal_patch_size=2, spatial_merge_size=2, in_channels=3, fullatt_block_indexes=[1, 3],
              window_size=112)
AUDIO = dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, output_dim=64,
             num_mel_bins=16, max_source_positions=50, n_window=10)
RECIPE = {"quant": {"scheme": "4-8-8"}}  # the paper's Omni student: 4-bit decoder and vision, A8, KV8
#: 12 x 16 patches (6 x 8 merged tokens): multiples of 28, inside libmtmd's pixel limits (not resized), and
#: wider than one 112-pixel window, so the windowed blocks attend within 4 windows
IMAGE_HW = (168, 224)

_BUILT = lc.find_llama_cpp()
_MTMD = lc.find_llama_cpp(("mtmd",))
_BINDINGS = lc.llama_cpp_python_available()
_REASON = (f" (cache: {lc.cache_root()}); run `python tools/build_llama_cpp.py` first (CI does, before the tests)")
needs_llama_cpp = pytest.mark.skipif(
    _BUILT is None or not _BINDINGS,
    reason=("llama.cpp is not built" if _BUILT is None else "the llama_cpp Python package is not installed") + _REASON,
)
needs_mtmd = pytest.mark.skipif(
    _MTMD is None or not _BINDINGS or importlib.util.find_spec("llama_cpp") is None,
    reason="llama.cpp's multimodal library (target mtmd) is not built" + _REASON,
)


def thinker(seed: int = 0, **vision) -> Qwen2_5OmniThinkerForConditionalGeneration:
    """A tiny random thinker with non-zero biases (transformers initialises them to zero, which would hide a
    bias written to the wrong tensor)."""
    torch.manual_seed(seed)
    config = Qwen2_5OmniThinkerConfig(text_config=TEXT, vision_config={**VISION, **vision}, audio_config=AUDIO)
    model = Qwen2_5OmniThinkerForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.05)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([TINY_TEXT], 300)  # Qwen2's pre-tokenizer, which llama.cpp implements


@pytest.fixture(scope="module")
def student():
    model = thinker()
    edgerazor.quantize(model, RECIPE)
    return model


def fake_quant_weight(model, param_name: str) -> torch.Tensor:
    """The weight the student trains and runs with (fake-quantized), flattened to rows."""
    module = model.get_submodule(param_name.rpartition(".")[0])
    wq = module.weight_quant
    assert isinstance(wq, WeightFakeQuant)
    w = module.weight.detach()
    return wq.dequantized(w.reshape(w.shape[0], -1))


def read(path):
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    return tensors, fields


def values(tensor) -> torch.Tensor:
    """A GGUF tensor's values as float32 in PyTorch order (``[rows, row length]`` for matrices), decoded by
    gguf-py's reference decoder for block types."""
    data = np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    return torch.from_numpy(data.reshape(tuple(int(d) for d in reversed(tensor.shape.tolist()))))


# ---- the files ----


def test_text_gguf_is_qwen2vl_with_rope_sections_and_exact_codes(student, tokenizer, tmp_path):
    report = write_gguf(student, tokenizer, tmp_path / "omni.gguf", quiet=True)
    tensors, fields = read(report.path)
    assert fields["general.architecture"] == "qwen2vl"
    assert fields["qwen2vl.rope.dimension_sections"] == [2, 3, 3, 0]
    assert fields["qwen2vl.rope.dimension_count"] == 16 and fields["qwen2vl.rope.freq_base"] == 1e6
    assert fields["qwen2vl.vocab_size"] == 320 and fields["qwen2vl.block_count"] == 2
    # the text decoder only: encoders are elsewhere, and the report says where
    assert not any(name.startswith(("v.", "a.", "mm.")) for name in tensors)
    assert len(tensors) == 3 + 2 * 12  # token_embd, output_norm, output + per block 7 matrices, 3 biases, 2 norms
    assert any("model.visual.* are not in this file: they go to the mmproj" in n for n in report.notes)
    assert any("model.audio_tower.* are not in this file: not written" in n for n in report.notes)
    assert any("layer_norm_rms_epsilon" in n for n in report.notes)
    assert {t.ggml_type for t in report.tensors if len(t.shape) == 2} == {"Q4_0"}
    for t in report.tensors:
        got = values(tensors[t.name])
        want = (fake_quant_weight(student, t.source) if t.ggml_type == "Q4_0"
                else dict(student.named_parameters())[t.source].detach().float())
        assert torch.equal(got, want.reshape(got.shape)), t.name


def test_mmproj_holds_the_vision_encoder_as_llama_cpp_reads_it(student, tmp_path):
    report = write_mmproj(student, tmp_path / "mmproj-omni.gguf", quiet=True)
    tensors, fields = read(report.path)
    assert fields["general.architecture"] == "clip" and fields["general.type"] == "mmproj"
    assert fields["clip.projector_type"] == "qwen2.5o"
    assert fields["clip.has_vision_encoder"] is True and fields["clip.has_audio_encoder"] is False
    assert fields["clip.vision.n_wa_pattern"] == 2  # full attention in blocks 1 and 3
    assert fields["clip.vision.projection_dim"] == 64 and fields["clip.vision.block_count"] == 4
    assert fields["clip.vision.embedding_length"] == 32 and fields["clip.vision.feed_forward_length"] == 64
    assert fields["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(1e-6)
    assert fields["clip.vision.image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    vision = [n for n, _ in student.named_parameters() if n.startswith("model.visual.")]
    assert sorted(t.source for t in report.tensors) == sorted(vision + ["model.visual.patch_embed.proj.weight"])
    assert {"mm.0.weight", "mm.2.weight", "v.post_ln.weight", "v.blk.3.ffn_gate.weight"} <= set(tensors)
    assert not any(name.startswith("a.") for name in tensors)  # no audio tensors
    # the Conv3d kernel [32, 3, 2, 14, 14], quantized per output channel over 1176 (zero-padded to 1184),
    # becomes one exact F32 Conv2d kernel per frame
    kernel = fake_quant_weight(student, "model.visual.patch_embed.proj.weight").reshape(32, 3, 2, 14, 14)
    for frame, name in enumerate(("v.patch_embd.weight", "v.patch_embd.weight.1")):
        assert report.types[name] == "F32"
        assert torch.equal(values(tensors[name]), kernel[:, :, frame]), name
    assert any("Conv3d kernel" in n and "exact" in n for n in report.notes)
    assert any("audio encoder" in n for n in report.notes)
    for t in report.tensors:
        if t.ggml_type == "Q4_0":
            assert torch.equal(values(tensors[t.name]), fake_quant_weight(student, t.source)), t.name
    assert {t.ggml_type for t in report.tensors if len(t.shape) == 2} == {"Q4_0"}


def test_strict_refuses_the_f32_patch_embedding(student, tmp_path):
    with pytest.raises(EdgeRazorError, match=r"strict GGUF export refuses tensor 'v.patch_embd.weight'.*Conv3d"):
        write_mmproj(student, tmp_path / "m.gguf", strict=True, quiet=True)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("vision, match", [
    ({"window_size": 56}, r"vision_config.window_size = 112, this model has 56"),
    ({"fullatt_block_indexes": [1, 2]}, r"fullatt_block_indexes = \[1, 2\] over 4 blocks is not such a pattern"),
])
def test_vision_configs_llama_cpp_cannot_run_are_refused_before_writing(tokenizer, tmp_path, vision, match):
    model = thinker(**vision)
    edgerazor.quantize(model, RECIPE)
    with pytest.raises(AdapterError, match=match + r".*--format packed"):
        export_gguf(model, tmp_path / "omni.gguf", tokenizer=tokenizer)
    assert not any(tmp_path.iterdir())


def test_no_mmproj_for_a_text_model(tokenizer, tmp_path):
    model = Qwen3ForCausalLM(tiny_qwen3_config(vocab_size=320))
    edgerazor.quantize(model, {"quant": {"scheme": "4-8-8", "weight": {"group_size": 32}}})
    with pytest.raises(EdgeRazorError, match=r"no mmproj for this model \(model_type 'qwen3', adapter 'qwen3'\)"):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer, mmproj=tmp_path / "mmproj.gguf")
    assert not any(tmp_path.iterdir())


def test_export_writes_both_files_and_never_half_an_export(student, tokenizer, tmp_path):
    out = tmp_path / "out" / "omni.gguf"
    assert export_gguf(student, out, tokenizer=tokenizer) == out
    assert sorted(p.name for p in out.parent.iterdir()) == ["mmproj-omni.gguf", "omni.gguf"]
    # an occupied mmproj target is refused before either file is touched
    other = tmp_path / "other"
    other.mkdir()
    (other / "mmproj-omni.gguf").write_text("mine")
    with pytest.raises(OutputExistsError, match="mmproj-omni.gguf already exists"):
        export_gguf(student, other / "omni.gguf", tokenizer=tokenizer)
    assert sorted(p.name for p in other.iterdir()) == ["mmproj-omni.gguf"]
    assert (other / "mmproj-omni.gguf").read_text() == "mine"
    # a text model that fails after the mmproj was written takes the new mmproj with it
    with pytest.raises(EdgeRazorError, match="type 'q8_0' is not one of"):
        export_gguf(student, tmp_path / "bad" / "omni.gguf", tokenizer=tokenizer, type="q8_0")
    assert not (tmp_path / "bad" / "mmproj-omni.gguf").exists() and not (tmp_path / "bad" / "omni.gguf").exists()
    # --overwrite replaces both previous exports
    before = (out.parent / "mmproj-omni.gguf").stat().st_ino
    export_gguf(student, out, tokenizer=tokenizer, overwrite=True)
    assert (out.parent / "mmproj-omni.gguf").stat().st_ino != before


def test_cli_export_writes_text_and_mmproj(student, tokenizer, tmp_path, capsys):
    folder = tmp_path / "student"
    student.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert main(["export", str(folder), "--format", "gguf", "--out", str(tmp_path / "a" / "model.gguf")]) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["mmproj-model.gguf", "model.gguf"]
    mmproj = tmp_path / "vision" / "omni-vision.gguf"
    assert main(["export", str(folder), "--format", "gguf", "--out", str(tmp_path / "b.gguf"),
                 "--mmproj", str(mmproj)]) == 0
    assert mmproj.is_file() and (tmp_path / "b.gguf").is_file()
    out = capsys.readouterr().out
    assert f"wrote {mmproj} (mmproj, projector qwen2.5o)" in out.replace("\n", "")
    assert main(["export", str(folder), "--format", "gguf", "--out", str(tmp_path / "c.gguf"),
                 "--mmproj", str(mmproj)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgerazor: error: ") and "omni-vision.gguf already exists" in err[0]
    assert not (tmp_path / "c.gguf").exists()


def test_rotary_sections_must_cover_half_the_head(tokenizer, tmp_path):
    """llama.cpp reads four sections of rotary pairs; a config whose mrope_section does not add up to
    head_dim / 2 is refused rather than written with positions llama.cpp would misread."""
    from edgerazor.export.gguf.architecture import mrope_sections

    assert mrope_sections(thinker_config_with(mrope=[2, 3, 3]).get_text_config(), 16) == [2, 3, 3, 0]
    model = Qwen2_5OmniThinkerForConditionalGeneration(thinker_config_with(mrope=[2, 2, 2])).eval()
    edgerazor.quantize(model, RECIPE)
    with pytest.raises(EdgeRazorError, match=r"mrope_section \[2, 2, 2\] must .* adding up to head_dim / 2 = 8"):
        write_gguf(model, tokenizer, tmp_path / "m.gguf", quiet=True)
    assert not any(tmp_path.iterdir())


def thinker_config_with(mrope: list[int]) -> Qwen2_5OmniThinkerConfig:
    text = dict(TEXT, rope_scaling={"type": "default", "mrope_section": mrope})
    return Qwen2_5OmniThinkerConfig(text_config=text, vision_config=VISION, audio_config=AUDIO)


def test_the_published_7b_thinker_maps_completely():
    """The real shape (on the meta device, no weights): every text parameter has a qwen2vl name, the rotary
    sections are [16, 24, 24, 0] and the vision encoder passes llama.cpp's checks into a complete mmproj."""
    from edgerazor.adapters import resolve_adapter
    from edgerazor.export.gguf.architecture import mrope_sections
    from edgerazor.shapes import resolve_model

    config, _ = resolve_model("qwen2.5-omni-7b-thinker")
    adapter = resolve_adapter(config.model_type)
    model = adapter.from_config(config)
    names = adapter.gguf_tensor_names(model.config)
    params = [n for n, _ in model.named_parameters()]
    text = [n for n in params if not n.startswith(tuple(adapter.gguf_outside_text(model.config)))]
    assert text and all(names.get_name(n, try_suffixes=(".weight", ".bias")) for n in text)
    assert adapter.gguf_architecture(model.config) == "qwen2vl"
    assert mrope_sections(model.config.get_text_config(), 128) == [16, 24, 24, 0]
    spec = adapter.gguf_mmproj(model)
    vision = [n for n in params if n.startswith("model.visual.")]
    assert sorted({t.source for t in spec.tensors}) == sorted(vision)
    assert len(spec.tensors) == len(vision) + 1  # the patch embedding's two frames
    assert len({t.name for t in spec.tensors}) == len(spec.tensors)


# ---- in llama.cpp ----


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_qwen2vl_ignores_the_rms_epsilon_and_otherwise_equals_transformers(tokenizer, tmp_path):
    """An unquantized thinker written as F32: llama.cpp's qwen2vl logits equal transformers' once its RMS
    norms use epsilon 0 (this llama.cpp never reads the key), and differ measurably with the model's 1e-6."""
    from edgerazor.llama_cpp.agreement import emulate_llama_cpp_norms

    model = thinker()
    ids = tokenizer.encode(TINY_TEXT, add_special_tokens=False)[:40]
    report = write_gguf(model, tokenizer, tmp_path / "f32.gguf", quiet=True)
    assert {t.ggml_type for t in report.tensors} == {"F32"}
    got = lc.llama_cpp_logits(report.path, ids)
    x = torch.tensor([ids])
    with torch.no_grad():
        as_configured = model(x).logits[0].double().numpy()
        assert emulate_llama_cpp_norms(model, report) == 2 * 2 + 1
        eps_zero = model(x).logits[0].double().numpy()
    off, exact = np.abs(got - as_configured).max(), np.abs(got - eps_zero).max()
    print(f"[llama.cpp qwen2vl, F32] vs transformers: eps 1e-6 {off:.2e}, eps 0 {exact:.2e} "
          f"(logit max {np.abs(eps_zero).max():.2f})")
    assert exact < 2e-5 and off > 20 * exact


@pytest.mark.slow
@needs_llama_cpp
def test_text_logits_match_packed_runtime(student, tokenizer, tmp_path):
    """Text only, so the three M-RoPE positions are equal: llama.cpp's qwen2vl graph must agree with the packed
    runtime as Qwen3 does (tests/test_llama_cpp.py's thresholds)."""
    from tests.test_llama_cpp import check, run_both

    ids = tokenizer.encode(TINY_TEXT, add_special_tokens=False)[:200]
    result = run_both(student, tokenizer, ids, tmp_path / "omni", kv_types=("f32", "f16"))
    assert result.report.arch == "qwen2vl"
    check(result)


@pytest.mark.slow
@needs_mtmd
def test_vision_embeddings_match_packed_runtime(student, tokenizer, tmp_path):
    """libmtmd encodes an image with our mmproj; the packed runtime's vision tower encodes the same pixels
    (normalised as libmtmd does, frame repeated as the processor does). Emulating llama.cpp's Q8_0 rounding
    of the Q4_0 matmuls' inputs leaves float32 summation order and ggml's tanh-GELU table."""
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    from edgerazor.llama_cpp.agreement import compare_vision
    from tests.test_llama_cpp import one_torch_thread

    rng = np.random.default_rng(0)
    h, w = IMAGE_HW
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([(xx * 255 // w), (yy * 255 // h), (xx + yy) % 256], -1).astype(np.int64)
    image = np.clip(image + rng.integers(-40, 40, image.shape), 0, 255).astype(np.uint8)
    with one_torch_thread():
        result = compare_vision(student, tokenizer, image, tmp_path / "vision", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    assert result.grid == (1, 12, 16)
    packed, a16, emulated = (result.diffs[k] for k in ("packed", "A16", "emulated"))
    print(f"[llama.cpp mtmd vs packed vision tower] {result.grid}: packed {packed}; emulated {emulated}")
    # measured: emulated mean |diff| 1e-6 vs 1.9e-4 unemulated, relative max 1.0e-3, min cosine 0.999999
    assert emulated.mean_abs <= 0.05 * a16.mean_abs, (emulated, a16)
    assert emulated.relative < 5e-3 and emulated.min_cosine > 0.99999, emulated
    assert packed.relative < 2e-2 and packed.min_cosine > 0.9999, packed


MARKERS = ("<|vision_start|>", "<|vision_end|>", "<|IMAGE|>")  # libmtmd's Qwen2.5-VL markers, and a pad token


def noise_image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (*IMAGE_HW, 3)).astype(np.uint8)


@pytest.mark.slow
@needs_mtmd
@pytest.mark.parametrize("quantized", [False, True], ids=["f32", "w4a8"])
def test_text_and_image_through_the_decoder_match_the_runtime(tmp_path, quantized):
    """The whole multimodal path in llama.cpp: libmtmd encodes the image, its helper decodes text, image
    embeddings at their M-RoPE positions (temporal, row, column) and text; the last token's logits against
    the runtime's thinker on the same token ids and pixels. Unquantized (F32) the two agree to float32
    summation order once llama.cpp's own arithmetic is emulated, and plain 1-D positions do not: the rotary
    sections and image positions are llama.cpp's. The W4A8 student agrees as the text-only check does."""
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    from edgerazor.data.video import VideoSpec, patchify
    from edgerazor.export.packed import export_packed
    from edgerazor.llama_cpp.agreement import (
        clip_pixels, emulate_llama_cpp_rounding, emulate_llama_cpp_vision_rounding, set_own_rounding,
    )
    from edgerazor.llama_cpp.multimodal import mtmd_prompt_logits
    from edgerazor.runtime.loading import load
    from tests.test_llama_cpp import one_torch_thread

    tok = train_tokenizer([TINY_TEXT], 300)
    tok.add_special_tokens({"additional_special_tokens": list(MARKERS)})
    start, end, pad = tok.convert_tokens_to_ids(list(MARKERS))
    torch.manual_seed(0)
    config = Qwen2_5OmniThinkerConfig(text_config=TEXT, vision_config=VISION, audio_config=AUDIO,
                                      vision_start_token_id=start, vision_end_token_id=end, image_token_id=pad)
    model = Qwen2_5OmniThinkerForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.05)
    runtime = model
    if quantized:
        edgerazor.quantize(model, RECIPE)
        export_packed(model, tok, tmp_path / "packed")
        runtime, _ = load(tmp_path / "packed")
    text = write_gguf(model, tok, tmp_path / "omni.gguf", quiet=True)
    mmproj = write_mmproj(model, tmp_path / "mmproj-omni.gguf", quiet=True)
    image = noise_image()
    before, n_image, after, got = mtmd_prompt_logits(text.path, mmproj.path, image, "First Citizen: ",
                                                     " hear me speak. All: Speak")
    assert before[-1] == start and after[0] == end and n_image == 48
    frame = clip_pixels(image, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    pv, grid = patchify(frame.unsqueeze(0).expand(2, *frame.shape), VideoSpec())
    ids = torch.tensor([before + [pad] * n_image + after])
    inputs = dict(input_ids=ids, pixel_values=pv, image_grid_thw=torch.tensor([grid]), attention_mask=torch.ones_like(ids))
    with one_torch_thread(), torch.no_grad():
        set_own_rounding(runtime, False)
        plain = runtime(**inputs).logits[0, -1].double().numpy()
        emulate_llama_cpp_rounding(runtime, text)
        emulate_llama_cpp_vision_rounding(runtime, mmproj)
        emulated = runtime(**inputs).logits[0, -1].double().numpy()
        one_d = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)
        emulated_1d = runtime(**inputs, position_ids=one_d).logits[0, -1].double().numpy()
    d_plain, d_emulated, d_1d = (float(np.abs(got - r).max()) for r in (plain, emulated, emulated_1d))
    print(f"[llama.cpp text+image, {'W4A8' if quantized else 'F32'}] last-token logits max|diff|: unemulated "
          f"{d_plain:.2e}, emulated {d_emulated:.2e}, emulated with 1-D positions {d_1d:.2e}")
    assert got.argmax() == emulated.argmax()
    if quantized:  # measured 2.1e-3 (llama.cpp's Q8_0 rounding flips carry through 58 positions)
        assert d_emulated < 1e-2
    else:  # measured 8e-7 vs 1.7e-3 with 1-D positions
        assert d_emulated < 1e-5 and d_1d > 100 * d_emulated


def test_mtmd_is_a_library_target_of_the_build(tmp_path):
    """``mtmd`` builds libmtmd, not a tool: a cache entry has it when the shared library is there."""
    import json

    from edgerazor.llama_cpp import build as lc_build

    assert "mtmd" in lc.DEFAULT_TARGETS
    key, ident = lc_build._cache_key(lc.LLAMA_CPP_PYTHON_VERSION, False)
    bin_dir = tmp_path / key / "bin"
    bin_dir.mkdir(parents=True)
    for lib in ("llama", "ggml", "ggml-base", "ggml-cpu"):
        (bin_dir / lc_build._shared_lib_name(lib)).write_bytes(b"")
    (tmp_path / key / "manifest.json").write_text(json.dumps({**ident, "targets": ["mtmd"]}))
    assert lc.find_llama_cpp(("mtmd",), cache_dir=tmp_path) is None  # listed, but no libmtmd
    (bin_dir / lc_build._shared_lib_name("mtmd")).write_bytes(b"")
    assert lc.find_llama_cpp(("mtmd",), cache_dir=tmp_path).targets == ("mtmd",)
