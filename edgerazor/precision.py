"""Which floating-point dtypes this device computes natively, and what a model should compute in.

On a CPU without bfloat16 / float16 instructions torch falls back to a scalar GEMM: a half-precision
matmul runs ~100x slower than float32 (2.8 s against 23 ms for 256x1024 @ 1024x3072 on an AVX2
CPU). A recipe written for GPUs (``model.dtype: bfloat16``, ``train.bf16: true``) or a bf16
checkpoint would then run 100x longer without a word. This module is the one place that decides:

* ``probe()`` reads what the device says about itself (torch's CPU capability and the CPU's flags,
  or the CUDA device's compute capability) into a ``Capability``; tests pass their own instead;
* ``native(dtype)`` decides from it: conclusive flags first, else a short measured matmul
  (float32 against the half dtype, once per process);
* ``plan(stored)`` says what to compute in: the stored dtype where native (or when the caller
  insists, ``as_stored``), else float32, with a one-line reason that ``announce`` prints once.

The stored dtype still decides what is saved and exported; only the arithmetic changes.
torch is imported lazily, so importing this module costs nothing.
"""

from __future__ import annotations

import functools
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgerazor.errors import EdgeRazorError

HALF = ("bfloat16", "float16")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
#: ``auto``: the stored dtype where the device computes it natively, else float32; ``as_stored``: always stored
COMPUTE_MODES = ("auto", "as_stored")

#: CPU flags (/proc/cpuinfo) that mean a native matmul in the dtype (AVX-NE-CONVERT: AVX2-VNNI-2 CPUs)
NATIVE_FLAGS = {
    "bfloat16": ("avx512_bf16", "amx_bf16", "avx_ne_convert"),
    "float16": ("avx512_fp16", "amx_fp16", "avx_ne_convert"),
}
#: how the reason names the instructions a CPU lacks
MISSING_WORDS = {"bfloat16": "no AVX512-BF16/AMX", "float16": "no AVX512-FP16/AMX"}
#: a half-precision matmul this many times slower than float32 is the scalar fallback, not native
EMULATED_RATIO = 8.0
_X86 = ("x86_64", "amd64", "i386", "i686", "x86")


@dataclass(frozen=True)
class Capability:
    """What a device says about itself, enough to decide without running anything.

    ``isa``: ``torch.backends.cpu.get_cpu_capability()`` on a CPU (``DEFAULT``, ``AVX2``, ``AVX512``,
    ``SVE256``, ...), ``sm_XY`` on CUDA. ``flags``: the CPU's feature flags, None where unknown.
    """

    device: str = "cpu"
    isa: str = "DEFAULT"
    flags: frozenset[str] | None = field(default=None, repr=False)
    machine: str = ""
    cpu_name: str = ""
    cuda_capability: tuple[int, int] | None = None
    cuda_bf16: bool | None = None

    @property
    def x86(self) -> bool:
        return self.machine.lower() in _X86 or self.isa.upper() in ("AVX2", "AVX512", "AVX512_BF16")

    def words(self, dtype: str | None = None) -> str:
        """``AVX2, no AVX512-BF16/AMX``: the capability and, for ``dtype``, the native flags found or missing."""
        if self.device != "cpu":
            return f"{self.cpu_name or self.device}, compute capability {self.isa}"
        text = self.isa
        if dtype in NATIVE_FLAGS and self.flags is not None:
            found = [f.upper().replace("_", "-") for f in NATIVE_FLAGS[dtype] if f in self.flags]
            text += ", " + ("/".join(found) if found else MISSING_WORDS[dtype])
        return text


def _cpu_info(path: Path = Path("/proc/cpuinfo")) -> tuple[frozenset[str] | None, str]:
    """(feature flags, model name) of the first CPU in ``path``; (None, "") where it cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None, ""
    flags: frozenset[str] | None = None
    name = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and flags is None:
            flags = frozenset(value.split())
        elif key in ("model name", "cpu model") and not name:
            name = value.strip()
        if flags is not None and name:
            break
    return flags, name


@functools.lru_cache(maxsize=None)
def probe(device: str = "cpu") -> Capability:
    """This machine's capability for ``device`` (``cpu`` or ``cuda[:N]``), read once per process."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EdgeRazorError(f"device {device!r}: CUDA is not available here; use cpu")
        index = torch.device(device).index or 0
        major, minor = torch.cuda.get_device_capability(index)
        try:
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # a torch without the keyword
            bf16 = torch.cuda.is_bf16_supported()
        return Capability("cuda", f"sm_{major}{minor}", None, platform.machine(), torch.cuda.get_device_name(index),
                          (major, minor), bf16)
    flags, name = _cpu_info()
    return Capability("cpu", torch.backends.cpu.get_cpu_capability(), flags, platform.machine(), name)


@functools.lru_cache(maxsize=None)
def measure_ratio(dtype: str, device: str = "cpu") -> float:
    """Best time of a 256x512 @ 512x512 matmul in ``dtype`` over float32's, once per process.

    The scalar fallback is ~100x slower than float32; a native (or well converted) half matmul is
    about as fast or faster. One thread, and the two dtypes in alternating rounds with the best
    time of each kept: other processes on the machine can only inflate a time, and then both.
    Costs well under a second either way.
    """
    import time

    import torch

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(256, 512, generator=generator).to(device)
    b = torch.randn(512, 512, generator=generator).to(device)
    pairs = {"float32": (a, b), dtype: (a.to(getattr(torch, dtype)), b.to(getattr(torch, dtype)))}
    best = {name: float("inf") for name in pairs}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for round_ in range(4):  # round 0 warms up
                for name, (x, y) in pairs.items():
                    for _ in range(3 if name == "float32" else 1):
                        start = time.perf_counter()
                        x @ y
                        if device.startswith("cuda"):
                            torch.cuda.synchronize()
                        if round_:
                            best[name] = min(best[name], time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return best[dtype] / max(best["float32"], 1e-9)


@dataclass(frozen=True)
class Support:
    """Whether a device computes ``dtype`` natively, and the evidence in words."""

    dtype: str
    native: bool
    evidence: str  # "AVX2, no AVX512-BF16/AMX", "AVX512, AVX512-BF16", "measured 160x float32's time"
    measured: float | None = None  # half time / float32 time, when it was measured
    capability: Capability = field(default_factory=Capability, compare=False, repr=False)

    def why_not(self) -> str:
        """The clause of the warning: why this dtype is not computed natively here."""
        kind = "CPU" if self.capability.device == "cpu" else "GPU"
        if self.measured is not None:
            return (f"a {self.dtype} matmul on this {kind} ({self.capability.words(self.dtype)}) measured "
                    f"{self.measured:.0f}x slower than float32")
        return f"this {kind} ({self.evidence}) has no native {self.dtype} matmul, which runs ~100x slower"


def native(dtype: str, capability: Capability | None = None,
           measure: Callable[[str], float] | None = None) -> Support:
    """Whether ``capability``'s device (default: this machine's CPU) computes ``dtype`` natively.

    CPU: a native flag of the dtype decides yes; an x86 CPU without AVX-512 and without those flags
    decides no; anything else (AVX-512 without the flag, where oneDNN may convert; other
    architectures; unknown flags) is measured with ``measure`` (default ``measure_ratio``).
    CUDA: bfloat16 needs compute capability 8.0 (torch's own check), float16 5.3.
    """
    if dtype not in FLOAT_DTYPES:
        raise EdgeRazorError(f"unknown dtype {dtype!r}; one of {', '.join(FLOAT_DTYPES)}")
    cap = capability if capability is not None else probe()
    if dtype == "float32":
        return Support(dtype, True, "float32 is native everywhere", capability=cap)
    if cap.device != "cpu":
        cc = cap.cuda_capability or (0, 0)
        ok = (cap.cuda_bf16 if cap.cuda_bf16 is not None else cc >= (8, 0)) if dtype == "bfloat16" else cc >= (5, 3)
        return Support(dtype, bool(ok), cap.words(dtype), capability=cap)
    if cap.flags is not None and cap.x86:
        if any(f in cap.flags for f in NATIVE_FLAGS[dtype]):
            return Support(dtype, True, cap.words(dtype), capability=cap)
        if "AVX512" not in cap.isa.upper() and "avx512bw" not in cap.flags:
            return Support(dtype, False, cap.words(dtype), capability=cap)
    ratio = (measure or measure_ratio)(dtype)
    words = f"{cap.words(dtype)}; measured {ratio:.1f}x float32's time"
    return Support(dtype, ratio < EMULATED_RATIO, words, ratio, capability=cap)


@dataclass(frozen=True)
class ComputePlan:
    """What a model stored in ``stored`` computes in here, and why (``autocast``: train.bf16 after the decision)."""

    stored: str
    compute: str
    autocast: bool = False
    requested_autocast: bool = False
    reason: str = ""
    stored_by: str = "the recipe's"
    insist: str = "--keep-dtype"

    @property
    def changed(self) -> bool:
        return self.compute != self.stored or self.autocast != self.requested_autocast

    def line(self) -> str | None:
        """The one warning line when the plan departs from what was asked, else None."""
        if not self.changed:
            return None
        what = []
        if self.compute != self.stored:
            what.append(f"computing in {self.compute}")
        if self.autocast != self.requested_autocast:
            what.append("training without bf16 autocast (train.bf16)")
        keeps = (f"; {self.stored_by} {self.stored} still decides what is stored and exported"
                 if self.compute != self.stored else "")
        return f"edgerazor: {' and '.join(what)}: {self.reason}{keeps} ({self.insist} to insist)"

    def record(self) -> dict[str, object]:
        """For results files: what was computed in and why."""
        return {"compute_dtype": self.compute, "compute_dtype_reason": self.reason, "stored_dtype": self.stored,
                "bf16_autocast": self.autocast}


def plan(stored: str, mode: str = "auto", autocast: bool = False, capability: Capability | None = None,
         measure: Callable[[str], float] | None = None, stored_by: str = "the recipe's",
         insist: str = "--keep-dtype") -> ComputePlan:
    """The dtype to compute a model stored in ``stored`` in, and whether bf16 autocast (``autocast``) stays on.

    ``mode`` ``auto``: ``stored`` where the device computes it natively, else float32 (and no
    autocast where bfloat16 is not native); ``as_stored``: exactly as asked. ``stored_by`` and
    ``insist`` word the warning (``the recipe's``, ``--keep-dtype``).
    """
    if mode not in COMPUTE_MODES:
        raise EdgeRazorError(f"compute dtype mode {mode!r}: use one of {', '.join(COMPUTE_MODES)}")
    if stored not in FLOAT_DTYPES:
        raise EdgeRazorError(f"unknown dtype {stored!r}; one of {', '.join(FLOAT_DTYPES)}")
    common = dict(stored=stored, requested_autocast=autocast, stored_by=stored_by, insist=insist)
    if mode == "as_stored":
        return ComputePlan(compute=stored, autocast=autocast, reason=f"{stored} as stored, as asked", **common)
    compute, keep_autocast, changed, kept = stored, autocast, [], []
    if stored in HALF:
        support = native(stored, capability, measure)
        if support.native:
            kept.append(f"{stored} is native here ({support.evidence})")
        else:
            compute = "float32"
            changed.append(support.why_not())
    if autocast:
        support = native("bfloat16", capability, measure)
        if not support.native:
            keep_autocast = False
            if not changed:
                changed.append(support.why_not())
    reason = "; ".join(changed or kept or ["float32 as stored"])
    return ComputePlan(compute=compute, autocast=keep_autocast, reason=reason, **common)


def compute_dtype_for(stored: str, requested: str = "auto", capability: Capability | None = None,
                      stored_by: str = "the model's", insist: str = "compute_dtype='as_stored'") -> str:
    """The dtype to compute a model stored in ``stored`` in, for loaders: a dtype name in ``requested``
    is taken as given; ``auto`` / ``as_stored`` go through ``plan``, and a change is announced."""
    if requested in FLOAT_DTYPES:
        return requested
    if requested not in COMPUTE_MODES:
        raise EdgeRazorError(f"compute_dtype {requested!r}: use one of {', '.join(COMPUTE_MODES + FLOAT_DTYPES)}")
    chosen = plan(stored, requested, capability=capability, stored_by=stored_by, insist=insist)
    announce(chosen)
    return chosen.compute


def cast_parameters(model, dtype: str, through: str | None = None):
    """``model`` with its floating parameters in ``dtype`` (rounded through ``through`` first, if given).

    Parameters only, as ``from_pretrained(dtype=...)`` loads them: ``Module.to(dtype)`` would also round
    float32 buffers such as RoPE's ``inv_freq``, and the model would no longer match a loaded one.
    """
    import torch

    target = getattr(torch, dtype)
    middle = getattr(torch, through) if through else None
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point() and (param.dtype != target or middle is not None):
                data = param.data.to(middle) if middle is not None else param.data
                param.data = data.to(target)
    return model


_announced: set[str] = set()


def announce(compute_plan: ComputePlan, stream=None) -> None:
    """Print the plan's warning line on stderr, once per process for the same line."""
    line = compute_plan.line()
    if line is None or line in _announced:
        return
    _announced.add(line)
    print(line, file=stream or sys.stderr, flush=True)


def summary(capability: Capability | None = None, measure: Callable[[str], float] | None = None) -> dict[str, object]:
    """This machine's capability and the decision for both half dtypes (benchmark headers and JSON)."""
    cap = capability if capability is not None else probe()
    out: dict[str, object] = {"device": cap.device, "cpu": cap.cpu_name, "machine": cap.machine, "capability": cap.isa}
    for dtype in HALF:
        s = native(dtype, cap, measure)
        out[dtype] = {"native": s.native, "evidence": s.evidence, "measured_ratio": s.measured}
    return out


def summary_line(info: dict[str, object]) -> str:
    """``CPU AMD EPYC (x86_64), torch capability AVX512: bfloat16 native (...), float16 emulated (...)``."""
    parts = []
    for dtype in HALF:
        d = info[dtype]
        parts.append(f"{dtype} {'native' if d['native'] else 'emulated'} ({d['evidence']})")
    where = f"{info['device'].upper()} {info['cpu'] or ''} ({info['machine']})".replace("  ", " ")
    return f"{where}, torch capability {info['capability']}: {', '.join(parts)}"


def default_dtype(device: str = "cpu", capability: Capability | None = None) -> str:
    """The half dtype a benchmark should use here: bfloat16 where native, else float32."""
    cap = capability if capability is not None else probe(device)
    return "bfloat16" if native("bfloat16", cap).native else "float32"


__all__ = ["COMPUTE_MODES", "Capability", "ComputePlan", "Support", "announce", "cast_parameters", "compute_dtype_for",
           "default_dtype", "measure_ratio", "native", "plan", "probe", "summary", "summary_line"]
