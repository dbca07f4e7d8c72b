"""GGUF export from integer codes: every tensor read back with gguf-py equals our weights bit for bit.

The expected values are computed here independently of the writer: tensor names from a hand-written
HF -> llama.cpp table, weights from ``weight_quant.dequantized`` (exactly what the fake-quant
forward uses), llama's q/k rotary permutation re-implemented from ``convert_hf_to_gguf.py``, and the
file decoded with gguf-py's own reference ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")  # the "export" extra

from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, Qwen3ForCausalLM

import edgerazor
from edgerazor.errors import EdgeRazorError
from edgerazor.export.gguf import LLAMA3_REGEX, QWEN2_REGEX, detect_pre_tokenizer, encode, write_gguf
from edgerazor.plugin_manager import get_plugins
from edgerazor.quant.modules import QuantEmbedding, QuantLinear
from tests.helpers import tiny_qwen3_config
from tests.tokenizer_utils import CHATML_TEMPLATE, train_tiny_tokenizer

TEXTS = ["Hello world, it's 2024!", "The quick brown fox jumps over 123 lazy dogs.\n", "ternary weights are fun"] * 4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def recipe(rho: float = 0.125, group_size: int = 64, **weight) -> dict:
    return {"quant": {"weight": {"rho": rho, "group_size": group_size, **weight},
                      "activation": {"bits": 16}, "kv_cache": {"bits": 16}}}


def bpe_tokenizer(pre, ignore_merges=False, specials=SPECIALS, bos=None, vocab_size=300):
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer=trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=specials[0] if bos is None else specials[1],
                                   bos_token=bos, chat_template=CHATML_TEMPLATE)


def qwen2_tokenizer():
    """Byte-level BPE with Qwen2's pre-tokenizer: regex Split, then ByteLevel(use_regex=False)."""
    return bpe_tokenizer(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]))


def llama3_tokenizer():
    bos = "<|begin_of_text|>"
    return bpe_tokenizer(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]), ignore_merges=True, specials=[bos, "<|end_of_text|>"], bos=bos)


# ------------------------------------------------------------------------------------------------
# Independent expectations
# ------------------------------------------------------------------------------------------------

HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def weight_of(module) -> np.ndarray:
    if isinstance(module, (QuantLinear, QuantEmbedding)):
        return module.weight_quant.dequantized(module.weight).numpy().astype(np.float32)
    return module.weight.detach().float().numpy()


def expected_tensors(model) -> dict[str, np.ndarray]:
    cfg = model.config
    llama = cfg.model_type == "llama"
    out = {"token_embd.weight": weight_of(model.model.embed_tokens),
           "output_norm.weight": weight_of(model.model.norm)}
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        out["output.weight"] = weight_of(model.lm_head)
    for i, layer in enumerate(model.model.layers):
        for hf, gg in HF_TO_GGUF.items():
            try:
                module = layer.get_submodule(hf)
            except AttributeError:
                continue
            w = weight_of(module)
            if llama and hf == "self_attn.q_proj":
                w = permute(w, cfg.num_attention_heads)
            if llama and hf == "self_attn.k_proj":
                w = permute(w, cfg.num_key_value_heads)
            out[f"blk.{i}.{gg}.weight"] = w
    return out


def read(path):
    reader = GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


def field(reader, key):
    return reader.fields[key].contents()


def assert_bit_exact(model, path) -> dict[str, str]:
    reader, tensors = read(path)
    expected = expected_tensors(model)
    assert set(tensors) == set(expected)
    for name, t in tensors.items():
        got = gguf_dequantize(t.data, t.tensor_type).reshape(expected[name].shape)
        assert got.dtype == np.float32
        assert np.array_equal(got, expected[name]), f"{name} ({t.tensor_type.name}) differs"
    return {name: t.tensor_type.name for name, t in tensors.items()}


def make_qwen3(**overrides) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    return Qwen3ForCausalLM(tiny_qwen3_config(**overrides)).eval()


def qwen3_256(**overrides) -> Qwen3ForCausalLM:
    """hidden 256 so that G = 256 divides every input dimension (TQ blocks are 256 wide)."""
    kw = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    kw.update(overrides)
    return make_qwen3(**kw)


@pytest.fixture(scope="module")
def qwen_tok():
    return qwen2_tokenizer()


# ------------------------------------------------------------------------------------------------
# Encoders against gguf-py's reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ggml_type,lo,hi,group", [
    ("Q4_0", -8, 7, 32), ("Q4_0", -7, 7, 96), ("Q8_0", -127, 127, 64), ("TQ2_0", -1, 1, 256), ("TQ1_0", -1, 1, 512),
])
def test_encoders_match_gguf_reference(ggml_type, lo, hi, group):
    rng = np.random.default_rng(1)
    rows, cols = 5, 1536
    codes = rng.integers(lo, hi + 1, size=(rows, cols))
    scales = rng.uniform(1e-3, 3.0, size=(rows, cols // group)).astype(np.float16).astype(np.float32)
    raw = encode(ggml_type, codes, scales, group)
    qtype = getattr(GGMLQuantizationType, ggml_type)
    expected = (codes.reshape(rows, -1, group) * scales[..., None]).reshape(rows, cols).astype(np.float32)
    assert np.array_equal(gguf_dequantize(raw, qtype).reshape(rows, cols), expected)
    if ggml_type.startswith("TQ"):
        # with d = 1 our bytes are exactly gguf-py's own quantizer output for the codes as floats
        ones = encode(ggml_type, codes, np.ones_like(scales), group)
        assert np.array_equal(ones, gguf_quantize(codes.astype(np.float32), qtype))


def test_encoders_refuse_inexact_inputs():
    codes = np.zeros((2, 64), dtype=np.int8)
    with pytest.raises(ValueError, match="multiples of 32"):
        encode("Q4_0", np.zeros((2, 96), np.int8), np.ones((2, 2), np.float32), 48)  # G=48: a block spans 2 groups
    with pytest.raises(ValueError, match="fp16"):
        encode("Q4_0", codes, np.full((2, 1), 0.1, np.float32), 64)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        encode("TQ2_0", np.full((1, 256), 2), np.ones((1, 1), np.float32), 256)


# ------------------------------------------------------------------------------------------------
# Whole models
# ------------------------------------------------------------------------------------------------


def test_qwen3_mixed_auto_is_exact_q4_0_with_notes_and_metadata(tmp_path, qwen_tok, capsys):
    model = make_qwen3()
    edgerazor.quantize(model, recipe(0.125, 64))  # 1.88-bit: 4-bit and ternary rows in every layer
    path = tmp_path / "m.gguf"
    report = write_gguf(model, qwen_tok, path)
    types = assert_bit_exact(model, path)
    assert {types[n] for n in types if n.startswith("blk.") and not n.endswith("norm.weight")} == {"Q4_0"}
    assert types["token_embd.weight"] == "Q4_0" and types["output_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied embeddings: llama.cpp reuses token_embd
    assert not list(tmp_path.glob("*.tmp"))
    # the note names the tensor and the size cost; the console gets one summary table instead
    mixed = [n for n in report.notes if "blk.0.attn_q.weight" in n]
    assert mixed and "mixes precisions" in mixed[0] and "4.500 bits/weight" in mixed[0]
    fallbacks = [t for t in report.tensors if t.fallback]
    summary = report.fallback_summary()
    assert sum(r["tensors"] for r in summary) == len(fallbacks) == len([n for n in report.notes if "losslessly" in n])
    own = sum(t.theoretical_bits * math.prod(t.shape) / 8 for t in fallbacks)
    assert sum(r["extra_bytes"] for r in summary) == pytest.approx(sum(t.n_bytes for t in fallbacks) - own, abs=len(summary))
    assert {r["ggml_type"] for r in summary} == {"Q4_0"} and all(r["bits_per_weight"] == 4.5 for r in summary)
    out = capsys.readouterr().out
    assert "note: blk." not in out and out.count("GGUF lossless fallbacks") == 1
    assert f"{len(fallbacks)} tensors" in out
    entry = {t.name: t for t in report.tensors}["blk.0.attn_q.weight"]
    assert entry.fallback and entry.bits_per_weight == 4.5
    assert entry.theoretical_bits == pytest.approx(0.125 * 4 + 0.875 * 1.58 + 16 / 64)
    assert report.total_bytes == sum(t.n_bytes for t in report.tensors) < report.file_bytes == path.stat().st_size

    reader, _ = read(path)
    cfg = model.config
    assert field(reader, "general.architecture") == "qwen3"
    assert field(reader, "qwen3.block_count") == cfg.num_hidden_layers
    assert field(reader, "qwen3.embedding_length") == cfg.hidden_size
    assert field(reader, "qwen3.attention.head_count_kv") == cfg.num_key_value_heads
    assert field(reader, "qwen3.attention.key_length") == cfg.head_dim
    assert field(reader, "qwen3.rope.freq_base") == 10000.0
    assert field(reader, "general.file_type") == 2  # MOSTLY_Q4_0
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "qwen2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size and tokens[qwen_tok.eos_token_id] == "<|endoftext|>"
    assert tokens[-1] == f"[PAD{cfg.vocab_size - 1}]"  # embedding rows past the tokenizer
    assert field(reader, "tokenizer.ggml.token_type")[qwen_tok.eos_token_id] == 3  # CONTROL
    assert len(field(reader, "tokenizer.ggml.merges")) > 0
    assert field(reader, "tokenizer.ggml.eos_token_id") == qwen_tok.eos_token_id
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert field(reader, "tokenizer.chat_template") == CHATML_TEMPLATE


def test_strict_refuses_a_mixed_layer_and_leaves_the_old_file(tmp_path, qwen_tok):
    model = make_qwen3()
    edgerazor.quantize(model, recipe(0.125, 64))
    path = tmp_path / "m.gguf"
    write_gguf(model, qwen_tok, path, quiet=True)
    old = path.read_bytes()
    with pytest.raises(EdgeRazorError, match=r"strict GGUF export refuses tensor 'blk\.0\.attn_q\.weight'.*mixes"):
        write_gguf(model, qwen_tok, path, strict=True, overwrite=True)
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


@pytest.mark.parametrize("requested,ternary_type", [("auto", "TQ2_0"), ("tq1_0", "TQ1_0"), ("q4_0", "Q4_0")])
def test_qwen3_ternary_g256_tq_types_exact(tmp_path, qwen_tok, requested, ternary_type):
    model = qwen3_256(tie_word_embeddings=False)
    edgerazor.quantize(model, recipe(0.0, 256))
    path = tmp_path / "t.gguf"
    report = write_gguf(model, qwen_tok, path, type=requested, strict=True)
    types = assert_bit_exact(model, path)
    linear = {types[n] for n in types if n.startswith("blk.") and not n.endswith("norm.weight")}
    assert linear == {ternary_type}
    assert types["token_embd.weight"] == "Q4_0" and types["output.weight"] == "Q4_0"  # int4 tables
    assert report.notes == []
    q = {t.name: t for t in report.tensors}["blk.0.attn_q.weight"]
    assert q.bits_per_weight == {"TQ2_0": 2.0625, "TQ1_0": 1.6875, "Q4_0": 4.5}[ternary_type]


def test_per_tensor_allocation_exports_pure_tensors_strictly(tmp_path, qwen_tok):
    model = qwen3_256(num_hidden_layers=4)
    report_q = edgerazor.quantize(model, recipe(0.5, 256, allocation="per_tensor"))
    path = tmp_path / "p.gguf"
    report = write_gguf(model, qwen_tok, path, strict=True)  # no mixed tensor: nothing to refuse
    types = assert_bit_exact(model, path)
    decoder = {n: t for n, t in types.items() if n.startswith("blk.") and not n.endswith("norm.weight")}
    assert set(decoder.values()) == {"Q4_0", "TQ2_0"}
    for layer in report_q.layers:
        if layer.kind == "linear":
            assert layer.high_fraction in (0.0, 1.0)
    assert report.bits_per_weight() < 4.5


def test_llama_permutation_exact_and_g64_ternary_falls_back_only_when_not_asked_for(tmp_path):
    from tests.helpers import tiny_llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()  # 6 heads, 2 kv heads, head_dim 32, hidden 192
    edgerazor.quantize(model, recipe(0.0, 64))  # MobileLLM-style G=64: TQ blocks (256) cannot hold it
    tok = llama3_tokenizer()
    path = tmp_path / "l.gguf"
    # an explicit TQ2_0 that a tensor cannot take is refused, naming the tensor; nothing is written
    with pytest.raises(EdgeRazorError, match=r"GGUF type 'tq2_0' cannot hold tensor 'blk\.0\.attn_q\.weight'.*G=64"):
        write_gguf(model, tok, path, type="tq2_0")
    assert not list(tmp_path.iterdir())
    report = write_gguf(model, tok, path)  # auto: the lossless fallback, with a note
    types = assert_bit_exact(model, path)  # q/k compared after llama.cpp's rotary permutation
    assert types["blk.0.attn_q.weight"] == "Q4_0"
    assert any("is not exact in TQ2_0" in n and "G=64" in n for n in report.notes)
    reader, _ = read(path)
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "llama.rope.dimension_count") == 32
    assert field(reader, "tokenizer.ggml.pre") == "llama-bpe"
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    assert field(reader, "tokenizer.ggml.bos_token_id") == tok.bos_token_id
    with pytest.raises(EdgeRazorError, match=r"strict GGUF export refuses tensor 'blk\.0\.attn_q\.weight'"):
        write_gguf(model, tok, tmp_path / "s.gguf", strict=True)
    # the permutation really moves rows (a no-op permutation would make the check above vacuous)
    q = model.model.layers[0].self_attn.q_proj
    w = q.weight_quant.dequantized(q.weight).numpy()
    assert not np.array_equal(permute(w, 6), w)


def test_unquantized_layers_are_f32_with_a_note(tmp_path, qwen_tok):
    model = make_qwen3()
    spec = recipe(1.0, 64)
    spec["quant"]["exclude"] = ["*.mlp.down_proj"]
    edgerazor.quantize(model, spec)
    path = tmp_path / "x.gguf"
    report = write_gguf(model, qwen_tok, path, strict=True)
    types = assert_bit_exact(model, path)
    assert types["blk.0.ffn_down.weight"] == "F32" and types["blk.0.ffn_up.weight"] == "Q4_0"
    assert any("blk.0.ffn_down.weight" in n and "not quantized" in n for n in report.notes)


@pytest.mark.parametrize("float_type, ggml", [("bf16", "BF16"), ("f16", "F16")])
def test_unquantized_model_as_a_16_bit_baseline(tmp_path, qwen_tok, float_type, ggml):
    """The BF16/F16 baseline of the deployment benchmark: a plain model, matrices rounded once."""
    model = make_qwen3()
    path = tmp_path / "base.gguf"
    write_gguf(model, qwen_tok, path, float_type=float_type, quiet=True)
    _, tensors = read(path)
    t = tensors["blk.0.ffn_up.weight"]
    assert t.tensor_type.name == ggml
    torch_type = torch.bfloat16 if float_type == "bf16" else torch.float16
    expected = model.model.layers[0].mlp.up_proj.weight.detach().to(torch_type).float().numpy()
    assert np.array_equal(gguf_dequantize(t.data, t.tensor_type).reshape(expected.shape), expected)
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    with pytest.raises(EdgeRazorError, match="float type 'fp8'"):
        write_gguf(model, qwen_tok, tmp_path / "x.gguf", float_type="fp8")


# ------------------------------------------------------------------------------------------------
# Tokenizer pre-tokenizer detection
# ------------------------------------------------------------------------------------------------


def test_pre_tokenizer_detection_and_refusals(tmp_path):
    assert detect_pre_tokenizer(qwen2_tokenizer()) == "qwen2"
    assert detect_pre_tokenizer(llama3_tokenizer()) == "llama-bpe"
    assert detect_pre_tokenizer(train_tiny_tokenizer(TEXTS, vocab_size=300)) == "gpt-2"
    unknown = bpe_tokenizer(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{L}+|\p{N}+|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]))
    with pytest.raises(EdgeRazorError, match="unknown pre-tokenizer.*refusing to guess"):
        detect_pre_tokenizer(unknown)
    # Qwen2's regex but ignore_merges=True: llama.cpp's qwen2 would merge differently
    mismatched = bpe_tokenizer(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]), ignore_merges=True)
    with pytest.raises(EdgeRazorError, match="ignore_merges"):
        detect_pre_tokenizer(mismatched)
    model = make_qwen3()
    edgerazor.quantize(model, recipe(1.0, 64))
    path = tmp_path / "u.gguf"
    with pytest.raises(EdgeRazorError, match="unknown pre-tokenizer"):
        write_gguf(model, unknown, path)
    assert not path.exists() and not list(tmp_path.glob("*.tmp"))


def test_nfc_normalizer_is_kept_with_a_note(tmp_path):
    """Qwen2's tokenizer (and the demo's) NFC-normalizes; llama.cpp does not, so the export says so."""
    nfc = qwen2_tokenizer()
    nfc.backend_tokenizer.normalizer = normalizers.NFC()
    model = make_qwen3()
    edgerazor.quantize(model, recipe(1.0, 64))
    report = write_gguf(model, nfc, tmp_path / "n.gguf", quiet=True)
    assert [n for n in report.notes if "NFC normalization and llama.cpp does not" in n]
    assert not [n for n in write_gguf(model, qwen2_tokenizer(), tmp_path / "p.gguf", quiet=True).notes if "NFC" in n]
    nfkc = qwen2_tokenizer()
    nfkc.backend_tokenizer.normalizer = normalizers.NFKC()
    with pytest.raises(EdgeRazorError, match="normalizer 'NFKC' has no llama.cpp equivalent"):
        write_gguf(model, nfkc, tmp_path / "k.gguf")


# ------------------------------------------------------------------------------------------------
# per_tensor allocation
# ------------------------------------------------------------------------------------------------


def _realised(report) -> float:
    layers = [r for r in report.layers if r.kind == "linear"]
    return sum(r.params * r.high_fraction for r in layers) / sum(r.params for r in layers)


@pytest.mark.parametrize("layers,rho", [(4, 0.25), (4, 0.5), (8, 0.125), (3, 0.25)])
def test_per_tensor_allocation_realised_fraction(layers, rho):
    model = make_qwen3(num_hidden_layers=layers)
    report = edgerazor.quantize(model, recipe(rho, 64, allocation="per_tensor"))
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.weight_quant.low is not None:
            mask = m.weight_quant.precision_mask
            assert bool(mask.all()) or not bool(mask.any())  # whole tensors only
    realised = _realised(report)
    if (layers * rho).is_integer():
        assert realised == pytest.approx(rho, abs=1e-12)
    assert abs(realised - rho) < 1 / layers


def test_per_tensor_rule_and_patterns():
    fn = get_plugins().get("allocations", "per_tensor")
    name = "model.layers.0.mlp.down_proj"
    assert fn(8, 0.0, layer_name=name).tolist() == [False] * 8
    assert fn(8, 1.0, layer_name=name).tolist() == [True] * 8
    # the most sensitive kind gets the first 4-bit layer at low rho; gate_proj does not
    assert bool(fn(4, 0.125, layer_name=name)[0])
    assert not bool(fn(4, 0.125, layer_name="model.layers.0.mlp.gate_proj")[0])
    # each kind is 4-bit in floor(L*rho + c) of L layers: 28 layers at rho 1/4 -> 7 each
    for kind in ("self_attn.q_proj", "mlp.down_proj", "mlp.some_new_proj"):
        n = sum(bool(fn(2, 0.25, layer_name=f"model.layers.{i}.{kind}")[0]) for i in range(28))
        assert n == 7
    pats = {"high_patterns": ["*.v_proj", "model.layers.1.*"]}
    assert fn(3, 0.0, layer_name="model.layers.0.self_attn.v_proj", **pats).all()
    assert fn(3, 1.0, layer_name="model.layers.1.mlp.up_proj", **pats).all()
    assert not fn(3, 1.0, layer_name="model.layers.0.mlp.up_proj", **pats).any()


# ------------------------------------------------------------------------------------------------
# Writing safely and reading back
# ------------------------------------------------------------------------------------------------


def test_existing_files_are_kept_unless_a_previous_export_is_replaced_on_request(tmp_path, qwen_tok):
    from edgerazor.errors import OutputExistsError
    from edgerazor.export.gguf.check import EXPORTER_KEY
    from edgerazor.version import __version__

    model = make_qwen3()
    edgerazor.quantize(model, recipe(1.0, 64))
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(b"my own file")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="mine.gguf already exists"):
            write_gguf(model, qwen_tok, mine, overwrite=overwrite, quiet=True)
    assert mine.read_bytes() == b"my own file"
    path = tmp_path / "m.gguf"
    write_gguf(model, qwen_tok, path, quiet=True)
    reader, _ = read(path)
    assert field(reader, EXPORTER_KEY) == __version__  # how --overwrite recognises its own file
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        write_gguf(model, qwen_tok, path, quiet=True)
    other = make_qwen3(num_hidden_layers=1)
    edgerazor.quantize(other, recipe(1.0, 64))
    write_gguf(other, qwen_tok, path, overwrite=True, quiet=True)
    assert field(read(path)[0], "qwen3.block_count") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "mine.gguf"]


def test_the_file_is_read_back_before_it_is_moved_into_place(tmp_path, qwen_tok, monkeypatch):
    """A file that does not hold what was planned (here: a wrong expected digest) never reaches its path."""
    from edgerazor.errors import GGUFFormatError
    from edgerazor.export.gguf import writer as writer_mod
    from edgerazor.export.gguf.check import ExpectedTensor, check_gguf, tensor_expectations

    model = make_qwen3()
    edgerazor.quantize(model, recipe(0.125, 64))
    good = tmp_path / "good.gguf"
    report = write_gguf(model, qwen_tok, good, quiet=True)
    expected = tensor_expectations(read(good)[0])
    assert {n: (t.ggml_type, t.shape, t.n_bytes) for n, t in expected.items()} == {
        t.name: (t.ggml_type, t.shape, t.n_bytes) for t in report.tensors}
    check_gguf(good, expected)
    name = "blk.0.ffn_up.weight"
    wrong_shape = {**expected, name: ExpectedTensor("Q4_0", (256, 64), expected[name].n_bytes)}
    with pytest.raises(GGUFFormatError, match=r"tensor 'blk.0.ffn_up.weight' has shape \(256, 128\), expected \(256, 64\)"):
        check_gguf(good, wrong_shape)
    monkeypatch.setattr(writer_mod, "_sha256", lambda data: "0" * 64)
    with pytest.raises(GGUFFormatError, match="differs from what was written"):
        write_gguf(model, qwen_tok, tmp_path / "bad.gguf", quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.gguf"]  # no file, no temporary left
