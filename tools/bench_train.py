"""Training benchmark: one distillation step vs one plain fine-tuning step, and chunked vs naive KL.

    python tools/bench_train.py                          # CPU: Qwen3-0.6B width/vocab, 2 layers, 2 x 128 tokens
    python tools/bench_train.py --quick                  # a tiny shape (smoke test, seconds)
    python tools/bench_train.py --device cuda --liger    # Qwen3-0.6B (28 layers) on a GPU, Liger beside ours
    python tools/bench_train.py --layers 4 --seq 256 --batch 1 --dtype bfloat16 --tokens 1024

``--dtype`` (weights and logits) defaults to ``auto``: bfloat16 where the device computes it natively,
else float32 (``edgerazor.precision`` decides, in a child: the header prints the device's capability
and the decision for both half dtypes). A half dtype the device does not compute natively runs
torch's scalar fallback, ~100x slower; asked for explicitly, it is measured and labelled "emulated".

Measurements (each in a fresh child process, so none pollutes another's memory):

1. Training step of a Qwen3-shaped student (``--model-config``, default Qwen3-0.6B from
   ``shared/models/qwen3-0.6b.json``, with ``--layers`` decoder layers):
   * distill: frozen 16-bit teacher forward under ``no_grad`` + fake-quantized W1.88-A8-KV8 student
     forward, the full objective (``distillation_loss``: CE + adaptive LAFD + EAKLD-mixed chunked
     FKL/RKL), backward, AdamW step;
   * finetune: the same (unquantized) student, CE loss from the model given ``labels``, backward,
     AdamW step.
2. Full-vocabulary KL on ``--tokens`` response tokens at vocabulary ``--vocab`` (default 151,936):
   * naive: float32 ``log_softmax`` of both logit matrices, forward + reverse KL + CE, plain autograd;
   * chunked: ``distill_sums`` with ``--kl-chunk`` (default 128) rows per chunk, recomputed backward.
   Both must give the same loss (float32 tolerance); the script exits 1 if they do not.
3. The logit loss with the lm_heads, from final hidden states (``--logit-tokens`` rows, default
   4 x 1,024, hidden ``--logit-hidden``, default the model's, ``--vocab``), EAKLD-mixed FKL/RKL + CE,
   forward + backward (gradients for the student hidden states and lm_head weight):
   * fused: ``edgerazor.distill.fused`` (lm_head inside the chunked loss, no ``[N, V]`` logits);
   * chunked: today's path: both lm_head matmuls materialise ``[N, V]`` logits, then ``distill_sums``;
   * naive: float32 logits and log-softmax of everything, plain autograd, on ``--logit-naive-tokens``
     rows (default 1,024 on CPU: at 4,096 rows it needs ~20 GB), labelled with its N.
   Chunk rows: ``--kl-chunk`` for fused and chunked alike. ``--logit-warmup`` / ``--logit-repeats``
   (default 0 / 1: a CPU step at this size takes minutes).
4. With ``--liger`` (CUDA only, if ``liger_kernel`` is installed): Liger's fused linear JSD (and fused
   linear cross-entropy) beside our lm_head matmul + chunked divergence, on ``--tokens`` hidden states.

Memory. CPU: peak RSS of the child (``getrusage(RUSAGE_SELF).ru_maxrss``) minus its RSS (from
``/proc/self/statm``) right before the measured step; the child's high-water mark is reset first
(``/proc/self/clear_refs``) and freed heap returned to the OS (``malloc_trim``), so the warm-up step
does not mask the measured one. CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``.
Reported per measurement: ``state`` (models, optimizer state, inputs: resident before the step,
relative to the child right after its imports), ``step peak extra`` (what the step adds at its peak)
and ``total peak`` (their sum). Time: median of ``--repeats`` steps after ``--warmup`` steps
(``time.perf_counter``, with ``torch.cuda.synchronize`` on CUDA). Nothing asserts on timings.

Outputs: a rich table (absolute numbers and the ratios of this one run), ``--out`` JSON
(default ``runs/bench_train/results.json``) and a PNG bar plot beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

# The parent process stays light (no torch import): children are measured against their own baseline,
# and a spawned child's ru_maxrss can never be lower than what its parent held when it was started.

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_CONFIG = REPO.parent / "shared" / "models" / "qwen3-0.6b.json"
DEFAULT_OUT = Path("runs") / "bench_train" / "results.json"
MIB = 1024 * 1024

#: Qwen3-0.6B, used when the shared model configs are not beside the repository.
QWEN3_06B = {
    "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
    "hidden_act": "silu", "max_position_embeddings": 40960, "rms_norm_eps": 1e-06, "rope_theta": 1000000,
    "tie_word_embeddings": True, "attention_bias": False,
}
#: ``--quick``: a tiny Qwen3 shape for smoke tests.
QUICK_SHAPE = {
    "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
}
SCHEME = "1.88-8-8"  # W1.88-A8-KV8


# ----------------------------------------------------------------------------------------------
# Memory probes (used inside the children)
# ----------------------------------------------------------------------------------------------


class CpuMemory:
    """Resident-set-size probe of the current process."""

    kind = "rss"

    def __init__(self) -> None:
        import ctypes
        import ctypes.util

        self._page = os.sysconf("SC_PAGE_SIZE")
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            self._trim = getattr(libc, "malloc_trim", None)
        except OSError:
            self._trim = None
        self.hwm_reset = False
        self.peak_source = "ru_maxrss"

    def current(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def settle(self) -> int:
        """Collect garbage, give freed heap back to the OS and return the RSS."""
        import gc

        gc.collect()
        if self._trim is not None:
            self._trim(0)
        return self.current()

    def start(self) -> int:
        base = self.settle()
        try:  # reset the high-water mark (VmHWM, and with it ru_maxrss) to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        return self.current() if self.hwm_reset else base

    @staticmethod
    def _vm_hwm() -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def peak(self) -> int:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        hwm = self._vm_hwm()
        # ru_maxrss is floored by the pre-exec image's peak (the parent's, for a spawned child);
        # VmHWM is the same counter without that floor, so prefer it when the floor shows.
        if hwm is not None and peak > hwm:
            self.peak_source = "VmHWM"
            return hwm
        return peak

    def sync(self) -> None:
        pass


class CudaMemory:
    """``torch.cuda`` allocator probe."""

    kind = "cuda_allocated"
    hwm_reset = True
    peak_source = "max_memory_allocated"

    def __init__(self, device) -> None:
        import torch

        self.torch, self.device = torch, device

    def sync(self) -> None:
        self.torch.cuda.synchronize(self.device)

    def current(self) -> int:
        return self.torch.cuda.memory_allocated(self.device)

    def settle(self) -> int:
        import gc

        gc.collect()
        self.sync()
        return self.current()

    def start(self) -> int:
        base = self.settle()
        self.torch.cuda.reset_peak_memory_stats(self.device)
        return base

    def peak(self) -> int:
        self.sync()
        return self.torch.cuda.max_memory_allocated(self.device)


def _probe(device):
    return CudaMemory(device) if device.type == "cuda" else CpuMemory()


def measure(step: Callable[[], Any], mem, origin: int, warmup: int, repeats: int) -> dict[str, Any]:
    """Warm up, measure one step's peak memory, then time ``repeats`` steps (median)."""
    for _ in range(warmup):
        step()
    mem.sync()
    base = mem.start()
    value = step()
    mem.sync()
    peak = mem.peak()
    times = []
    for _ in range(repeats):
        mem.sync()
        t0 = time.perf_counter()
        step()
        mem.sync()
        times.append(time.perf_counter() - t0)
    extra = max(peak - base, 0)
    return {
        "time_s": statistics.median(times) if times else float("nan"),
        "times_s": times,
        "state_mib": (base - origin) / MIB,
        "step_peak_extra_mib": extra / MIB,
        "total_peak_mib": (base - origin + extra) / MIB,
        "loss": value,
        "memory": {"probe": mem.kind, "peak_source": mem.peak_source, "hwm_reset": mem.hwm_reset,
                   "origin_mib": origin / MIB, "before_step_mib": base / MIB, "peak_mib": peak / MIB},
    }


# ----------------------------------------------------------------------------------------------
# Measurements (children)
# ----------------------------------------------------------------------------------------------


def _setup(spec: dict[str, Any]):
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was given but torch.cuda.is_available() is False on this machine")
    torch.manual_seed(spec.get("seed", 0))
    return torch, device


def _build_student(spec: dict[str, Any], torch, device):
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(spec["model"])
    model_type = shape.pop("model_type", "qwen3")
    config = AutoConfig.for_model(model_type, **shape)
    dtype = getattr(torch, spec["dtype"])
    model = AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype)
    return model


def _batch(spec: dict[str, Any], torch, device):
    vocab = spec["model"]["vocab_size"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (spec["batch"], spec["seq"]), generator=g)
    labels = ids.clone()
    labels[:, : spec["seq"] // 4] = -100  # a prompt without loss, as in SFT data
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


def run_train_step(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec["mode"]``: ``distill`` (teacher + W1.88-A8-KV8 student, full objective) or ``finetune``."""
    torch, device = _setup(spec)
    mem = _probe(device)
    import copy

    import edgerazor
    from edgerazor.distill.features import record_residual_stream
    from edgerazor.distill.objective import ModelOutputs, distillation_loss
    from edgerazor.recipe import recipe_from_dict

    batch = _batch(spec, torch, device)
    origin = mem.settle()
    student = _build_student(spec, torch, device)
    if spec["mode"] == "distill":
        teacher = copy.deepcopy(student).eval().requires_grad_(False)
        recipe = recipe_from_dict({
            "quant": {"scheme": SCHEME, "weight": {"group_size": spec["group_size"]}},
            "distill": {"chunk_size": spec["chunk_size"]},
        })
        edgerazor.quantize(student, recipe)
        cfg = recipe.distill
        t_layers, s_layers = teacher.model.layers, student.model.layers
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    ids = batch["input_ids"]

    def distill_step() -> float:
        with torch.no_grad(), record_residual_stream(t_layers) as t_states:
            t_logits = teacher(input_ids=ids, use_cache=False).logits
        with record_residual_stream(s_layers) as s_states:
            s_logits = student(input_ids=ids, use_cache=False).logits
        out = distillation_loss(ModelOutputs(s_logits, s_states), ModelOutputs(t_logits, t_states), batch, cfg)
        out.total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.total.detach())

    def finetune_step() -> float:
        loss = student(input_ids=ids, labels=batch["labels"], use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    step = distill_step if spec["mode"] == "distill" else finetune_step
    result = measure(step, mem, origin, spec["warmup"], spec["repeats"])
    result["params"] = sum(p.numel() for p in student.parameters())
    return result


def _logits(spec: dict[str, Any], torch, device):
    g = torch.Generator().manual_seed(2)
    n, v = spec["tokens"], spec["vocab"]
    dtype = getattr(torch, spec["dtype"])
    # Peaked-enough random logits: entropies of a few nats, like a trained model's.
    student = (torch.randn(n, v, generator=g) * 3).to(device=device, dtype=dtype).requires_grad_(True)
    teacher = (torch.randn(n, v, generator=g) * 3).to(device=device, dtype=dtype)
    target = torch.randint(0, v, (n,), generator=g).to(device)
    return student, teacher, target


def run_kl(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec["mode"]``: ``naive`` (float32 log_softmax of [N, V], autograd) or ``chunked`` (distill_sums)."""
    torch, device = _setup(spec)
    mem = _probe(device)
    from edgerazor.distill.divergence import ResponsePositions, distill_sums

    origin = mem.settle()
    student, teacher, target = _logits(spec, torch, device)
    n = target.numel()
    w = spec["w_forward"]
    pos = ResponsePositions(torch.arange(n, device=device), target, torch.zeros_like(target), 1)

    def naive() -> float:
        log_s = torch.log_softmax(student.float(), -1)
        log_t = torch.log_softmax(teacher.float(), -1)
        fkl = (log_t.exp() * (log_t - log_s)).sum(-1)
        rkl = (log_s.exp() * (log_s - log_t)).sum(-1)
        ce = -log_s.gather(-1, target[:, None]).squeeze(-1)
        loss = (w * fkl).sum() + ((1 - w) * rkl).sum() + ce.sum()
        student.grad = None
        loss.backward()
        return float(loss.detach())

    def chunked() -> float:
        loss = distill_sums(student, teacher, pos, w, spec["chunk_size"]).sum()
        student.grad = None
        loss.backward()
        return float(loss.detach())

    result = measure(naive if spec["mode"] == "naive" else chunked, mem, origin, spec["warmup"], spec["repeats"])
    result["grad_norm"] = float(student.grad.float().norm())
    return result


def run_logit_loss(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec["mode"]``: ``fused``, ``chunked`` (lm_head matmuls + ``distill_sums``) or ``naive``; EAKLD mixer."""
    torch, device = _setup(spec)
    mem = _probe(device)
    from edgerazor.distill.divergence import ResponsePositions, distill_sums, teacher_token_stats
    from edgerazor.distill.fused import fused_distill, fused_teacher_stats
    from edgerazor.plugin_manager import get_plugins

    eakld = get_plugins().get("kl_mixers", "eakld")
    origin = mem.settle()
    n, v, h = spec["tokens"], spec["vocab"], spec["hidden"]
    dtype = getattr(torch, spec["dtype"])
    g = torch.Generator().manual_seed(5)
    h_s = torch.randn(n, h, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    h_t = torch.randn(n, h, generator=g).to(device=device, dtype=dtype)
    w_s = (torch.randn(v, h, generator=g) * 3 * h**-0.5).to(device=device, dtype=dtype).requires_grad_(True)
    w_t = (torch.randn(v, h, generator=g) * 3 * h**-0.5).to(device=device, dtype=dtype)
    target = torch.randint(0, v, (n,), generator=g).to(device)
    seq = torch.arange(n, device=device) // spec["seq"]
    pos = ResponsePositions(torch.arange(n, device=device), target, seq, int(seq[-1]) + 1)
    coef = torch.tensor([2.0 / n, 2.0 / n, 0.1 / n], device=device)  # alpha_logit, alpha_logit, alpha_task; / N
    chunk = spec["chunk_size"]
    weights = {}

    def fused():
        stats = fused_teacher_stats(h_t, w_t, None, pos, chunk)
        weights["w"] = eakld(stats)
        return fused_distill(h_s, w_s, None, h_t, w_t, None, pos, weights["w"], coef, chunk)[0]

    def chunked():
        logits_s = h_s @ w_s.T
        with torch.no_grad():
            logits_t = h_t @ w_t.T
        weights["w"] = eakld(teacher_token_stats(logits_t, pos, chunk))
        return (coef * distill_sums(logits_s, logits_t, pos, weights["w"], chunk)).sum()

    def naive():
        log_s = torch.log_softmax((h_s @ w_s.T).float(), -1)
        with torch.no_grad():
            log_t = torch.log_softmax((h_t @ w_t.T).float(), -1)
        ratio = (-(log_t.exp() * log_t).sum(-1)).clamp(max=math.log(16)) / math.log(16)
        weights["w"] = torch.stack([ratio[seq == b].mean() for b in range(int(seq[-1]) + 1)]).mean()
        w = weights["w"]
        fkl = (log_t.exp() * (log_t - log_s)).sum(-1)
        rkl = (log_s.exp() * (log_s - log_t)).sum(-1)
        ce = -log_s.gather(-1, target[:, None]).squeeze(-1)
        return coef[0] * (w * fkl).sum() + coef[1] * ((1 - w) * rkl).sum() + coef[2] * ce.sum()

    loss_fn = {"fused": fused, "chunked": chunked, "naive": naive}[spec["mode"]]

    def step() -> float:
        h_s.grad = w_s.grad = None
        loss = loss_fn()
        loss.backward()
        return float(loss.detach())

    result = measure(step, mem, origin, spec["warmup"], spec["repeats"])
    result.update(tokens=n, lambda_=float(weights["w"]), grad_norm_hidden=float(h_s.grad.float().norm()),
                  grad_norm_weight=float(w_s.grad.float().norm()))
    return result


def run_liger(spec: dict[str, Any]) -> dict[str, Any]:
    """Fused-linear comparison on hidden states ``[N, H]`` and an lm_head ``[V, H]`` (CUDA).

    ``ours``: lm_head matmul (logits materialised) + chunked FKL/RKL/CE; ``jsd``: Liger's
    ``LigerFusedLinearJSD`` (beta 0.5); ``flce``: Liger's fused linear cross-entropy.
    """
    torch, device = _setup(spec)
    mem = _probe(device)
    import inspect

    from edgerazor.distill.divergence import ResponsePositions, distill_sums

    origin = mem.settle()
    n, v, h = spec["tokens"], spec["vocab"], spec["hidden"]
    dtype = getattr(torch, spec["dtype"])
    g = torch.Generator().manual_seed(3)
    h_s = torch.randn(n, h, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    h_t = torch.randn(n, h, generator=g).to(device=device, dtype=dtype)
    w_s = (torch.randn(v, h, generator=g) * h**-0.5).to(device=device, dtype=dtype).requires_grad_(True)
    w_t = (torch.randn(v, h, generator=g) * h**-0.5).to(device=device, dtype=dtype)
    target = torch.randint(0, v, (n,), generator=g).to(device)
    pos = ResponsePositions(torch.arange(n, device=device), target, torch.zeros_like(target), 1)
    mode = spec["mode"]

    if mode == "ours":
        def loss_fn():
            logits_s = h_s @ w_s.T
            with torch.no_grad():
                logits_t = h_t @ w_t.T
            return distill_sums(logits_s, logits_t, pos, 0.5, spec["chunk_size"]).sum() / n
    elif mode == "jsd":
        from liger_kernel.transformers import LigerFusedLinearJSD

        jsd = LigerFusedLinearJSD(jsd_beta=0.5)
        with_labels = "shift_labels" in inspect.signature(jsd.forward).parameters

        def loss_fn():
            return jsd(h_s, w_s, h_t, w_t, target) if with_labels else jsd(h_s, w_s, h_t, w_t)
    elif mode == "flce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        flce = LigerFusedLinearCrossEntropyLoss()

        def loss_fn():
            return flce(w_s, h_s, target)
    else:
        raise ValueError(mode)

    def step() -> float:
        loss = loss_fn()
        h_s.grad = w_s.grad = None
        loss.backward()
        return float(loss.detach())

    return measure(step, mem, origin, spec["warmup"], spec["repeats"])


def run_precision(spec: dict[str, Any]) -> dict[str, Any]:
    """The device's capability and whether it computes bfloat16 / float16 natively (imports torch: a child)."""
    from edgerazor import precision

    _setup(spec)
    return precision.summary(precision.probe(spec["device"]))


RUNNERS = {"train": run_train_step, "kl": run_kl, "logit_loss": run_logit_loss, "liger": run_liger,
           "precision": run_precision}


def _child(conn, kind: str, spec: dict[str, Any]) -> None:
    try:
        result = RUNNERS[kind](spec)
        conn.send({"ok": True, "result": result})
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
    finally:
        conn.close()


class ChildError(RuntimeError):
    pass


def run_child(ctx, kind: str, spec: dict[str, Any], label: str, console) -> dict[str, Any]:
    """Run one measurement in a fresh process and return its result."""
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, kind, spec), name=f"bench-{label}")
    t0 = time.perf_counter()
    proc.start()
    send.close()
    message = None
    while message is None:
        if recv.poll(0.5):
            try:
                message = recv.recv()
            except EOFError:
                break
        elif not proc.is_alive():
            if recv.poll(0.1):
                continue
            break
    proc.join()
    if message is None:
        raise ChildError(f"{label}: the measurement process died (exit code {proc.exitcode}; out of memory?)")
    if not message["ok"]:
        raise ChildError(f"{label}: {message['error']}\n{message['traceback']}")
    console.log(f"{label}: done in {time.perf_counter() - t0:.1f} s")
    return message["result"]


# ----------------------------------------------------------------------------------------------
# Shape, reporting, plotting (parent)
# ----------------------------------------------------------------------------------------------


def model_shape(args) -> dict[str, Any]:
    if args.quick:
        shape = {**QWEN3_06B, **QUICK_SHAPE}
    else:
        path = Path(args.model_config) if args.model_config else DEFAULT_MODEL_CONFIG
        if path.is_file():
            raw = json.loads(path.read_text())
            shape = {k: v for k, v in raw.items() if k not in ("architectures", "torch_dtype", "dtype",
                                                             "bos_token_id", "eos_token_id")}
        elif args.model_config:
            raise SystemExit(f"--model-config {path} does not exist")
        else:
            shape = dict(QWEN3_06B)
    if args.layers is not None:
        shape["num_hidden_layers"] = args.layers
    shape.setdefault("model_type", "qwen3")
    return shape


def group_size(shape: dict[str, Any]) -> int:
    """The adapter default (256) where it divides every linear input, else the largest divisor that does."""
    heads = shape["num_attention_heads"] * shape.get("head_dim", shape["hidden_size"] // shape["num_attention_heads"])
    return math.gcd(256, shape["hidden_size"], shape["intermediate_size"], heads)


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _fmt_times(m: dict[str, Any]) -> str:
    """Median and the range of the timed repeats (shared CPUs are noisy)."""
    times = m.get("times_s") or []
    if len(times) < 2:
        return _fmt_time(m["time_s"])
    scale, unit = (1e3, "ms") if m["time_s"] < 1 else (1.0, "s")
    return f"{_fmt_time(m['time_s'])} ({min(times) * scale:.3g}-{max(times) * scale:.3g})"


def _fmt_mib(m: float) -> str:
    return f"{m / 1024:.2f} GiB" if m >= 1024 else f"{m:.1f} MiB"


def _dtype_label(shape: dict[str, Any]) -> str:
    """``bfloat16``, or ``bfloat16 (emulated)`` where the device has no native matmul for it."""
    return shape["dtype"] + ("" if shape.get("dtype_native", True) else " (emulated)")


def render(results: dict[str, Any], console) -> None:
    from rich.table import Table

    shape, train = results["shape"], results["train_step"]
    mem_kind = "RSS" if results["meta"]["device"] == "cpu" else "CUDA allocated"
    console.print(f"machine: {results['meta']['machine']}")
    t = Table(title=(
        f"Training step on {results['meta']['device']}: Qwen3 shape h={shape['hidden_size']}, "
        f"L={shape['num_hidden_layers']}, V={shape['vocab_size']:,}, batch {shape['batch']} x {shape['seq']} tokens, "
        f"{_dtype_label(shape)} ({mem_kind})"
    ))
    for col in ("step", "median time (range)", "state", "step peak extra", "total peak", "loss"):
        t.add_column(col, justify="left" if col == "step" else "right")
    t.caption = ("distill: frozen 16-bit teacher (no_grad) + fake-quantized W1.88-A8-KV8 student, CE + adaptive "
                 "LAFD + EAKLD-mixed FKL/RKL, backward, AdamW; fine-tune: the unquantized student, CE, backward, "
                 "AdamW. state: resident before the step (models, optimizer state); total = state + step peak extra")
    labels = {"distill": "distill W1.88-A8-KV8", "finetune": f"fine-tune {_dtype_label(shape)}"}
    for key in ("distill", "finetune"):
        m = train[key]
        t.add_row(labels[key], _fmt_times(m), _fmt_mib(m["state_mib"]), _fmt_mib(m["step_peak_extra_mib"]),
                  _fmt_mib(m["total_peak_mib"]), f"{m['loss']:.4f}")
    r = train["ratio"]
    t.add_row("[bold]distill / fine-tune[/bold]", f"[bold]{r['time']:.2f}x[/bold]", f"{r['state']:.2f}x",
              f"[bold]{r['step_peak_extra']:.2f}x[/bold]", f"[bold]{r['total_peak']:.2f}x[/bold]", "")
    console.print(t)

    kl = results["kl"]
    t = Table(title=f"Full-vocabulary KL + CE, N={kl['tokens']} tokens, V={kl['vocab']:,}, "
                    f"{_dtype_label(shape)} logits ({mem_kind})")
    for col in ("divergence", "median time (range)", "inputs", "step peak extra", "loss", "grad norm"):
        t.add_column(col, justify="left" if col == "divergence" else "right")
    t.caption = (f"naive: float32 log_softmax of both [N, V] + FKL/RKL/CE, plain autograd; chunked: distill_sums, "
                 f"{kl['chunk_size']} rows per chunk, recomputed backward; inputs: the two logit matrices")
    for key, label in (("naive", "naive fp32"), ("chunked", f"chunked ({kl['chunk_size']})")):
        m = kl[key]
        t.add_row(label, _fmt_times(m), _fmt_mib(m["state_mib"]), _fmt_mib(m["step_peak_extra_mib"]),
                  f"{m['loss']:.4f}", f"{m['grad_norm']:.6g}")
    r = kl["ratio"]
    t.add_row("[bold]naive / chunked[/bold]", f"{r['time']:.2f}x", "", f"[bold]{r['step_peak_extra']:.1f}x[/bold]",
              f"rel. diff {kl['loss_check']['rel_diff']:.1e}", f"rel. diff {kl['grad_check']['rel_diff']:.1e}")
    console.print(t)
    check = kl["loss_check"]
    verdict = "[green]same loss[/green]" if check["match"] else "[red]LOSS MISMATCH[/red]"
    console.print(f"KL loss check: naive {check['naive']:.6f} vs chunked {check['chunked']:.6f} "
                  f"(|diff| {check['abs_diff']:.2e}, rel {check['rel_diff']:.2e}, rtol {check['rtol']:g}): {verdict}")

    ll = results.get("logit_loss")
    if ll:
        t = Table(title=f"Logit loss with the lm_heads (EAKLD FKL/RKL + CE, forward + backward), H={ll['hidden']}, "
                        f"V={ll['vocab']:,}, {ll['dtype']} ({mem_kind})")
        for col in ("path", "tokens", "median time (range)", "inputs", "step peak extra", "loss", "vs chunked (memory)",
                    "vs chunked (time)"):
            t.add_column(col, justify="left" if col == "path" else "right")
        t.caption = (f"fused: lm_head inside the chunked loss ({ll['chunk_size']} rows per chunk); chunked: lm_head "
                     "matmuls materialise [N, V] logits, then distill_sums; naive: fp32 log-softmax of everything, "
                     "autograd. inputs: hidden states and both lm_head weights. Ratios only between equal N")
        ref = ll["runs"].get("chunked")
        for key, label in (("fused", "fused"), ("chunked", "chunked (today)"), ("naive", "naive fp32")):
            m = ll["runs"].get(key)
            if m is None:
                continue
            if "error" in m:
                t.add_row(label, "", "error", m["error"][:60], "", "", "", "")
                continue
            same = ref is not None and "error" not in ref and m["tokens"] == ref["tokens"]
            t.add_row(label, f"{m['tokens']:,}", _fmt_times(m), _fmt_mib(m["state_mib"]),
                      _fmt_mib(m["step_peak_extra_mib"]), f"{m['loss']:.6f}",
                      f"{ratio(m['step_peak_extra_mib'], ref['step_peak_extra_mib']):.3f}x" if same else "n/a",
                      f"{ratio(m['time_s'], ref['time_s']):.2f}x" if same else "n/a")
        console.print(t)
        check = ll.get("check")
        if check:
            console.print(f"fused vs chunked: loss rel. diff {check['loss_rel_diff']:.1e}, d hidden norm rel. diff "
                          f"{check['grad_hidden_rel_diff']:.1e}, d weight norm rel. diff {check['grad_weight_rel_diff']:.1e}")

    liger = results.get("liger")
    if liger and "skipped" in liger:
        console.print(f"[yellow]Liger comparison skipped: {liger['skipped']}[/yellow]")
    elif liger:
        t = Table(title=f"Fused linear divergence, N={liger['tokens']}, H={liger['hidden']}, V={liger['vocab']:,}, "
                        f"{liger['dtype']} (CUDA allocated)")
        for col in ("loss", "median time (range)", "step peak extra", "vs ours (memory)", "vs ours (time)"):
            t.add_column(col, justify="left" if col == "loss" else "right")
        ours = liger["runs"].get("ours")
        t.caption = (f"ours: lm_head matmul (logits materialised) + chunked FKL/RKL/CE, chunk {liger['chunk_size']}; "
                     "Liger: LigerFusedLinearJSD (beta 0.5) and LigerFusedLinearCrossEntropyLoss (CE only). "
                     "Different divergences: compare cost, not loss values")
        names = {"ours": "ours (chunked)", "jsd": "Liger fused JSD", "flce": "Liger fused CE"}
        for key, m in liger["runs"].items():
            if "error" in m:
                t.add_row(names[key], "error", m["error"][:60], "", "")
                continue
            mem_r = ratio(m["step_peak_extra_mib"], ours["step_peak_extra_mib"]) if ours else float("nan")
            time_r = ratio(m["time_s"], ours["time_s"]) if ours else float("nan")
            t.add_row(names[key], _fmt_times(m), _fmt_mib(m["step_peak_extra_mib"]), f"{mem_r:.2f}x", f"{time_r:.2f}x")
        console.print(t)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, kl, liger = results["train_step"], results["kl"], results.get("liger") or {}
    panels = 3 + bool(liger.get("runs"))
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 4))

    def bars(ax, names, values, title, ylabel, colors):
        rects = ax.bar(names, values, color=colors)
        ax.bar_label(rects, fmt="%.4g", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel)
        ax.tick_params(axis="x", labelsize=8)

    names = ["distill", "fine-tune"]
    d, f = train["distill"], train["finetune"]
    bars(axes[0], names, [d["time_s"], f["time_s"]],
         f"step time ({train['ratio']['time']:.2f}x)", "median seconds", ["tab:blue", "tab:gray"])
    ax = axes[1]
    state = [d["state_mib"], f["state_mib"]]
    extra = [d["step_peak_extra_mib"], f["step_peak_extra_mib"]]
    ax.bar(names, state, color="lightsteelblue", label="state (models, optimizer)")
    rects = ax.bar(names, extra, bottom=state, color=["tab:blue", "tab:gray"], label="step peak extra")
    ax.bar_label(rects, labels=[f"{s + e:.0f}" for s, e in zip(state, extra)], fontsize=8)
    ax.set_title(f"step peak memory (total {train['ratio']['total_peak']:.2f}x, "
                 f"extra {train['ratio']['step_peak_extra']:.2f}x)", fontsize=9)
    ax.set_ylabel("MiB")
    ax.legend(fontsize=7)
    bars(axes[2], ["naive", f"chunked ({kl['chunk_size']})"],
         [kl["naive"]["step_peak_extra_mib"], kl["chunked"]["step_peak_extra_mib"]],
         f"KL peak extra, N={kl['tokens']}, V={kl['vocab']:,} ({kl['ratio']['step_peak_extra']:.1f}x)",
         "MiB", ["tab:red", "tab:green"])
    if liger.get("runs"):
        runs = {k: m for k, m in liger["runs"].items() if "error" not in m}
        bars(axes[3], list(runs), [m["step_peak_extra_mib"] for m in runs.values()],
             f"fused linear, N={liger['tokens']}: peak extra", "MiB", ["tab:green", "tab:purple", "tab:orange"][: len(runs)])
    fig.suptitle(f"bench_train on {results['meta']['device']}, {_dtype_label(results['shape'])}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def liger_available() -> str | None:
    """None if liger_kernel can be imported, else why not (checked without importing torch here)."""
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel is not installed (pip install liger-kernel); only our chunked divergence was measured"
    return None


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--model-config", default=None,
                        help=f"model config JSON (default {DEFAULT_MODEL_CONFIG}, else built-in Qwen3-0.6B)")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers (default: 2 on CPU, the config's on CUDA)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 128 CPU, 1024 CUDA)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 2 CPU, 4 CUDA)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                        help="teacher/student weights and logits (default auto: bfloat16 where the device "
                             "computes it natively, else float32)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="distill.chunk_size of the objective (default 1024)")
    parser.add_argument("--tokens", type=int, default=None, help="KL response tokens N (default 512; --quick 32)")
    parser.add_argument("--vocab", type=int, default=None, help="KL vocabulary (default 151936; --quick 1000)")
    parser.add_argument("--kl-chunk", type=int, default=128, help="distill_sums chunk size for the KL comparison")
    parser.add_argument("--logit-tokens", type=int, default=None,
                        help="logit-loss comparison rows (default 4096 = 4 x 1024; --quick 64)")
    parser.add_argument("--logit-seq", type=int, default=1024, help="tokens per sequence there (EAKLD's means)")
    parser.add_argument("--logit-hidden", type=int, default=None, help="hidden size there (default the model's)")
    parser.add_argument("--logit-naive-tokens", type=int, default=None,
                        help="rows for the naive logit loss (default: --logit-tokens on CUDA, 1024 on CPU; 0 skips)")
    parser.add_argument("--logit-warmup", type=int, default=0, help="untimed logit-loss steps (default 0)")
    parser.add_argument("--logit-repeats", type=int, default=1, help="timed logit-loss steps (default 1)")
    parser.add_argument("--no-logit-loss", action="store_true", help="skip the logit-loss comparison")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before measuring (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps; the median is reported (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each child")
    parser.add_argument("--liger", action="store_true", help="also measure liger_kernel's fused linear JSD / CE (CUDA)")
    parser.add_argument("--start-method", default=None, choices=["spawn", "forkserver"],
                        help="how measurement processes start (default spawn: a fresh interpreter each; --quick: "
                             "forkserver, which imports torch/transformers once and forks a fresh child per measurement)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shape (hidden 64, vocab 1000, 1 layer, N=32, 2 x 16 tokens, 2 repeats)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"results JSON (default {DEFAULT_OUT}); PNG beside it")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.quick:
        args.seq = args.seq or 16
        args.batch = args.batch or 2
        args.tokens = args.tokens or 32
        args.vocab = args.vocab or QUICK_SHAPE["vocab_size"]
        args.repeats = min(args.repeats, 2)
        args.logit_tokens = args.logit_tokens or 64
        args.logit_seq = min(args.logit_seq, 16)
        args.logit_naive_tokens = 64 if args.logit_naive_tokens is None else args.logit_naive_tokens
        args.start_method = args.start_method or "forkserver"
    else:
        if args.layers is None and not cuda:
            args.layers = 2
        args.seq = args.seq or (1024 if cuda else 128)
        args.batch = args.batch or (4 if cuda else 2)
        args.tokens = args.tokens or 512
        args.vocab = args.vocab or 151936
        args.logit_tokens = args.logit_tokens or 4096
        if args.logit_naive_tokens is None:
            args.logit_naive_tokens = args.logit_tokens if cuda else min(args.logit_tokens, 1024)
    args.start_method = args.start_method or "spawn"
    for name in ("seq", "batch", "tokens", "vocab", "kl_chunk", "repeats", "chunk_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    if args.seq < 2:
        raise SystemExit("--seq must be at least 2 (next-token prediction)")
    return args


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = parse_args(argv)
    console = Console(width=max(Console().width, 110))
    shape = model_shape(args)
    ctx = mp.get_context(args.start_method)
    if args.start_method == "forkserver":
        ctx.set_forkserver_preload(["torch", "transformers", "edgerazor", "edgerazor.distill.objective"])
    try:
        machine = run_child(ctx, "precision", {"device": args.device, "threads": args.threads}, "precision check",
                            console)
    except ChildError as exc:
        console.print(f"[red]bench_train failed:[/red] {exc}")
        return 2
    from edgerazor.precision import summary_line

    console.print(f"machine: {summary_line(machine)}")
    if args.dtype == "auto":
        args.dtype = "bfloat16" if machine["bfloat16"]["native"] else "float32"
    native = args.dtype == "float32" or bool(machine[args.dtype]["native"])
    if not native:
        console.print(f"[yellow]--dtype {args.dtype}: not native on this device; torch's scalar fallback is "
                      f"measured (labelled emulated)[/yellow]")
    common = {"device": args.device, "dtype": args.dtype, "threads": args.threads,
              "warmup": args.warmup, "repeats": args.repeats}
    train_spec = {**common, "model": shape, "batch": args.batch, "seq": args.seq,
                  "group_size": group_size(shape), "chunk_size": args.chunk_size}
    kl_spec = {**common, "tokens": args.tokens, "vocab": args.vocab, "chunk_size": args.kl_chunk, "w_forward": 0.5}

    try:
        distill = run_child(ctx, "train", {**train_spec, "mode": "distill"}, "distill step", console)
        finetune = run_child(ctx, "train", {**train_spec, "mode": "finetune"}, "fine-tune step", console)
        naive = run_child(ctx, "kl", {**kl_spec, "mode": "naive"}, "naive KL", console)
        chunked = run_child(ctx, "kl", {**kl_spec, "mode": "chunked"}, "chunked KL", console)
    except ChildError as exc:
        console.print(f"[red]bench_train failed:[/red] {exc}")
        return 2

    logit_loss = None
    if not args.no_logit_loss:
        hidden = args.logit_hidden or shape["hidden_size"]
        ll_spec = {**common, "warmup": args.logit_warmup, "repeats": args.logit_repeats, "vocab": args.vocab,
                   "hidden": hidden, "seq": min(args.logit_seq, args.logit_tokens), "chunk_size": args.kl_chunk}
        logit_loss = {"tokens": args.logit_tokens, "naive_tokens": args.logit_naive_tokens, "hidden": hidden,
                      "vocab": args.vocab, "dtype": args.dtype, "chunk_size": args.kl_chunk,
                      "seq": ll_spec["seq"], "runs": {}}
        plan = [("fused", args.logit_tokens), ("chunked", args.logit_tokens), ("naive", args.logit_naive_tokens)]
        for mode, tokens in plan:
            if tokens < 1:
                continue
            label = f"logit loss {mode} (N={tokens})"
            try:
                logit_loss["runs"][mode] = run_child(ctx, "logit_loss", {**ll_spec, "tokens": tokens, "mode": mode,
                                                                         "seq": min(ll_spec["seq"], tokens)},
                                                     label, console)
            except ChildError as exc:
                console.print(f"[yellow]{label} failed: {exc}[/yellow]")
                logit_loss["runs"][mode] = {"error": str(exc).splitlines()[0]}
        f, c = logit_loss["runs"].get("fused", {}), logit_loss["runs"].get("chunked", {})
        if "loss" in f and "loss" in c:
            def rel(a, b):
                return abs(a - b) / max(abs(b), 1e-30)

            logit_loss["check"] = {"loss_rel_diff": rel(f["loss"], c["loss"]),
                                   "grad_hidden_rel_diff": rel(f["grad_norm_hidden"], c["grad_norm_hidden"]),
                                   "grad_weight_rel_diff": rel(f["grad_norm_weight"], c["grad_norm_weight"])}
            logit_loss["ratio"] = {"step_peak_extra": ratio(f["step_peak_extra_mib"], c["step_peak_extra_mib"]),
                                   "time": ratio(f["time_s"], c["time_s"])}

    liger = None
    if args.liger:
        reason = None if args.device.startswith("cuda") else "Liger's Triton kernels need --device cuda"
        reason = reason or liger_available()
        if reason:
            console.print(f"[yellow]--liger: {reason}[/yellow]")
            liger = {"skipped": reason}
        else:
            liger_spec = {**common, "tokens": args.tokens, "vocab": args.vocab, "hidden": shape["hidden_size"],
                          "chunk_size": args.kl_chunk}
            liger = {"tokens": args.tokens, "vocab": args.vocab, "hidden": shape["hidden_size"], "dtype": args.dtype,
                     "chunk_size": args.kl_chunk, "runs": {}}
            for mode, label in (("ours", "ours (matmul + chunked)"), ("jsd", "Liger fused linear JSD"),
                                ("flce", "Liger fused linear CE")):
                try:
                    liger["runs"][mode] = run_child(ctx, "liger", {**liger_spec, "mode": mode}, label, console)
                except ChildError as exc:
                    console.print(f"[yellow]{label} failed: {exc}[/yellow]")
                    liger["runs"][mode] = {"error": str(exc).splitlines()[0]}

    rtol = 1e-4
    loss_diff = abs(naive["loss"] - chunked["loss"])
    loss_rel = loss_diff / max(abs(naive["loss"]), 1e-12)
    grad_diff = abs(naive["grad_norm"] - chunked["grad_norm"])
    grad_rel = grad_diff / max(abs(naive["grad_norm"]), 1e-12)
    versions = {}
    for pkg in ("torch", "transformers", "liger_kernel"):
        try:
            from importlib.metadata import version

            versions[pkg] = version(pkg.replace("_", "-"))
        except Exception:  # noqa: BLE001 - not installed
            versions[pkg] = None
    results = {
        "meta": {
            "device": args.device, "platform": platform.platform(), "python": platform.python_version(),
            "versions": versions, "cpu_count": os.cpu_count(), "threads": args.threads,
            "start_method": args.start_method, "warmup": args.warmup, "repeats": args.repeats,
            "precision": machine, "machine": summary_line(machine),
            "quick": args.quick, "argv": sys.argv[1:] if argv is None else list(argv),
            "memory": "peak RSS (ru_maxrss after a clear_refs reset) minus RSS before the step" if args.device == "cpu"
            else "torch.cuda.max_memory_allocated minus memory_allocated before the step",
        },
        "shape": {**{k: shape[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size",
                                            "num_attention_heads", "num_key_value_heads", "head_dim")},
                  "model_config": str(args.model_config or (DEFAULT_MODEL_CONFIG if not args.quick else "--quick")),
                  "batch": args.batch, "seq": args.seq, "dtype": args.dtype, "dtype_native": native,
                  "scheme": "W1.88-A8-KV8",
                  "group_size": train_spec["group_size"], "objective_chunk_size": args.chunk_size,
                  "student_params": finetune["params"]},
        "train_step": {
            "distill": distill, "finetune": finetune,
            "ratio": {  # distill / fine-tune
                "time": ratio(distill["time_s"], finetune["time_s"]),
                "state": ratio(distill["state_mib"], finetune["state_mib"]),
                "step_peak_extra": ratio(distill["step_peak_extra_mib"], finetune["step_peak_extra_mib"]),
                "total_peak": ratio(distill["total_peak_mib"], finetune["total_peak_mib"]),
            },
        },
        "kl": {
            "tokens": args.tokens, "vocab": args.vocab, "dtype": args.dtype, "chunk_size": args.kl_chunk,
            "w_forward": kl_spec["w_forward"], "naive": naive, "chunked": chunked,
            "ratio": {  # naive / chunked
                "time": ratio(naive["time_s"], chunked["time_s"]),
                "step_peak_extra": ratio(naive["step_peak_extra_mib"], chunked["step_peak_extra_mib"]),
                "total_peak": ratio(naive["total_peak_mib"], chunked["total_peak_mib"]),
            },
            "loss_check": {"naive": naive["loss"], "chunked": chunked["loss"], "abs_diff": loss_diff,
                           "rel_diff": loss_rel, "rtol": rtol, "match": loss_rel <= rtol},
            "grad_check": {"naive": naive["grad_norm"], "chunked": chunked["grad_norm"], "abs_diff": grad_diff,
                           "rel_diff": grad_rel},
        },
    }
    if liger is not None:
        results["liger"] = liger
    if logit_loss is not None:
        results["logit_loss"] = logit_loss

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, allow_nan=True) + "\n")
    png = out.with_suffix(".png")
    plot(results, png)
    render(results, console)
    console.print(f"wrote {out} and {png}")
    if not results["kl"]["loss_check"]["match"]:
        console.print("[red]naive and chunked KL losses differ beyond float32 tolerance[/red]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
