"""Smoke tests of the benchmark tools (tiny shapes; nothing here asserts on timings)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from edgerazor.llama_cpp import find_llama_cpp
from tests.helpers import REPO


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_bench_train_quick(tmp_path):
    out = tmp_path / "bench" / "results.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_train.py"), "--quick", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0

    assert {"meta", "shape", "train_step", "kl"} <= set(results)
    assert results["meta"]["quick"] is True
    # the default dtype is one this machine computes natively, and the header says which it has
    machine = results["meta"]["precision"]
    assert results["shape"]["dtype"] == ("bfloat16" if machine["bfloat16"]["native"] else "float32")
    assert results["shape"]["dtype_native"] is True
    assert f"torch capability {machine['capability']}" in proc.stdout.replace("\n", " ")
    shape = results["shape"]
    assert (shape["hidden_size"], shape["vocab_size"], shape["num_hidden_layers"]) == (64, 1000, 1)

    train = results["train_step"]
    for key in ("distill", "finetune"):
        m = train[key]
        for field in ("time_s", "step_peak_extra_mib", "total_peak_mib"):
            assert _positive(m[field]), (key, field, m[field])
        assert m["state_mib"] >= 0
        assert math.isfinite(m["loss"])
    for field in ("time", "step_peak_extra", "total_peak"):
        assert _positive(train["ratio"][field]), (field, train["ratio"])

    kl = results["kl"]
    assert (kl["tokens"], kl["vocab"]) == (32, 1000)
    for key in ("naive", "chunked"):
        for field in ("time_s", "step_peak_extra_mib", "total_peak_mib", "loss", "grad_norm"):
            assert _positive(kl[key][field]), (key, field, kl[key][field])
    for field in ("time", "step_peak_extra"):
        assert _positive(kl["ratio"][field])
    assert kl["loss_check"]["match"] is True
    assert kl["loss_check"]["rel_diff"] <= kl["loss_check"]["rtol"]
    assert "Training step" in proc.stdout and "naive / chunked" in proc.stdout


def test_bench_train_liger_without_gpu_is_a_clear_skip(tmp_path):
    """--liger on CPU (or without liger_kernel) measures the rest and says why Liger was skipped."""
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "tools" / "bench_train.py")
    bench_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_train)
    args = bench_train.parse_args(["--quick", "--liger"])
    assert args.start_method == "forkserver" and args.tokens == 32
    reason = bench_train.liger_available()
    assert reason is None or "liger_kernel is not installed" in reason
    assert bench_train.group_size({"hidden_size": 1024, "intermediate_size": 3072, "num_attention_heads": 16,
                                   "head_dim": 128}) == 256
    assert bench_train.group_size({"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
                                   "head_dim": 32}) == 64


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# bench_deploy: interleaved rounds, median, spread, flags, 16-bit baselines


def test_bench_deploy_summary_median_spread_and_flag():
    bd = _tool("bench_deploy")
    s = bd.summarize([10.0, 11.0, 9.0, 10.0, 30.0])
    assert (s["median"], s["min"], s["max"], s["rounds"]) == (10.0, 9.0, 30.0, 5)
    assert s["spread"] == pytest.approx(2.1) and s["noisy"] is True
    calm = bd.summarize([10.0, 10.5, 9.6])
    assert calm["median"] == 10.0 and calm["spread"] == pytest.approx(0.09) and calm["noisy"] is False
    edge = bd.summarize([9.5, 10.0, 10.5])  # exactly 10%: not above the limit
    assert edge["spread"] == pytest.approx(0.10) and edge["noisy"] is False
    assert bd.summarize([9.4, 10.0, 10.5])["noisy"] is True
    assert bd.figure(s, 1) == "10.0 ±210% !" and bd.figure(calm, 2, "x") == "10.00x ±9%"


def test_bench_deploy_ratios_are_paired_within_rounds():
    """The issue's machine: BF16 decode at 1.7 tok/s in one round and 10.2 in another. Raw tokens/s
    are flagged; ratios taken inside each round (everything slowed down together) are not."""
    bd = _tool("bench_deploy")
    load = [1.0, 6.0, 2.5]  # how fast the shared machine let each round run
    rounds = [{"F16": {"prompt_tps": 40 * k, "decode_tps": 2.0 * k},
               "BF16": {"prompt_tps": 20 * k, "decode_tps": 1.7 * k},
               "TQ2_0 (1.58)": {"prompt_tps": 30 * k, "decode_tps": 5.1 * k},
               bd.REFERENCE: {"prompt_tps": 31 * k, "decode_tps": 5.0 * k}} for k in load]
    stats = bd.aggregate(rounds)
    assert stats["BF16"]["decode_tps"]["values"] == pytest.approx([1.7, 10.2, 4.25])
    assert stats["BF16"]["decode_tps"]["median"] == pytest.approx(4.25) and stats["BF16"]["decode_tps"]["noisy"]
    tq = stats["TQ2_0 (1.58)"]
    assert tq["decode_x_BF16"]["median"] == pytest.approx(3.0) and tq["decode_x_BF16"]["spread"] == pytest.approx(0)
    assert tq["decode_x_F16"]["median"] == pytest.approx(2.55) and not tq["decode_x_F16"]["noisy"]
    assert tq["prompt_x_F16"]["median"] == pytest.approx(0.75)
    assert stats["F16"]["decode_x_F16"]["median"] == pytest.approx(1.0)
    # one file measured in a fast moment of an otherwise slow round: that round's ratio is off, the median is not
    skewed = [dict(rounds[0], BF16={"prompt_tps": 20.0, "decode_tps": 1.7}), rounds[1], rounds[2]]
    skewed[0]["TQ2_0 (1.58)"] = {"prompt_tps": 30.0, "decode_tps": 5.1 * 6}  # measured in a fast moment
    s = bd.aggregate(skewed)["TQ2_0 (1.58)"]["decode_x_BF16"]
    assert s["values"] == pytest.approx([18.0, 3.0, 3.0]) and s["median"] == pytest.approx(3.0) and s["noisy"]
    ours = bd.paired_ratio(rounds, "TQ2_0 (1.58)", bd.REFERENCE)
    assert ours["median"] == pytest.approx(1.02) and not ours["noisy"]


def test_bench_deploy_rotated_rounds_and_llama_bench_rows():
    bd = _tool("bench_deploy")
    names = ["F16", "BF16", "TQ2_0 (1.58)"]
    orders = bd.rotations(names, 5)
    assert orders[:4] == [names, ["BF16", "TQ2_0 (1.58)", "F16"], ["TQ2_0 (1.58)", "F16", "BF16"], names]
    assert all(sorted(o) == sorted(names) for o in orders) and len(orders) == 5
    rows = [  # the fields llama-bench -o json writes (one row per model and test)
        {"model_filename": "/o/f16.gguf", "n_prompt": 16, "n_gen": 0, "avg_ts": 120.5, "stddev_ts": 1.0},
        {"model_filename": "/o/f16.gguf", "n_prompt": 0, "n_gen": 8, "avg_ts": 10.25, "stddev_ts": 0.1},
        {"model_filename": "/o/bf16.gguf", "n_prompt": 16, "n_gen": 0, "avg_ts": 60.0, "stddev_ts": 1.0},
        {"model_filename": "/o/bf16.gguf", "n_prompt": 0, "n_gen": 8, "avg_ts": 7.5, "stddev_ts": 0.1},
    ]
    parsed = bd.parse_llama_bench(rows, {"/o/f16.gguf": "F16", "/o/bf16.gguf": "BF16"})
    assert parsed == {"F16": {"prompt_tps": 120.5, "decode_tps": 10.25}, "BF16": {"prompt_tps": 60.0, "decode_tps": 7.5}}


def test_bench_deploy_exports_f16_beside_bf16(tmp_path):
    """Both 16-bit baselines hold every matrix in their own type and weigh the same; the per-tensor
    file needs no fallback (it deploys at its true size)."""
    from edgerazor.export.gguf.report import read_report

    bd = _tool("bench_deploy")
    args = bd.parse_args(["--quick", "--out", str(tmp_path)])
    base = bd.build_base(args)
    files = bd.export_variants(args, base, bd.tokenizer_for_bench(), names=("F16", "BF16", "per-tensor (1.88)"))
    assert list(files) == ["F16", "BF16", "per-tensor (1.88)"]
    for name, ggml in (("F16", "F16"), ("BF16", "BF16")):
        report = read_report(files[name]["path"])
        matrices = {t.ggml_type for t in report.tensors if len(t.shape) == 2}
        assert matrices == {ggml}, (name, matrices)
        assert files[name]["bytes"] == report.file_bytes
    assert abs(files["F16"]["bytes"] - files["BF16"]["bytes"]) < 64  # same tensors, 2 bytes each
    assert files["per-tensor (1.88)"]["fallback_tensors"] == 0
    assert set(files["per-tensor (1.88)"]["types"]) <= {"Q4_0", "TQ2_0", "F32"}
    assert files["per-tensor (1.88)"]["bytes"] < files["F16"]["bytes"] / 3


@pytest.mark.skipif(find_llama_cpp(("llama-bench", "llama-quantize")) is None, reason="llama.cpp is not built")
def test_bench_deploy_quick_rounds(tmp_path):
    out = tmp_path / "deploy"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_deploy.py"), "--quick", "--skip-torch", "--rounds", "2",
         "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert (out / "results.png").stat().st_size > 0
    files = results["files"]
    assert list(files)[:2] == ["F16", "BF16"] and len(results["rounds"]) == 2
    for name, e in files.items():
        for metric in ("prompt_tps", "decode_tps", "decode_x_F16", "decode_x_BF16"):
            s = e["stats"][metric]
            assert s["rounds"] == 2 and all(_positive(v) for v in s["values"]), (name, metric)
            assert s["noisy"] == (s["spread"] > 0.10)
        per_round = [r[name]["decode_tps"] / r["F16"]["decode_tps"] for r in results["rounds"]]
        assert e["stats"]["decode_x_F16"]["values"] == pytest.approx(per_round)
    assert files["F16"]["stats"]["decode_x_F16"]["median"] == 1.0
    flagged = {f"{n}: {m}" for n, e in files.items() for m, s in e["stats"].items() if s["noisy"]}
    assert set(results["noisy_figures"]) == flagged
    assert "decode x F16" in proc.stdout and "interleaved rounds" in proc.stdout


# ---------------------------------------------------------------------------------------------
# bench_quality: per_tensor cells, GGUF size and true-size column, tokens to match QAT-CE


def test_bench_quality_grid_puts_per_tensor_beside_super_group():
    bq = _tool("bench_quality")
    grid = bq.parse_cells(None, [2.79, 2.19, 1.88])
    for bits in (2.19, 1.88):
        i = grid.index((bits, "SG+A+E"))
        assert grid[i + 1] == (bits, "PT+A+E")
        assert grid.index((bits, "QAT-CE")) == max(j for j, (b, _) in enumerate(grid) if b == bits)
    assert (2.79, "PT+A+E") not in grid and len(grid) == len(bq.TABLE4) + 2 + 3
    assert bq.parse_cells("1.88:QAT-CE,1.88:PT+A+E", [1.88]) == [(1.88, "PT+A+E"), (1.88, "QAT-CE")]
    assert [bq.cell_allocation(x) for x in ("PT+A+E", "SG+A+E", "ST+A+E", "QAT-CE")] == [
        "per_tensor", "super_group", "stacked", "super_group"]
    train = bq.TrainSettings(steps=7, batch_size=3)
    pt, sg = (bq.cell_recipe(1.88, label, train, 64) for label in ("PT+A+E", "SG+A+E"))
    assert pt.quant.weight.allocation == "per_tensor" and sg.quant.weight.allocation == "super_group"
    assert pt.train == sg.train and pt.distill == sg.distill  # the same token budget, selector and mixer
    assert (pt.train.max_steps, pt.train.per_device_batch_size) == (7, 3)


def test_bench_quality_tokens_to_match_qat_ce():
    bq = _tool("bench_quality")
    qat = {"ppl": 79.0, "steps": 40}
    cell = {"ppl": 74.0, "steps": 40, "curve": [{"step": 10, "ppl": 90.0}, {"step": 20, "ppl": 80.0},
                                                {"step": 30, "ppl": 75.0}]}
    m = bq.tokens_to_match(cell, 120.0, qat, tokens_per_step=1024)
    assert (m["step"], m["tokens"], m["reference_tokens"]) == (30, 30 * 1024, 40 * 1024)
    assert m["fewer_tokens"] == pytest.approx(40 / 30) and m["reached"] and m["evaluated_steps"] == [0, 10, 20, 30, 40]
    # reaching exactly the target counts; the first such point wins
    assert bq.tokens_to_match(dict(cell, curve=[{"step": 10, "ppl": 79.0}, {"step": 20, "ppl": 70.0}]), 120.0, qat,
                              1024)["step"] == 10
    # only the final evaluation gets there: the whole budget, 1.0x
    late = bq.tokens_to_match(dict(cell, curve=[{"step": 20, "ppl": 85.0}], ppl=78.0), 120.0, qat, 1024)
    assert late["step"] == 40 and late["fewer_tokens"] == pytest.approx(1.0)
    never = bq.tokens_to_match(dict(cell, ppl=80.0, curve=[{"step": 20, "ppl": 85.0}]), 120.0, qat, 1024)
    assert never["step"] is None and never["tokens"] is None and never["fewer_tokens"] is None and not never["reached"]
    at_start = bq.tokens_to_match(cell, 78.5, qat, 1024)  # the round-to-nearest start already matches it
    assert at_start["step"] == 0 and at_start["fewer_tokens"] is None
    assert bq.first_reach([(0, 5.0), (3, 4.0), (6, 2.0)], 4.5) == 3 and bq.first_reach([(0, 5.0)], 4.0) is None


def test_bench_quality_gguf_size_and_true_size_per_allocation(tmp_path):
    """RTN rows of the grid: per_tensor exports every decoder tensor in its own type (TQ2_0 / Q4_0),
    super-group's mixed tensors fall back to Q4_0. The size difference is checked against bytes
    computed here from the allocation rule and the two block sizes."""
    import torch
    from transformers import Qwen3ForCausalLM

    from edgerazor.demo import blocks_dataset, train_tokenizer
    from plugins.allocations import per_tensor_is_high
    from tests.helpers import TINY_TEXT, tiny_qwen3_config

    bq = _tool("bench_quality")
    tokenizer = train_tokenizer([TINY_TEXT], vocab_size=300)
    torch.manual_seed(0)
    config = tiny_qwen3_config(hidden_size=256, intermediate_size=512, num_hidden_layers=4, head_dim=64)
    Qwen3ForCausalLM(config).save_pretrained(tmp_path / "teacher")
    ids = tokenizer(TINY_TEXT)["input_ids"]
    assets = bq.TeacherAssets(tmp_path / "teacher", torch.zeros(0), torch.zeros(0), {})
    eval_ds = blocks_dataset([ids[i:i + 32] for i in range(0, 96, 32)])
    rtn = {(b, a): bq.run_rtn(assets, b, a, eval_ds, 64, tokenizer, tmp_path)
           for b in (2.19, 1.88) for a in ("super_group", "per_tensor")}
    assert not list(tmp_path.glob("*.gguf"))  # only the numbers are kept

    linears = {"q_proj": 256 * 256, "k_proj": 128 * 256, "v_proj": 128 * 256, "o_proj": 256 * 256,
               "gate_proj": 512 * 256, "up_proj": 512 * 256, "down_proj": 256 * 512}
    for bits, rho in ((2.19, 0.25), (1.88, 0.125)):
        sg, pt = rtn[(bits, "super_group")], rtn[(bits, "per_tensor")]
        assert sg["true_size"] is False and sg["fallback_tensors"] == 4 * 7 and sg["fallback_extra_bytes"] > 0
        assert pt["true_size"] is True and pt["fallback_tensors"] == 0 and pt["own_bytes"] == pt["gguf_bytes"]
        assert sg["gguf_types"]["Q4_0"] == pt["gguf_types"]["Q4_0"] + pt["gguf_types"]["TQ2_0"]
        ternary = [n for i in range(4) for kind, n in linears.items()
                   if not per_tensor_is_high(f"model.layers.{i}.mlp.{kind}", rho)]
        assert pt["gguf_types"]["TQ2_0"] == len(ternary)
        # a ternary tensor: Q4_0 (18 bytes per 32 weights) in super-group, TQ2_0 (66 bytes per 256) in per_tensor
        assert sg["gguf_bytes"] - pt["gguf_bytes"] == sum(n * 18 // 32 - n * 66 // 256 for n in ternary)
        high = sum(linears.values()) * 4 - sum(ternary)
        assert pt["effective_bits"] == pytest.approx((4 * high + 1.58 * sum(ternary)) / (4 * sum(linears.values())))
        assert sg["effective_bits"] == pytest.approx(4 * rho + 1.58 * (1 - rho))
        assert math.isfinite(sg["ppl"]) and math.isfinite(pt["ppl"])
        assert bq.true_size_text(pt) == "yes"
        assert bq.true_size_text(sg) == f"no: 28 mixed tensors -> Q4_0 ({sg['gguf_bytes'] / sg['own_bytes']:.2f}x own size)"
        assert sg["gguf_bytes"] / sg["own_bytes"] > 1.5  # Q4_0 (4.5 bits/weight) against ~2 bits of its own
    assert rtn[(2.19, "per_tensor")]["effective_bits"] == pytest.approx(0.25 * 4 + 0.75 * 1.58)  # 4 layers: exact
