"""What a GGUF export wrote: one entry per tensor with its type, bytes and bits per weight, and notes."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgerazor.errors import EdgeRazorError


def gguf_module():
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise EdgeRazorError("GGUF export needs gguf-py: pip install 'edgerazor[export]' (or pip install gguf)") from exc
    return gguf


@dataclass
class GGUFTensor:
    name: str  # GGUF tensor name, e.g. "blk.0.attn_q.weight"
    source: str  # the model parameter it came from
    ggml_type: str  # "Q4_0", "TQ2_0", "TQ1_0", "Q8_0", "F32"
    shape: tuple[int, ...]  # PyTorch order ([d_out, d_in] for matrices)
    n_bytes: int
    bits_per_weight: float
    theoretical_bits: float | None = None  # our format: mean row bits + 16 / G (None if unquantized)
    fallback: bool = False  # lossless, but in a wider type than the tensor's own precision (see notes)


@dataclass
class GGUFReport:
    path: Path
    arch: str
    tokenizer_pre: str
    tensors: list[GGUFTensor] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    file_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data (the file adds metadata, vocabulary and alignment padding)."""
        return sum(t.n_bytes for t in self.tensors)

    @property
    def types(self) -> dict[str, str]:
        return {t.name: t.ggml_type for t in self.tensors}

    def bits_per_weight(self, matrices_only: bool = True) -> float:
        chosen = [t for t in self.tensors if not matrices_only or len(t.shape) == 2]
        n = sum(int(np.prod(t.shape)) for t in chosen)
        return 8.0 * sum(t.n_bytes for t in chosen) / max(n, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "arch": self.arch, "tokenizer_pre": self.tokenizer_pre,
            "total_bytes": self.total_bytes, "file_bytes": self.file_bytes, "notes": list(self.notes),
            "compression_vs_bf16": self.bf16_bytes / self.file_bytes if self.file_bytes else 0.0,
            # the same keys as the packed format's size report, so one table prints both
            "tensors": [asdict(t) | {"kind": t.ggml_type, "bytes": t.n_bytes} for t in self.tensors],
        }

    @property
    def bf16_bytes(self) -> int:
        """The same tensors in BF16 (2 bytes per weight)."""
        return sum(2 * math.prod(t.shape) for t in self.tensors)

    def table(self):
        from rich.table import Table

        table = Table(title=f"GGUF {self.path.name} ({self.arch}, pre={self.tokenizer_pre})")
        for col in ("tensor", "type", "shape", "bytes", "bits/w", "theory"):
            table.add_column(col)
        for t in self.tensors:
            theory = "-" if t.theoretical_bits is None else f"{t.theoretical_bits:.3f}"
            table.add_row(t.name, t.ggml_type, "x".join(map(str, t.shape)), str(t.n_bytes),
                          f"{t.bits_per_weight:.3f}", theory)
        return table


    def fallback_summary(self) -> list[dict[str, Any]]:
        """Tensors written losslessly in a wider type than their own precision, grouped by written type and
        own bits/weight: how many, and the bytes they cost beyond their own size."""
        groups: dict[tuple[str, float], dict[str, Any]] = {}
        for t in self.tensors:
            if not t.fallback or t.theoretical_bits is None:
                continue
            own = t.theoretical_bits * math.prod(t.shape) / 8
            row = groups.setdefault((t.ggml_type, round(t.theoretical_bits, 3)), {
                "ggml_type": t.ggml_type, "own_bits_per_weight": t.theoretical_bits,
                "bits_per_weight": t.bits_per_weight, "tensors": 0, "n_bytes": 0, "own_bytes": 0.0,
            })
            row["tensors"] += 1
            row["n_bytes"] += t.n_bytes
            row["own_bytes"] += own
        for row in groups.values():
            row["extra_bytes"] = round(row["n_bytes"] - row["own_bytes"])
        return sorted(groups.values(), key=lambda r: -r["extra_bytes"])

    def fallback_table(self):
        """``fallback_summary`` as one table (None without fallbacks); each tensor's reason is in ``notes``."""
        rows = self.fallback_summary()
        if not rows:
            return None
        from rich.table import Table

        count = sum(r["tensors"] for r in rows)
        extra = sum(r["extra_bytes"] for r in rows)
        table = Table(title=f"GGUF lossless fallbacks: {count} tensors, +{extra:,} bytes "
                            "(each tensor's reason is in the report's notes; strict refuses them)")
        for col in ("written as", "tensors", "own bits/w", "written bits/w", "bytes", "extra bytes", "size"):
            table.add_column(col, justify="left" if col == "written as" else "right")
        for r in rows:
            table.add_row(r["ggml_type"], str(r["tensors"]), f"{r['own_bits_per_weight']:.3f}",
                          f"{r['bits_per_weight']:.3f}", f"{r['n_bytes']:,}", f"+{r['extra_bytes']:,}",
                          f"{r['n_bytes'] / r['own_bytes']:.2f}x")
        return table


def read_report(path: str | Path) -> GGUFReport:
    """The size report of a GGUF file read back from the file (types, shapes and bytes per tensor).

    What only the writer knows (source parameters, theoretical bits, notes) is left empty.
    """
    gguf = gguf_module()
    path = Path(path)
    reader = gguf.GGUFReader(path)

    def text(key: str) -> str:
        field = reader.get_field(key)
        return str(field.contents()) if field is not None else ""

    report = GGUFReport(path, text("general.architecture"), text("tokenizer.ggml.pre"),
                        file_bytes=path.stat().st_size)
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists ne0 (the row length) first
        report.tensors.append(GGUFTensor(t.name, "", t.tensor_type.name, shape, int(t.n_bytes),
                                         8.0 * int(t.n_bytes) / max(int(t.n_elements), 1)))
    return report
