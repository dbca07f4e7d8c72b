"""The packed format: true bits on disk, logits equal to the fake-quant student (atol=0), bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM, Qwen3ForCausalLM

import edgerazor
from edgerazor.cli import main
from edgerazor.errors import EdgeRazorError
from edgerazor.export import packed as packed_mod
from edgerazor.export.pack import CODECS
from edgerazor.export.packed import METADATA_FILE, WEIGHTS_FILE, export_packed
from edgerazor.runtime.packed import CODECS as TORCH_CODECS
from edgerazor.runtime.packed import PackedLinear, load_packed, unpack_codes
from tests.conftest import tiny_llama_config, tiny_qwen3_config
from tests.tokenizer_utils import train_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tiny_tokenizer(["To be, or not to be, that is the question. " * 40], vocab_size=320)


def quantized(model, scheme="1.88-8-8", group=64, **quant):
    edgerazor.quantize(model, {"quant": {"scheme": scheme, "weight": {"group_size": group}, **quant}})
    return model.eval()


@pytest.mark.parametrize("n", [37, 40, 1])
def test_torch_unpack_matches_the_numpy_codecs(n):
    g = torch.Generator().manual_seed(n)
    assert set(TORCH_CODECS) == set(CODECS)
    scratch = torch.full((4096,), 99, dtype=torch.int8)  # a reused buffer with stale contents
    for codec, (pack_fn, unpack_fn, _, _) in CODECS.items():
        qmax = {"int4": 7, "int8": 127}.get(codec, 1)
        codes = torch.randint(-qmax, qmax + 1, (3, n), generator=g, dtype=torch.int8)
        packed = pack_fn(codes.numpy())
        assert np.array_equal(unpack_fn(packed, n), codes.numpy()), codec
        assert torch.equal(unpack_codes(torch.from_numpy(packed), codec, n), codes), codec
        assert torch.equal(unpack_codes(torch.from_numpy(packed), codec, n, out=scratch), codes), codec


@pytest.mark.parametrize("scheme", ["1.88-8-8", "2.79-16-16", "1.58-8-8", "4-8-16"])
def test_packed_logits_equal_fake_quant_exactly(tok, tmp_path, scheme):
    torch.manual_seed(0)
    model = quantized(Qwen3ForCausalLM(tiny_qwen3_config(vocab_size=len(tok))), scheme)
    export_packed(model, tok, tmp_path / "p")
    runtime, tokenizer = edgerazor.load(tmp_path / "p")
    assert isinstance(runtime.model.layers[0].mlp.down_proj, PackedLinear)
    assert runtime.lm_head.packed is runtime.model.embed_tokens.packed  # tied: stored and held once
    ids = torch.randint(0, len(tok), (2, 16))
    with torch.no_grad():
        assert torch.equal(runtime(ids).logits, model(ids).logits)
        a = model.generate(ids[:, :5], max_new_tokens=6, do_sample=False)
        b = runtime.generate(ids[:, :5], max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)
    assert tokenizer.get_vocab() == tok.get_vocab()
    dense, _ = edgerazor.load(tmp_path / "p", dense=True)  # dequantized once at load: the same numbers
    assert dense.model.layers[0].mlp.down_proj.packed.dense is not None
    with torch.no_grad():
        assert torch.equal(dense(ids).logits, model(ids).logits)


def test_row_dequantization_equals_the_full_weight(tok, tmp_path):
    """An embedding lookup dequantizes only the rows it needs, high and low rows mixed."""
    torch.manual_seed(0)
    model = quantized(Qwen3ForCausalLM(tiny_qwen3_config(vocab_size=len(tok))), "1.88-8-8", embedding={"quantizer": "int4"})
    export_packed(model, tok, tmp_path / "p")
    runtime, _ = load_packed(tmp_path / "p")
    weight = runtime.model.layers[0].mlp.down_proj.packed
    index = torch.tensor([5, 0, 5, weight.layout["d_out"] - 1, 17, 3])
    assert weight.precision_mask[index].any() and not weight.precision_mask[index].all()
    assert torch.equal(weight.rows(index), weight()[index])
    ids = torch.tensor([[4, 4, 9, len(tok) - 1]])
    assert torch.equal(runtime.model.embed_tokens(ids), model.model.embed_tokens(ids))
    with pytest.raises(IndexError, match="token ids"):
        runtime.model.embed_tokens(torch.tensor([[len(tok)]]))
    # gradients through the runtime (attribution) must not see the shared workspace being reused
    x = torch.randn(3, weight.layout["d_in"], requires_grad=True)
    layer, reference = runtime.model.layers[0].mlp.down_proj, model.model.layers[0].mlp.down_proj
    out = layer(x)
    with torch.no_grad():
        runtime.model.layers[1].mlp.down_proj(torch.randn(3, weight.layout["d_in"]))  # uses the workspace
    (out * torch.arange(layer.out_features)).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    (reference(x_ref) * torch.arange(layer.out_features)).sum().backward()
    assert torch.equal(x.grad, x_ref.grad)


def test_untied_llama_with_a_custom_trained_mask(tok, tmp_path):
    torch.manual_seed(1)
    model = quantized(LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok), tie_word_embeddings=False)))
    custom = torch.zeros(512, dtype=torch.bool)
    custom[[3, 100, 511]] = True
    model.model.layers[1].mlp.up_proj.weight_quant.precision_mask.copy_(custom)  # the allocation training used
    export_packed(model, tok, tmp_path / "p")
    runtime, _ = load_packed(tmp_path / "p")
    assert torch.equal(runtime.model.layers[1].mlp.up_proj.packed.precision_mask, custom)
    ids = torch.randint(0, len(tok), (1, 20))
    with torch.no_grad():
        assert torch.equal(runtime(ids).logits, model(ids).logits)


def test_true_bits_on_disk(tok, tmp_path):
    """1.88-bit rows with G=256 cost ~1.95 bits per weight on disk: 4-bit rows 4, ternary rows 1.6."""
    torch.manual_seed(0)
    cfg = tiny_qwen3_config(vocab_size=len(tok), hidden_size=512, intermediate_size=1536, head_dim=64,
                            num_attention_heads=8, num_key_value_heads=4)
    model = quantized(Qwen3ForCausalLM(cfg), group=256)
    size = export_packed(model, tok, tmp_path / "p")["size"]
    theory = 1.8825 + 16 / 256
    assert size["decoder_theory_bits_per_weight"] == pytest.approx(theory)
    assert 1.94 < size["decoder_bits_per_weight"] < 1.98  # not 4, not 16
    # overhead beyond theory: base-3 trits (1.6 vs 1.58 bits: 0.0175), one mask bit per row (0.002) and
    # the last byte of each row's trits (0.4-0.6 unused trits: ~0.008)
    assert size["decoder_bits_per_weight"] - theory < 0.03
    on_disk = (tmp_path / "p" / WEIGHTS_FILE).stat().st_size
    assert on_disk == pytest.approx(size["total_bytes"], rel=0.01)
    assert size["compression_vs_bf16"] > 4
    # the size report agrees with `edgerazor bits` (which counts 1.58 bits per trit and no mask bits)
    from edgerazor.quant import count_bits

    assert size["compression_vs_bf16"] == pytest.approx(count_bits(model).compression_ratio, rel=0.03)


def test_bad_input_is_a_clear_error(tok, tmp_path):
    torch.manual_seed(0)
    model = quantized(Qwen3ForCausalLM(tiny_qwen3_config(vocab_size=len(tok))))
    good = tmp_path / "good"
    export_packed(model, tok, good)

    def copy(name):
        import shutil

        target = tmp_path / name
        shutil.copytree(good, target)
        return target

    truncated = copy("truncated")
    data = (truncated / WEIGHTS_FILE).read_bytes()
    (truncated / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(EdgeRazorError, match="truncated or corrupted"):
        load_packed(truncated)
    with pytest.raises(EdgeRazorError, match="truncated or corrupted"):
        load_packed(truncated, verify=False)

    flipped = copy("flipped")
    data = bytearray((flipped / WEIGHTS_FILE).read_bytes())
    data[-100] ^= 0x01
    (flipped / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(EdgeRazorError, match="does not match the checksum"):
        load_packed(flipped)

    version = copy("version")
    meta = json.loads((version / METADATA_FILE).read_text())
    meta["format_version"] = 99
    (version / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(EdgeRazorError, match="format_version 99 is not supported"):
        load_packed(version)

    broken_json = copy("json")
    (broken_json / METADATA_FILE).write_text((broken_json / METADATA_FILE).read_text()[:50])
    with pytest.raises(EdgeRazorError, match="not valid JSON"):
        load_packed(broken_json)

    no_tok = copy("notok")
    for f in no_tok.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(EdgeRazorError, match="has no tokenizer"):
        load_packed(no_tok)
    with pytest.raises(EdgeRazorError, match="needs the tokenizer"):
        export_packed(model, None, tmp_path / "x")


def test_killed_export_leaves_no_half_file(tok, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = quantized(Qwen3ForCausalLM(tiny_qwen3_config(vocab_size=len(tok))))
    out = tmp_path / "out"
    export_packed(model, tok, out)
    before = (out / WEIGHTS_FILE).read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(packed_mod, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        export_packed(model, tok, out)
    assert (out / WEIGHTS_FILE).read_bytes() == before  # the previous export is untouched
    load_packed(out)


def test_cli_export_report_and_generate(tok, tmp_path, capsys):
    torch.manual_seed(0)
    model = quantized(Qwen3ForCausalLM(tiny_qwen3_config(vocab_size=len(tok))))
    run_dir = tmp_path / "run"
    model.save_pretrained(run_dir / "student")
    tok.save_pretrained(run_dir / "student")
    assert main(["export", str(run_dir), "--format", "packed", "--out", str(tmp_path / "p"), "--report"]) == 0
    out = capsys.readouterr().out
    assert "smaller than BF16" in out and "model.layers.0.mlp.down_proj" in out
    gguf_path = tmp_path / "model.gguf"
    assert main(["export", str(run_dir), "--format", "gguf", "--out", str(gguf_path), "--report"]) == 0
    out = capsys.readouterr().out
    assert gguf_path.is_file() and "blk.0.ffn_down.weight" in out and "Q4_0" in out
    assert main(["export", str(run_dir), "--format", "gguf", "--strict", "--out", str(tmp_path / "s.gguf")]) == 2
    assert "strict" in capsys.readouterr().err.lower() and not (tmp_path / "s.gguf").exists()
    assert main(["generate", str(tmp_path / "p"), "--prompt", "To be", "--max-new-tokens", "5"]) == 0
    streamed = capsys.readouterr().out
    assert streamed.startswith("To be") and len(streamed) > len("To be")
