"""Reading a GGUF file safely and checking it against what it must contain.

gguf-py's ``GGUFReader`` trusts the file: a damaged count or array length makes it loop for a very
long time or fail with an arbitrary exception. ``read_gguf`` first walks the header with bounds
checks (every length within the file, known value and tensor types, tensor data inside the data
section, aligned and not overlapping), then hands the file to ``GGUFReader``; any failure is a
``GGUFFormatError``. ``check_gguf`` also compares the tensors (name, type, shape, bytes, sha256)
and key/values with an expectation: the exporter checks its own file this way before renaming it
into place, and a file read back later can be checked against a saved expectation.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgerazor.errors import GGUFFormatError
from edgerazor.export.gguf.report import gguf_module

#: the key every GGUF file EdgeRazor writes carries (its version): how ``--overwrite`` recognises one
EXPORTER_KEY = "edgerazor.version"
MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4
#: GGUF value type -> bytes of one scalar (8 is a string, 9 an array)
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


@dataclass(frozen=True)
class ExpectedTensor:
    """What one tensor of a GGUF file must be (shape in PyTorch order: ``[d_out, d_in]``)."""

    ggml_type: str
    shape: tuple[int, ...]
    n_bytes: int
    sha256: str | None = None


class _Walker:
    """Bounds-checked reads over the file's bytes; every overrun is a GGUFFormatError naming the offset."""

    def __init__(self, data, file: Path) -> None:
        self.data, self.file, self.pos = data, file, 0

    def fail(self, what: str) -> GGUFFormatError:
        return GGUFFormatError(f"{self.file}: {what} (byte {self.pos}): the file is truncated or corrupted")

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"{what} runs past the end of the file")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def string(self, what: str) -> str:
        raw = self.take(self.u64(f"{what} length"), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALAR_BYTES:
            return self.take(_SCALAR_BYTES[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY or depth > 1:
            raise self.fail(f"{what} has the unknown value type {vtype}")
        itype, count = self.u32(f"{what} item type"), self.u64(f"{what} length")
        smallest = _SCALAR_BYTES.get(itype, 8 if itype == _STRING else 12)
        if count * smallest > self.remaining():
            raise self.fail(f"{what} claims {count} items, more than the file holds")
        if itype in _SCALAR_BYTES:
            return self.take(count * _SCALAR_BYTES[itype], what)
        return [self.value(itype, what, depth + 1) for _ in range(count)]


def _walk(data, file: Path) -> None:
    """Check the header's structure before gguf-py reads it."""
    gguf = gguf_module()
    w = _Walker(data, file)
    if w.take(4, "the magic") != MAGIC:
        raise GGUFFormatError(f"{file} is not a GGUF file (its first bytes are not 'GGUF')")
    version = w.u32("the version")
    if version not in VERSIONS:
        raise w.fail(f"GGUF version {version} is not one of {VERSIONS}")
    n_tensors, n_kv = w.u64("the tensor count"), w.u64("the key/value count")
    if n_kv * 13 + n_tensors * 32 > w.remaining():  # the smallest key/value and tensor info
        raise w.fail(f"{n_tensors} tensors and {n_kv} key/values cannot fit in the file")
    keys, alignment = set(), gguf.GGUF_DEFAULT_ALIGNMENT
    for i in range(n_kv):
        key = w.string(f"key {i}")
        if key in keys:
            raise w.fail(f"key {key!r} appears twice")
        keys.add(key)
        vtype = w.u32(f"the type of {key!r}")
        raw = w.value(vtype, f"the value of {key!r}")
        if key == "general.alignment":
            alignment = struct.unpack("<I", raw)[0] if vtype == _UINT32 else 0
            if alignment == 0 or alignment & (alignment - 1):
                raise w.fail("general.alignment must be a uint32 power of two")
    sizes = gguf.GGML_QUANT_SIZES
    infos, names = [], set()
    for i in range(n_tensors):
        name = w.string(f"tensor name {i}")
        if name in names:
            raise w.fail(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = w.u32(f"the dimension count of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise w.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        dims = [w.u64(f"a dimension of {name!r}") for _ in range(n_dims)]
        raw_type = w.u32(f"the type of {name!r}")
        offset = w.u64(f"the data offset of {name!r}")
        try:
            ggml_type = gguf.GGMLQuantizationType(raw_type)
            block, type_bytes = sizes[ggml_type]
        except (ValueError, KeyError):
            raise w.fail(f"tensor {name!r} has the unknown type {raw_type}") from None
        if min(dims) < 1 or dims[0] % block or any(d > len(data) * block for d in dims):
            raise w.fail(f"tensor {name!r} has the impossible shape {dims} for {ggml_type.name}")
        n_bytes = int(np.prod(dims, dtype=object)) // block * type_bytes
        infos.append((offset, n_bytes, name))
    start = w.pos + (-w.pos % alignment)
    end = 0
    for offset, n_bytes, name in sorted(infos):
        if offset % alignment or offset < end or start + offset + n_bytes > len(data):
            raise GGUFFormatError(f"{file}: the data of tensor {name!r} lies outside the data section or overlaps "
                                  "another tensor: the file is truncated or corrupted")
        end = offset + n_bytes


def read_gguf(path: str | Path):
    """gguf-py's ``GGUFReader`` over ``path`` once its header passed the bounds checks; GGUFFormatError otherwise."""
    gguf = gguf_module()
    path = Path(path)
    try:
        with path.open("rb") as f:
            if path.stat().st_size == 0:
                raise GGUFFormatError(f"{path} is empty: not a GGUF file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                _walk(data, path)
        return gguf.GGUFReader(path)
    except GGUFFormatError:
        raise
    except OSError as exc:
        raise GGUFFormatError(f"{path} cannot be read: {exc.strerror or exc}") from None
    except Exception as exc:  # what gguf-py raises on a header the walk let through
        raise GGUFFormatError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None


def field_values(reader) -> dict[str, Any]:
    """Every key/value of the file as Python values (gguf-py's own header entries left out)."""
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def tensor_expectations(reader) -> dict[str, ExpectedTensor]:
    """Name -> type, shape, bytes and sha256 of every tensor of a file (the expectation for a later check)."""
    return {t.name: ExpectedTensor(t.tensor_type.name, tuple(int(d) for d in reversed(t.shape.tolist())),
                                   int(t.n_bytes), hashlib.sha256(np.ascontiguousarray(t.data).view(np.uint8)).hexdigest())
            for t in reader.tensors}


def _same(read: Any, expected: Any) -> bool:
    if isinstance(expected, np.ndarray):
        expected = expected.tolist()
    if isinstance(expected, (list, tuple)):
        return isinstance(read, list) and len(read) == len(expected) and all(map(_same, read, expected))
    if isinstance(expected, (bool, np.bool_)) or isinstance(read, bool):
        return isinstance(read, bool) and isinstance(expected, (bool, np.bool_)) and read == bool(expected)
    if isinstance(expected, (float, np.floating)) or isinstance(read, float):
        return isinstance(read, (int, float)) and np.float32(read) == np.float32(expected)
    if isinstance(expected, (int, np.integer)):
        return isinstance(read, int) and read == int(expected)
    return isinstance(read, str) and isinstance(expected, str) and read == expected


def _same_names(path: Path, what: str, expected: Mapping[str, Any], read: Mapping[str, Any]) -> list[str]:
    """The names, sorted, after refusing one that was written but is not read back, or read but never written."""
    for name in sorted(set(expected) | set(read)):
        if name not in read:
            raise GGUFFormatError(f"{path} has no {what} {name!r}")
        if name not in expected:
            raise GGUFFormatError(f"{path} holds the unexpected {what} {name!r}")
    return sorted(expected)


def check_gguf(path: str | Path, tensors: Mapping[str, ExpectedTensor] | None = None,
               metadata: Mapping[str, Any] | None = None):
    """``read_gguf(path)``, then every tensor and key/value against the expectations given; returns the reader."""
    path = Path(path)
    reader = read_gguf(path)
    if tensors is not None:
        got = tensor_expectations(reader)
        for name in _same_names(path, "tensor", tensors, got):
            want, have = tensors[name], got[name]
            for key in ("ggml_type", "shape", "n_bytes"):
                if getattr(want, key) != getattr(have, key):
                    raise GGUFFormatError(f"{path}: tensor {name!r} has {key} {getattr(have, key)!r}, expected "
                                          f"{getattr(want, key)!r}")
            if want.sha256 is not None and want.sha256 != have.sha256:
                raise GGUFFormatError(f"{path}: the data of tensor {name!r} differs from what was written (sha256 "
                                      f"{have.sha256[:12]}..., expected {want.sha256[:12]}...): the file is corrupted")
    if metadata is not None:
        got_kv = field_values(reader)
        for key in _same_names(path, "key", metadata, got_kv):
            if not _same(got_kv[key], metadata[key]):
                raise GGUFFormatError(f"{path}: key {key!r} differs from what was written")
    return reader


def not_an_edgerazor_gguf(path: Path) -> str | None:
    """None when ``path`` is a GGUF file EdgeRazor wrote (it carries ``EXPORTER_KEY``); else why not."""
    if not path.is_file():
        return "it is not a file"
    try:
        reader = read_gguf(path)
    except GGUFFormatError:
        return "it is not a readable GGUF file"
    field = reader.get_field(EXPORTER_KEY)
    if field is None:
        return f"it has no {EXPORTER_KEY} key"
    return None
