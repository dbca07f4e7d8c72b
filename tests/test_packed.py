"""The packed format: true bits on disk, logits equal to the fake-quant student (atol=0), bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM, Qwen3ForCausalLM

import edgerazor
from edgerazor.cli import main
from edgerazor.errors import EdgeRazorError, OutputExistsError, PackedFormatError
from edgerazor.export import packed as packed_mod
from edgerazor.export.pack import CODECS
from edgerazor.export.packed import CHECKSUM_FILE, METADATA_FILE, WEIGHTS_FILE, export_packed
from edgerazor.runtime.packed import CODECS as TORCH_CODECS
from edgerazor.runtime.packed import PackedLinear, load_packed, unpack_codes
from tests.helpers import tiny_llama_config, tiny_qwen3_config
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


@pytest.mark.parametrize("qmax", [1, 2, 3, 5, 7, 15, 31, 100, 127])
def test_torch_unpack_matches_the_generic_numpy_codec(qmax):
    from edgerazor.export.pack import get_codec
    from edgerazor.runtime.packed import unpacked_numel

    g = torch.Generator().manual_seed(qmax)
    scratch = torch.full((4096,), 99, dtype=torch.int8)
    pack_fn, unpack_fn, _, _ = get_codec(f"sym{qmax}")
    for n in (1, 37, 64):
        codes = torch.randint(-qmax, qmax + 1, (3, n), generator=g, dtype=torch.int8)
        packed = torch.from_numpy(pack_fn(codes.numpy()))
        assert torch.equal(unpack_codes(packed, f"sym{qmax}", n), codes)
        assert unpacked_numel(packed, f"sym{qmax}", n) == 3 * n
        assert torch.equal(unpack_codes(packed, f"sym{qmax}", n, out=scratch), codes)
        assert torch.equal(unpack_codes(packed[[2, 0]], f"sym{qmax}", n), codes[[2, 0]])  # rows stand alone


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
        export_packed(model, tok, out, overwrite=True)
    assert (out / WEIGHTS_FILE).read_bytes() == before  # the previous export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # and nothing of the killed one is left
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


def test_export_never_replaces_what_it_was_not_asked_to(tok, tmp_path):
    torch.manual_seed(0)
    first = quantized(Qwen3ForCausalLM(tiny_qwen3_config(vocab_size=len(tok))))
    torch.manual_seed(1)
    second = quantized(Qwen3ForCausalLM(tiny_qwen3_config(vocab_size=len(tok))))
    ids = torch.randint(0, len(tok), (1, 10))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="mine already exists"):
            export_packed(first, tok, mine, overwrite=overwrite)
    assert [p.name for p in mine.iterdir()] == ["thesis.txt"] and (mine / "thesis.txt").read_text() == "years of work"

    out = tmp_path / "out"
    export_packed(first, tok, out)
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        export_packed(second, tok, out)
    export_packed(second, tok, out, overwrite=True)  # a previous packed export: replaced
    runtime, _ = load_packed(out)
    with torch.no_grad():
        assert torch.equal(runtime(ids).logits, second(ids).logits)
    (out / "notes.txt").write_text("mine")  # the user added a file: the export is no longer only ours
    with pytest.raises(OutputExistsError, match="notes.txt, which the export did not write"):
        export_packed(first, tok, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]  # no temporary or old copies left


def test_a_failed_export_removes_only_what_it_created(tok, tmp_path):
    torch.manual_seed(0)
    model = quantized(Qwen3ForCausalLM(tiny_qwen3_config(vocab_size=len(tok))))
    (tmp_path / "keep.txt").write_text("x")
    target = tmp_path / "a" / "b" / ("n" * 300)  # the final rename fails: the name is too long
    with pytest.raises(EdgeRazorError, match="cannot write .*: File name too long"):
        export_packed(model, tok, target)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]  # a/ and a/b/ were created by it, so removed


@pytest.mark.parametrize("umask", [0o027, 0o002])
def test_exported_files_follow_the_umask(tok, tmp_path, umask):
    import os

    torch.manual_seed(0)
    model = quantized(Qwen3ForCausalLM(tiny_qwen3_config(vocab_size=len(tok))))
    old = os.umask(umask)
    try:
        export_packed(model, tok, tmp_path / "p")
        from edgerazor.export.gguf import write_gguf

        write_gguf(model, tok, tmp_path / "m.gguf", quiet=True)
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "p").rglob("*") if p.is_file()] + [tmp_path / "m.gguf"]
    assert WEIGHTS_FILE in {p.name for p in files}  # safetensors writes through a 0600 temporary file
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o666 & ~umask)}
    assert oct((tmp_path / "p").stat().st_mode & 0o777) == oct(0o777 & ~umask)


def _forge(path):
    """Recompute the manifest and the metadata checksum after an edit (a deliberate, not an accidental, change)."""
    from edgerazor.export.packed_format import checksum_line, manifest_of

    meta = json.loads((path / METADATA_FILE).read_text())
    meta["manifest"] = manifest_of(path)
    (path / METADATA_FILE).write_text(json.dumps(meta))
    (path / CHECKSUM_FILE).write_text(checksum_line((path / METADATA_FILE).read_bytes()))


def test_structural_checks_hold_against_forged_checksums(tok, tmp_path):
    """Each edit keeps the checksums valid; the loader still refuses it, naming the file and the key."""
    import shutil

    torch.manual_seed(0)
    model = quantized(Qwen3ForCausalLM(tiny_qwen3_config(vocab_size=len(tok))))
    good = tmp_path / "good"
    export_packed(model, tok, good)

    def edited(name, file, change):
        target = tmp_path / name
        shutil.copytree(good, target)
        data = json.loads((target / file).read_text())
        change(data)
        (target / file).write_text(json.dumps(data))
        _forge(target)
        return target

    down = "model.layers.0.mlp.down_proj"
    cases = [
        (METADATA_FILE, lambda m: m["layers"][down].update(group_size=32), r"needs float16 \[128, 8\]"),
        (METADATA_FILE, lambda m: m["layers"]["model.layers.0.self_attn.q_proj"].update(
            tied_to="model.layers.0.self_attn.o_proj"), r"holds tensor 'model.layers.0.self_attn.q_proj.codes_high', which"),
        (METADATA_FILE, lambda m: m["layers"][down].update(codec_high="sym7"), r"codec_high is 'sym7', but the recipe"),
        (METADATA_FILE, lambda m: m["layers"][down].pop("d_out"), r"layers\['model.layers.0.mlp.down_proj'\]\.d_out is missing"),
        (METADATA_FILE, lambda m: m["layers"][down].update(high_rows="16"), r"high_rows must be an integer"),
        (METADATA_FILE, lambda m: m["kv_cache"].clear(), "kv_cache disagrees"),
        ("config.json", lambda c: c.update(vocab_size=c["vocab_size"] + 64), r"config.json: vocab_size gives"),
        ("config.json", lambda c: c.update(hidden_size=64), r"config.json: hidden_size gives"),
    ]
    for i, (file, change, message) in enumerate(cases):
        with pytest.raises(PackedFormatError, match=message):
            load_packed(edited(f"case{i}", file, change))

    version_1 = edited("v1", METADATA_FILE, lambda m: m.update(format_version=1))
    with pytest.raises(PackedFormatError, match=r"format_version 1 is not supported \(this EdgeRazor reads version 2\)"):
        load_packed(version_1)
    listed = edited("listed", METADATA_FILE, lambda m: None)
    (listed / "chat_template.jinja").unlink()
    with pytest.raises(PackedFormatError, match="chat_template.jinja is missing"):
        load_packed(listed)
    (good / "README.md").write_text("notes")
    with pytest.raises(PackedFormatError, match="README.md is not part of the export"):
        load_packed(good)


def test_cli_export_refuses_an_existing_out_and_overwrites_only_its_own(tok, tmp_path, capsys):
    torch.manual_seed(0)
    model = quantized(Qwen3ForCausalLM(tiny_qwen3_config(vocab_size=len(tok))))
    run_dir = tmp_path / "run"
    model.save_pretrained(run_dir / "student")
    tok.save_pretrained(run_dir / "student")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.csv").write_text("1,2")
    for extra in ([], ["--overwrite"]):
        assert main(["export", str(run_dir), "--format", "packed", "--out", str(mine), *extra]) == 2
        assert f"{mine} already exists" in capsys.readouterr().err
    assert (mine / "data.csv").read_text() == "1,2"
    out = tmp_path / "p"
    assert main(["export", str(run_dir), "--format", "packed", "--out", str(out)]) == 0
    assert main(["export", str(run_dir), "--format", "packed", "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--format", "packed", "--out", str(out), "--overwrite"]) == 0
    load_packed(out)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not mine to replace")
    assert main(["export", str(run_dir), "--format", "gguf", "--out", str(gguf), "--overwrite"]) == 2
    assert "not a previous EdgeRazor GGUF file" in capsys.readouterr().err and gguf.read_bytes() == b"not mine to replace"
    # 1.88-bit layers mix 4-bit and ternary rows: an explicit TQ2_0 cannot hold them
    assert main(["export", str(run_dir), "--format", "gguf", "--type", "tq2_0", "--out", str(tmp_path / "t.gguf")]) == 2
    assert "GGUF type 'tq2_0' cannot hold tensor 'blk.0.attn_q.weight'" in capsys.readouterr().err
    assert not (tmp_path / "t.gguf").exists()
