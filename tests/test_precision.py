"""Half precision only where the device computes it natively: the decision on substituted capabilities
of both kinds, the loaders computing as decided, and ``run`` training a bf16 recipe in float32 on a CPU
without native bfloat16 (what it did recorded in results.json)."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from transformers import Qwen3ForCausalLM

import edgerazor
from edgerazor import precision
from edgerazor.errors import EdgeRazorError, RecipeError
from edgerazor.precision import Capability, native, plan
from edgerazor.recipe import recipe_from_dict
from tests.helpers import tiny_qwen3_config
from tests.tokenizer_utils import train_tiny_tokenizer

#: an AVX2 CPU without AVX-512 (the kind where torch takes the scalar half-precision GEMM)
AVX2 = Capability("cpu", "AVX2", frozenset({"avx", "avx2", "fma", "f16c"}), "x86_64", "AVX2 test CPU")
#: an AVX-512 CPU with AVX512-BF16 but no AVX512-FP16 (Zen 4)
ZEN4 = Capability("cpu", "AVX512", frozenset({"avx2", "avx512f", "avx512bw", "avx512_bf16"}), "x86_64", "Zen 4")
#: Sapphire Rapids: AMX and AVX512-FP16
SPR = Capability("cpu", "AVX512", frozenset({"avx512f", "avx512bw", "amx_bf16", "amx_fp16", "avx512_fp16"}), "x86_64")
TURING = Capability("cuda", "sm_75", None, "x86_64", "T4", (7, 5), False)
AMPERE = Capability("cuda", "sm_80", None, "x86_64", "A100", (8, 0), True)


def no_measuring(dtype: str) -> float:
    raise AssertionError(f"the flags are conclusive: {dtype} must not be measured")


@pytest.fixture
def fresh_announcements(monkeypatch):
    """Every test sees its own warning line, whatever an earlier test in this process printed."""
    monkeypatch.setattr(precision, "_announced", set())


def test_cpu_without_native_half_precision_computes_in_float32(fresh_announcements, capsys):
    for dtype in ("bfloat16", "float16"):
        support = native(dtype, AVX2, no_measuring)
        assert not support.native and support.measured is None
    chosen = plan("bfloat16", capability=AVX2, measure=no_measuring)
    assert (chosen.stored, chosen.compute) == ("bfloat16", "float32")
    line = chosen.line()
    assert line == ("edgerazor: computing in float32: this CPU (AVX2, no AVX512-BF16/AMX) has no native bfloat16 "
                    "matmul, which runs ~100x slower; the recipe's bfloat16 still decides what is stored and "
                    "exported (--keep-dtype to insist)")
    precision.announce(chosen)
    precision.announce(chosen)  # a second stage deciding the same thing says nothing more
    assert capsys.readouterr().err.splitlines() == [line]
    assert chosen.record() == {"compute_dtype": "float32", "compute_dtype_reason": chosen.reason,
                               "stored_dtype": "bfloat16", "bf16_autocast": False}
    assert plan("float32", capability=AVX2, measure=no_measuring).line() is None


def test_cpu_with_native_instructions_keeps_half_precision():
    chosen = plan("bfloat16", autocast=True, capability=ZEN4, measure=no_measuring)
    assert (chosen.compute, chosen.autocast, chosen.line()) == ("bfloat16", True, None)
    assert "AVX512-BF16" in chosen.reason
    for dtype in ("bfloat16", "float16"):
        assert native(dtype, SPR, no_measuring).native


def test_inconclusive_flags_are_settled_by_the_measured_matmul():
    asked = []

    def measured(ratio):
        def measure(dtype):
            asked.append(dtype)
            return ratio
        return measure

    # AVX-512 without AVX512-FP16: oneDNN may convert, so the matmul decides
    slow = native("float16", ZEN4, measured(160.0))
    assert not slow.native and slow.measured == 160.0 and asked == ["float16"]
    assert "measured 160x slower than float32" in slow.why_not()
    assert native("float16", ZEN4, measured(1.3)).native
    arm = Capability("cpu", "SVE256", frozenset({"fp", "asimd", "bf16"}), "aarch64")
    assert native("bfloat16", arm, measured(0.6)).native and asked[-1] == "bfloat16"
    unknown = Capability("cpu", "AVX2", None, "x86_64")  # no /proc/cpuinfo: the flags cannot say
    assert not native("bfloat16", unknown, measured(95.0)).native


def test_cuda_decision_comes_from_the_device():
    assert not native("bfloat16", TURING, no_measuring).native
    assert native("float16", TURING, no_measuring).native
    assert native("bfloat16", AMPERE, no_measuring).native
    chosen = plan("bfloat16", capability=TURING, measure=no_measuring)
    assert chosen.compute == "float32" and "GPU (T4, compute capability sm_75)" in chosen.line()


def test_autocast_and_insisting():
    autocast_only = plan("float32", autocast=True, capability=AVX2, measure=no_measuring)
    assert (autocast_only.compute, autocast_only.autocast) == ("float32", False)
    assert autocast_only.line().startswith("edgerazor: training without bf16 autocast (train.bf16): this CPU (AVX2")
    insisted = plan("bfloat16", "as_stored", autocast=True, capability=AVX2, measure=no_measuring)
    assert (insisted.compute, insisted.autocast, insisted.line()) == ("bfloat16", True, None)
    with pytest.raises(EdgeRazorError, match="use one of auto, as_stored"):
        plan("bfloat16", "fastest", capability=AVX2)
    assert recipe_from_dict({"model": {"compute_dtype": "as_stored"}}).model.compute_dtype == "as_stored"
    with pytest.raises(RecipeError, match="model.compute_dtype"):
        recipe_from_dict({"model": {"compute_dtype": "float32"}})


def test_this_machine_is_read_from_torch_and_the_cpu():
    here = precision.probe()
    assert here.isa == torch.backends.cpu.get_cpu_capability()
    assert precision.probe() is here  # read once per process
    info = precision.summary(here)
    line = precision.summary_line(info)
    assert f"torch capability {here.isa}" in line
    for dtype in ("bfloat16", "float16"):
        assert info[dtype]["native"] == native(dtype, here).native
        assert re.search(f"[:,] {dtype} {'native' if info[dtype]['native'] else 'emulated'} \\(", line), line


@pytest.fixture(scope="module")
def bf16_student(tmp_path_factory):
    """A quantized bfloat16 student saved as a checkpoint and as a packed export."""
    from edgerazor.export.packed import export_packed

    tok = train_tiny_tokenizer(["To be, or not to be, that is the question. " * 40], vocab_size=320)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_qwen3_config(vocab_size=len(tok))).to(torch.bfloat16)
    edgerazor.quantize(model, {"model": {"dtype": "bfloat16"},
                               "quant": {"scheme": "1.88-8-8", "weight": {"group_size": 64}}})
    root = tmp_path_factory.mktemp("bf16")
    model.save_pretrained(root / "checkpoint")
    tok.save_pretrained(root / "checkpoint")
    export_packed(model.eval(), tok, root / "packed")
    return root


@pytest.mark.parametrize("compute", ["float32", "as_stored"])
def test_both_runtimes_compute_as_decided_with_equal_logits(bf16_student, compute):
    from edgerazor.runtime.loading import stored_dtype

    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = "bfloat16" if compute == "as_stored" else compute
    logits = []
    for kind, dense in (("checkpoint", False), ("packed", False), ("packed", True)):
        assert stored_dtype(bf16_student / kind) == "bfloat16"
        model, _ = edgerazor.load(bf16_student / kind, dense=dense, compute_dtype=compute)
        with torch.no_grad():
            logits.append(model(ids).logits)
        assert {p.dtype for p in model.parameters()} == {getattr(torch, expected)}, (kind, dense)
    assert all(out.dtype == getattr(torch, expected) for out in logits)
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[1], logits[2])


def test_run_trains_a_bf16_recipe_in_float32_on_a_cpu_without_native_bf16(tmp_path, fresh_announcements, capsys):
    from edgerazor.data import build_datasets
    from edgerazor.eval.perplexity import perplexity
    from edgerazor.run import run_command
    from edgerazor.runtime.loading import stored_dtype

    text = "First Citizen: Before we proceed any further, hear me speak.\nAll: Speak, speak.\n" * 40
    tok = train_tiny_tokenizer([text], vocab_size=384)
    torch.manual_seed(0)
    teacher = tmp_path / "teacher"
    Qwen3ForCausalLM(tiny_qwen3_config(vocab_size=len(tok), num_hidden_layers=1)).to(torch.bfloat16).save_pretrained(
        teacher)
    tok.save_pretrained(teacher)
    (teacher / "corpus.txt").write_text(text * 3)
    recipe = {
        "name": "bf16-on-avx2",
        "model": {"teacher": str(teacher), "dtype": "bfloat16"},
        "quant": {"scheme": "1.88-8-8", "weight": {"group_size": 64}},
        "data": {"sources": [{"path": str(teacher / "corpus.txt")}], "max_length": 32, "eval_fraction": 0.25},
        "train": {"max_steps": 2, "per_device_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1,
                  "save_steps": 2, "bf16": True},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    results = run_command(tmp_path / "r.yaml", None, None, [], out, False, capability=AVX2)

    line = ("edgerazor: computing in float32 and training without bf16 autocast (train.bf16): this CPU "
            "(AVX2, no AVX512-BF16/AMX) has no native bfloat16 matmul")
    assert [x for x in capsys.readouterr().err.splitlines() if x.startswith("edgerazor: ")][0].startswith(line)
    written = json.loads((out / "results.json").read_text())
    assert written["compute_dtype"] == results["compute_dtype"] == "float32"
    assert "AVX2, no AVX512-BF16/AMX" in written["compute_dtype_reason"]
    assert (written["stored_dtype"], written["bf16_autocast"]) == ("bfloat16", False)
    args = torch.load(out / "checkpoints" / "checkpoint-2" / "training_args.bin", weights_only=False)
    assert args.bf16 is False  # the Trainer ran without bf16 autocast
    # the saved student keeps the recipe's dtype; its perplexity, computed in float32, is the one reported
    assert stored_dtype(out / "student") == "bfloat16"
    model, tokenizer = edgerazor.load(out / "student", compute_dtype="float32")
    _, evaluation = build_datasets(recipe_from_dict(recipe).data, tokenizer)
    assert perplexity(model, evaluation, 4, progress=False) == written["student_ppl"]


def test_generate_says_once_when_it_computes_in_float32_and_keep_dtype_insists(tmp_path, fresh_announcements, capsys):
    """On this machine, whichever kind it is: the line appears exactly when float16 is not native here."""
    from edgerazor.cli import main

    tok = train_tiny_tokenizer(["To be, or not to be, that is the question. " * 40], vocab_size=320)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_qwen3_config(vocab_size=len(tok))).to(torch.float16)
    edgerazor.quantize(model, {"model": {"dtype": "float16"},
                               "quant": {"scheme": "1.88-8-8", "weight": {"group_size": 64}}})
    model.save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")
    here = native("float16")
    for keep in (False, True):
        argv = ["generate", str(tmp_path / "student"), "--prompt", "To be", "--max-new-tokens", "2"]
        assert main(argv + ["--keep-dtype"] * keep) == 0
        lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("edgerazor: computing in")]
        expected = [] if keep or here.native else [
            f"edgerazor: computing in float32: {here.why_not()}; the model's float16 still decides what is stored "
            "and exported (--keep-dtype to insist)"]
        assert lines == expected
