"""Smoke tests of the benchmark tools (tiny shapes; nothing here asserts on timings)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

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
