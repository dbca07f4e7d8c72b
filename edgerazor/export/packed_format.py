"""The packed format's files and every check a packed export passes before a model is built from it.

Layout (``FORMAT_VERSION`` 2): ``model.safetensors``, ``config.json``, the tokenizer files, and
``edgerazor_packed.json`` whose ``manifest`` lists every other file with its sha256 and size;
``edgerazor_packed.sha256`` holds the sha256 of ``edgerazor_packed.json`` itself (a ``sha256sum -c``
line). Checksums catch damage; the structural checks below hold even against forged checksums:
every expected tensor present and no other, dtypes and shapes from the codec and group size, known
codecs, ties only between identical layouts, the recipe and ``config.json`` consistent with the
layers. Every failure is a ``PackedFormatError`` naming the file and the key: a damaged or edited
export never loads as a different model and never ends in a raw ``KeyError`` or ``TypeError``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from edgerazor.errors import EdgeRazorError, PackedFormatError
from edgerazor.export import pack

FORMAT = "edgerazor-packed"
FORMAT_VERSION = 2
METADATA_FILE = "edgerazor_packed.json"
CHECKSUM_FILE = "edgerazor_packed.sha256"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
#: the tensors a packed layer stores under its name (``<layer>.<part>``)
PACKED_PARTS = frozenset({"codes_high", "codes_low", "scales", "mask"})
LAYER_KINDS = ("linear", "embedding", "conv3d")  # a conv3d row is its flattened kernel
#: the fields of a layer entry that describe its stored weight (a tie must agree on all of them)
WEIGHT_KEYS = ("kind", "d_out", "d_in", "padded_d_in", "group_size", "high", "low", "high_rows", "codec_high",
               "codec_low")
LAYER_KEYS = frozenset(WEIGHT_KEYS) | {"activation", "tied_to"}
ACTIVATION_KEYS = frozenset({"quantizer", "group_size", "padded_dim"})
KV_KEYS = frozenset({"quantizer", "group_size"})
#: files a version-1 export (no manifest) could hold: what ``save_pretrained`` of a config and tokenizer writes
V1_FILES = frozenset({WEIGHTS_FILE, METADATA_FILE, CONFIG_FILE, "generation_config.json", "chat_template.jinja",
                      "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                      *TOKENIZER_FILES})
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_CHECKSUM_LINE = re.compile(rf"([0-9a-f]{{64}})  {re.escape(METADATA_FILE)}\n?")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_of(root: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"sha256", "bytes"}}`` of every file under ``root`` but the metadata and its checksum."""
    manifest = {}
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root).as_posix()
        if rel not in (METADATA_FILE, CHECKSUM_FILE):
            manifest[rel] = {"sha256": sha256_file(file), "bytes": file.stat().st_size}
    return manifest


def checksum_line(metadata_bytes: bytes) -> str:
    """The content of ``CHECKSUM_FILE``: ``sha256sum -c`` verifies the metadata with it."""
    return f"{hashlib.sha256(metadata_bytes).hexdigest()}  {METADATA_FILE}\n"


def codec_of(quantizer, quantizer_name: str, layer: str) -> str:
    """The quantizer's declared ``codec``, else the generic ``sym{qmax}``: the plugin decides, not a table here."""
    try:
        return pack.codec_for(int(quantizer.qmax), getattr(quantizer, "codec", None))
    except ValueError as exc:
        raise EdgeRazorError(f"layer {layer!r}: quantizer {quantizer_name!r} cannot be packed: {exc}") from None


def packed_row_bytes(codec: str, n: int) -> int:
    """Bytes one row of ``n`` codes takes in ``codec`` (the last byte zero-filled)."""
    if codec in pack.CODECS:
        return -(-n // pack.CODECS[codec][2])
    return -(-n * pack.symmetric_width(pack.symmetric_qmax(codec)) // 8)


# ------------------------------------------------------------------------------------------------
# Reading JSON and typed keys without ever raising anything but PackedFormatError
# ------------------------------------------------------------------------------------------------


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def read_json(file: Path) -> dict[str, Any]:
    """A JSON object from ``file``; a missing, unreadable, non-UTF-8, invalid or non-object file is a PackedFormatError."""
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise PackedFormatError(f"{file} is missing: the export is incomplete; export it again") from None
    except OSError as exc:
        raise PackedFormatError(f"{file} cannot be read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PackedFormatError(f"{file} is not UTF-8 text (byte {exc.start}): the file is truncated or corrupted; "
                                "export it again") from None
    try:
        data = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise PackedFormatError(f"{file} is not valid JSON (truncated or corrupted export?): {exc}") from None
    if not isinstance(data, dict):
        raise PackedFormatError(f"{file}: the top level must be a JSON object, got {type(data).__name__}")
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _key(file: Path, where: str, key: str) -> str:
    return f"{file}: {where}{key}"


def _int(mapping: dict, key: str, file: Path, where: str = "", minimum: int = 0) -> int:
    if key not in mapping:
        raise PackedFormatError(f"{_key(file, where, key)} is missing")
    value = mapping[key]
    if not _is_int(value) or value < minimum:
        raise PackedFormatError(f"{_key(file, where, key)} must be an integer >= {minimum}, got {value!r}")
    return value


def _str(mapping: dict, key: str, file: Path, where: str = "", optional: bool = False) -> str | None:
    if key not in mapping:
        if optional:
            return None
        raise PackedFormatError(f"{_key(file, where, key)} is missing")
    value = mapping[key]
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise PackedFormatError(f"{_key(file, where, key)} must be a non-empty string, got {value!r}")
    return value


def _dict(mapping: dict, key: str, file: Path, where: str = "") -> dict:
    if key not in mapping:
        raise PackedFormatError(f"{_key(file, where, key)} is missing")
    value = mapping[key]
    if not isinstance(value, dict):
        raise PackedFormatError(f"{_key(file, where, key)} must be a JSON object, got {type(value).__name__}")
    return value


# ------------------------------------------------------------------------------------------------
# The export as read from disk
# ------------------------------------------------------------------------------------------------


@dataclass
class PackedExport:
    """What ``read_packed`` checked: the metadata, ``config.json``, the recipe and every stored tensor."""

    path: Path
    meta: dict[str, Any]
    config: dict[str, Any]
    recipe: Any  # edgerazor.recipe.Recipe
    tensors: dict[str, torch.Tensor]

    @property
    def layers(self) -> dict[str, dict[str, Any]]:
        return self.meta["layers"]

    @property
    def metadata_file(self) -> Path:
        return self.path / METADATA_FILE

    def owner(self, name: str) -> str:
        return self.layers[name].get("tied_to") or name

    def is_packed_part(self, tensor: str) -> bool:
        layer, _, part = tensor.rpartition(".")
        return layer in self.layers and part in PACKED_PARTS


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata of the export at ``path`` after its format and version checks (nothing else)."""
    file = path / METADATA_FILE
    if not file.is_file():
        raise PackedFormatError(f"{path} has no {METADATA_FILE}: it is not a packed export")
    meta = read_json(file)
    if meta.get("format") != FORMAT:
        raise PackedFormatError(f"{file}: format {meta.get('format')!r} is not {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION or not _is_int(meta.get("format_version")):
        raise PackedFormatError(
            f"{file}: format_version {meta.get('format_version')!r} is not supported "
            f"(this EdgeRazor reads version {FORMAT_VERSION}); re-export with a matching EdgeRazor"
        )
    return meta


def _check_metadata_checksum(path: Path) -> None:
    file = path / CHECKSUM_FILE
    try:
        line = file.read_bytes().decode("ascii")
    except FileNotFoundError:
        raise PackedFormatError(f"{path} has no {CHECKSUM_FILE}: the export is incomplete; export it again") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PackedFormatError(f"{file} cannot be read ({exc}): truncated or corrupted; export it again") from None
    match = _CHECKSUM_LINE.fullmatch(line)
    if match is None:
        raise PackedFormatError(f"{file} is not one '<sha256>  {METADATA_FILE}' line: corrupted; export it again")
    if sha256_file(path / METADATA_FILE) != match.group(1):
        raise PackedFormatError(f"{path / METADATA_FILE} does not match the checksum in {CHECKSUM_FILE}: the file is "
                                "truncated, corrupted or edited; export it again")


def _check_manifest(path: Path, meta: dict[str, Any], verify: bool) -> None:
    meta_file = path / METADATA_FILE
    manifest = _dict(meta, "manifest", meta_file)
    for rel, entry in manifest.items():
        pure = PurePosixPath(rel)
        if (not rel or pure.is_absolute() or ".." in pure.parts or "\\" in rel or pure.as_posix() != rel
                or rel in (METADATA_FILE, CHECKSUM_FILE)):
            raise PackedFormatError(f"{meta_file}: manifest lists {rel!r}, which is not a file of the export")
        if not isinstance(entry, dict) or set(entry) != {"sha256", "bytes"}:
            raise PackedFormatError(f"{meta_file}: manifest[{rel!r}] must be an object with sha256 and bytes")
        _int(entry, "bytes", meta_file, f"manifest[{rel!r}].")
        digest = entry["sha256"]
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise PackedFormatError(f"{meta_file}: manifest[{rel!r}].sha256 must be 64 hex digits, got {digest!r}")
    for required in (WEIGHTS_FILE, CONFIG_FILE):
        if required not in manifest:
            raise PackedFormatError(f"{meta_file}: manifest does not list {required}: the export is incomplete")
    if not any(f in manifest for f in TOKENIZER_FILES):
        raise PackedFormatError(f"{meta_file}: manifest lists no tokenizer file ({' or '.join(TOKENIZER_FILES)})")
    on_disk = {p.relative_to(path).as_posix(): p for p in path.rglob("*") if not p.is_dir() or p.is_symlink()}
    unlisted = sorted(set(on_disk) - set(manifest) - {METADATA_FILE, CHECKSUM_FILE})
    if unlisted:
        raise PackedFormatError(f"{path / unlisted[0]} is not part of the export (not in the manifest of "
                                f"{METADATA_FILE}); remove it or export again")
    for rel, entry in manifest.items():
        file = path / rel
        if rel not in on_disk or file.is_symlink() or not file.is_file():
            raise PackedFormatError(f"{file} is missing (listed in the manifest of {METADATA_FILE}): the export is "
                                    "incomplete; export it again")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise PackedFormatError(f"{file} has {size} bytes, the manifest in {METADATA_FILE} says {entry['bytes']}: "
                                    "the file is truncated or corrupted; export it again")
        if verify and sha256_file(file) != entry["sha256"]:
            raise PackedFormatError(f"{file} does not match the checksum in {METADATA_FILE}: the file is truncated "
                                    "or corrupted; export it again")


def _check_layers(meta_file: Path, layers: dict[str, Any]) -> None:
    """Every layer entry well-typed and self-consistent; ties only to an untied layer of the same layout."""
    for name, entry in layers.items():
        where = f"layers[{name!r}]."
        if not isinstance(entry, dict):
            raise PackedFormatError(f"{meta_file}: layers[{name!r}] must be a JSON object, got {type(entry).__name__}")
        unknown = sorted(set(entry) - LAYER_KEYS)
        if unknown:
            raise PackedFormatError(f"{meta_file}: {where}{unknown[0]} is not a key this EdgeRazor knows; "
                                    "export it again with this version")
        kind = _str(entry, "kind", meta_file, where)
        if kind not in LAYER_KINDS:
            raise PackedFormatError(f"{meta_file}: {where}kind {kind!r} is not one of {', '.join(LAYER_KINDS)}")
        d_out = _int(entry, "d_out", meta_file, where, 1)
        d_in = _int(entry, "d_in", meta_file, where, 1)
        group = _int(entry, "group_size", meta_file, where, 1)
        padded = _int(entry, "padded_d_in", meta_file, where, 1)
        if padded % group or not d_in <= padded < d_in + group:
            raise PackedFormatError(f"{meta_file}: {where}padded_d_in {padded} is not d_in {d_in} rounded up to a "
                                    f"multiple of group_size {group}")
        _str(entry, "high", meta_file, where)
        low = _str(entry, "low", meta_file, where, optional=True)
        high_rows = _int(entry, "high_rows", meta_file, where, 0)
        if high_rows > d_out:
            raise PackedFormatError(f"{meta_file}: {where}high_rows {high_rows} exceeds d_out {d_out}")
        if low is None and high_rows != d_out:
            raise PackedFormatError(f"{meta_file}: {where}high_rows {high_rows} is not d_out {d_out}, but low is null "
                                    "(every row must then be high precision)")
        for part, rows in (("high", high_rows), ("low", d_out - high_rows)):
            codec = entry.get(f"codec_{part}")
            if rows == 0:
                if codec is not None:
                    raise PackedFormatError(f"{meta_file}: {where}codec_{part} is set, but the layer has no {part} rows")
                continue
            if not isinstance(codec, str):
                raise PackedFormatError(f"{meta_file}: {where}codec_{part} is missing or not a string ({codec!r})")
            try:
                pack.get_codec(codec)
            except ValueError:
                raise PackedFormatError(
                    f"{meta_file}: {where}codec_{part} {codec!r} is a codec this EdgeRazor cannot read (known: "
                    f"{pack.codec_names()}); export it again with this version") from None
        activation = entry.get("activation", "missing")
        if activation == "missing":
            raise PackedFormatError(f"{meta_file}: {where}activation is missing")
        if activation is not None:
            if not isinstance(activation, dict) or set(activation) != ACTIVATION_KEYS:
                raise PackedFormatError(f"{meta_file}: {where}activation must be null or an object with "
                                        f"{', '.join(sorted(ACTIVATION_KEYS))}")
            _str(activation, "quantizer", meta_file, where + "activation.")
            a_group = _int(activation, "group_size", meta_file, where + "activation.", 1)
            a_padded = _int(activation, "padded_dim", meta_file, where + "activation.", 1)
            if a_padded % a_group or not d_in <= a_padded < d_in + a_group:
                raise PackedFormatError(f"{meta_file}: {where}activation.padded_dim {a_padded} is not d_in {d_in} "
                                        f"rounded up to a multiple of {a_group}")
    for name, entry in layers.items():
        owner = entry.get("tied_to")
        if owner is None:
            continue
        where = f"layers[{name!r}].tied_to"
        if not isinstance(owner, str) or owner not in layers or owner == name:
            raise PackedFormatError(f"{meta_file}: {where} {owner!r} is not another layer of the export")
        if layers[owner].get("tied_to") is not None:
            raise PackedFormatError(f"{meta_file}: {where} {owner!r} is itself tied; a tie names the stored layer")
        for key in WEIGHT_KEYS:
            if entry.get(key) != layers[owner].get(key):
                raise PackedFormatError(f"{meta_file}: {where} {owner!r}, but their {key} differ "
                                        f"({entry.get(key)!r} vs {layers[owner].get(key)!r}): a tie needs one layout")


def _expected_parts(entry: dict[str, Any]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    d_out, padded, high_rows = entry["d_out"], entry["padded_d_in"], entry["high_rows"]
    parts = {"scales": (torch.float16, (d_out, padded // entry["group_size"])),
             "mask": (torch.uint8, (-(-d_out // 8),))}
    for part, rows in (("high", high_rows), ("low", d_out - high_rows)):
        if rows:
            parts[f"codes_{part}"] = (torch.uint8, (rows, packed_row_bytes(entry[f"codec_{part}"], padded)))
    return parts


_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
           "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
           "BOOL": torch.bool}


def _read_tensors(path: Path, layers: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights file's tensors, after checking every packed part's presence, dtype and shape from the header."""
    from safetensors import safe_open

    file = path / WEIGHTS_FILE
    try:
        with safe_open(str(file), framework="pt") as f:
            header_meta = f.metadata() or {}
            header = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
            if header_meta.get("format") != FORMAT:
                raise PackedFormatError(f"{file}: header metadata format {header_meta.get('format')!r} is not {FORMAT!r}")
            expected: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
            for name, entry in layers.items():
                if entry.get("tied_to") is None:
                    expected.update({f"{name}.{part}": spec for part, spec in _expected_parts(entry).items()})
                if f"{name}.weight" in header:
                    raise PackedFormatError(f"{file} holds {name}.weight, but {METADATA_FILE} stores layer {name!r} "
                                            "packed: the files do not belong together")
            for key in header:
                layer, _, part = key.rpartition(".")
                if layer in layers and part in PACKED_PARTS and key not in expected:
                    raise PackedFormatError(f"{file} holds tensor {key!r}, which {METADATA_FILE} layers[{layer!r}] "
                                            "does not describe (tied, or no such rows)")
            for key, (dtype, shape) in expected.items():
                if key not in header:
                    raise PackedFormatError(f"{file} has no tensor {key!r}, which {METADATA_FILE} "
                                            f"layers[{key.rpartition('.')[0]!r}] needs")
                got_dtype, got_shape = _DTYPES.get(header[key][0]), header[key][1]
                if got_dtype != dtype or got_shape != shape:
                    raise PackedFormatError(
                        f"{file}: tensor {key!r} is {header[key][0]} {list(got_shape)}, but {METADATA_FILE} "
                        f"layers[{key.rpartition('.')[0]!r}] needs {str(dtype).removeprefix('torch.')} {list(shape)}")
            tensors = {k: f.get_tensor(k) for k in header}
    except EdgeRazorError:
        raise
    except Exception as exc:  # safetensors raises its own error types on a damaged header or payload
        raise PackedFormatError(f"{file} cannot be read ({exc}): truncated or corrupted") from None
    return tensors


def _check_part_values(file: Path, layers: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Masks that agree with ``high_rows``, finite scales and no byte a fixed codec never writes."""
    for name, entry in layers.items():
        if entry.get("tied_to") is not None:
            continue
        d_out = entry["d_out"]
        bits = torch.from_numpy(pack.unpack_mask(tensors[f"{name}.mask"].numpy(), -(-d_out // 8) * 8))
        if bool(bits[d_out:].any()) or int(bits[:d_out].sum()) != entry["high_rows"]:
            raise PackedFormatError(f"{file}: tensor {name}.mask marks {int(bits.sum())} rows, but {METADATA_FILE} "
                                    f"layers[{name!r}].high_rows is {entry['high_rows']} of {d_out}")
        if not bool(torch.isfinite(tensors[f"{name}.scales"]).all()):
            raise PackedFormatError(f"{file}: tensor {name}.scales holds non-finite values: corrupted")
        for part in ("high", "low"):
            codes = tensors.get(f"{name}.codes_{part}")
            if codes is None or not codes.numel():
                continue
            codec = entry[f"codec_{part}"]
            if codec == "ternary_2bit":
                bad = bool(((codes & 0x55) & ((codes >> 1) & 0x55)).any())  # a 2-bit field holding 3
            elif codec == "ternary_base3":
                bad = int(codes.max()) > 242
            elif codec == "int4":
                bad = bool(((codes & 0x0F) == 0).any() or ((codes >> 4) == 0).any())  # nibble 0 is code -8
            elif codec == "int8":
                bad = bool((codes == 0x80).any())  # -128
            else:
                bad = False  # sym{qmax}: field values are checked only by the checksums
            if bad:
                raise PackedFormatError(f"{file}: tensor {name}.codes_{part} holds bytes that codec {codec!r} never "
                                        "writes: corrupted")


def _check_config(path: Path, meta: dict[str, Any], config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """The counts in ``config.json`` are numbers, and the layer count matches the layers stored."""
    file = path / CONFIG_FILE
    for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
        if key in config:
            _int(config, key, file, "", 1)
    if not isinstance(config.get("model_type"), str):
        raise PackedFormatError(f"{file}: model_type must be a string, got {config.get('model_type')!r}")
    n_layers = config.get("num_hidden_layers")
    found = {int(m.group(1)) for key in [*meta["layers"], *tensors] if (m := _LAYER_INDEX.search(key))}
    if n_layers is not None and found and (len(found) != n_layers or max(found) != n_layers - 1):
        stored = f"0..{max(found)}" if len(found) == max(found) + 1 else str(sorted(found)[:8])
        raise PackedFormatError(f"{file}: num_hidden_layers is {n_layers}, but the export stores layers {stored}")
    stored_meta = config.get("edgerazor")
    if isinstance(stored_meta, dict):
        for key in ("recipe", "adapter"):
            if key in stored_meta and stored_meta[key] != meta.get(key):
                raise PackedFormatError(f"{file}: edgerazor.{key} differs from {key} in {METADATA_FILE}: the files do "
                                        "not belong together; export it again")


def tokenizer_summary(tokenizer) -> dict[str, Any]:
    """What a complete tokenizer of the export gives: its token count, special tokens and whether it has a
    chat template (a tokenizer file lost or edited changes one of them)."""
    return {"tokens": len(tokenizer), "chat_template": bool(getattr(tokenizer, "chat_template", None)),
            "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items()) if isinstance(v, str)},
            "all_special_tokens": [str(t) for t in tokenizer.all_special_tokens]}


TOKENIZER_KEYS = ("tokens", "chat_template", "special_tokens", "all_special_tokens")


def check_tokenizer(export: PackedExport, tokenizer) -> None:
    """The tokenizer loaded from the export's files against the summary the exporter wrote."""
    got, want = tokenizer_summary(tokenizer), export.meta["tokenizer"]
    for key in TOKENIZER_KEYS:
        if got[key] != want[key]:
            raise PackedFormatError(f"{export.metadata_file}: tokenizer.{key} is {want[key]!r}, but the tokenizer files "
                                    f"give {got[key]!r}: a tokenizer file is missing or edited; export it again")
    vocab_size = export.config.get("vocab_size")
    if _is_int(vocab_size) and got["tokens"] > vocab_size:
        raise PackedFormatError(f"{export.path / CONFIG_FILE}: vocab_size {vocab_size} is smaller than the tokenizer's "
                                f"{got['tokens']} tokens: the files do not belong together")


def _check_recipe(path: Path, meta: dict[str, Any]):
    from edgerazor.recipe import recipe_from_dict

    file = path / METADATA_FILE
    _dict(meta, "recipe", file)
    _str(meta, "adapter", file, optional=True)
    try:
        recipe = recipe_from_dict(meta["recipe"], f"{file} (recipe)")
        w_a_kv = recipe.quant.w_a_kv
    except EdgeRazorError as exc:
        raise PackedFormatError(str(exc)) from None
    if meta.get("allocation") != recipe.quant.weight.allocation:
        raise PackedFormatError(f"{file}: allocation {meta.get('allocation')!r} disagrees with "
                                f"recipe.quant.weight.allocation {recipe.quant.weight.allocation!r}")
    if meta.get("w_a_kv") != w_a_kv:
        raise PackedFormatError(f"{file}: w_a_kv {meta.get('w_a_kv')!r} disagrees with the recipe's {w_a_kv!r}")
    adapter = recipe.model.adapter
    if adapter not in (None, "auto") and meta.get("adapter") != adapter:
        raise PackedFormatError(f"{file}: adapter {meta.get('adapter')!r} disagrees with recipe.model.adapter {adapter!r}")
    summary = _dict(meta, "tokenizer", file)
    if set(summary) != set(TOKENIZER_KEYS) or not isinstance(summary["chat_template"], bool):
        raise PackedFormatError(f"{file}: tokenizer must be an object with {', '.join(TOKENIZER_KEYS)}")
    _int(summary, "tokens", file, "tokenizer.", 1)
    kv = _dict(meta, "kv_cache", file)
    for name, entry in kv.items():
        if not isinstance(entry, dict) or set(entry) != KV_KEYS:
            raise PackedFormatError(f"{file}: kv_cache[{name!r}] must be an object with group_size and quantizer")
        _str(entry, "quantizer", file, f"kv_cache[{name!r}].")
        _int(entry, "group_size", file, f"kv_cache[{name!r}].", 1)
    return recipe


def read_packed(path: str | Path, verify: bool = True) -> PackedExport:
    """Read and check the packed export at ``path`` without building a model.

    ``verify=False`` skips the sha256 checksums (sizes and every structural check still run).
    """
    path = Path(path)
    if not path.is_dir():
        raise PackedFormatError(f"{path} is not a directory: a packed export is a directory holding {METADATA_FILE}")
    meta = read_metadata(path)
    if verify:
        _check_metadata_checksum(path)
    if not (path / WEIGHTS_FILE).is_file():
        raise PackedFormatError(f"{path} has no {WEIGHTS_FILE}")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise PackedFormatError(f"{path} has no tokenizer ({' or '.join(TOKENIZER_FILES)}): the export is incomplete")
    _check_manifest(path, meta, verify)
    meta_file = path / METADATA_FILE
    layers = _dict(meta, "layers", meta_file)
    _check_layers(meta_file, layers)
    recipe = _check_recipe(path, meta)
    config = read_json(path / CONFIG_FILE)
    tensors = _read_tensors(path, layers)
    _check_part_values(path / WEIGHTS_FILE, layers, tensors)
    _check_config(path, meta, config, tensors)
    return PackedExport(path, meta, config, recipe, tensors)


# ------------------------------------------------------------------------------------------------
# Against the model the recipe and config.json build (a meta-device skeleton: no weights yet)
# ------------------------------------------------------------------------------------------------


def check_shapes(export: PackedExport, model: torch.nn.Module) -> None:
    """The unquantized skeleton's tensors against the export's, before any memory is allocated for them.

    ``config.json``'s ``vocab_size`` / ``hidden_size`` (and every other size) must give exactly the stored shapes.
    """
    config_file, weights = export.path / CONFIG_FILE, export.path / WEIGHTS_FILE
    state = model.state_dict()
    embed = model.get_input_embeddings()
    embed_key = next((f"{n}.weight" for n, m in model.named_modules() if m is embed), None) if embed is not None else None
    expected: dict[str, tuple[int, ...]] = {}
    for key, value in state.items():
        layer = key.removesuffix(".weight")
        shape = tuple(value.shape)
        if key.endswith(".weight") and layer in export.layers:
            entry = export.layers[layer]
            expected[key] = (entry["d_out"], entry["d_in"])
            if entry.get("kind") == "conv3d" and len(shape) == 5:  # stored as [out, in * t * h * w]
                shape = (shape[0], shape[1] * shape[2] * shape[3] * shape[4])
        elif key in export.tensors:
            expected[key] = tuple(export.tensors[key].shape)
        if key in expected and shape != expected[key]:
            stored = expected[key]
            if key == embed_key and len(shape) == 2 and len(stored) == 2:
                for axis, name in ((0, "vocab_size"), (1, "hidden_size")):
                    if shape[axis] != stored[axis]:
                        raise PackedFormatError(f"{config_file}: {name} gives {key} {list(shape)}, but the export "
                                                f"stores {list(stored)}: the files do not belong together")
            raise PackedFormatError(f"{config_file} gives {key} the shape {list(shape)}, but the export stores "
                                    f"{list(stored)}: the files do not belong together")
    plain = {k for k in export.tensors if not export.is_packed_part(k)}
    needed = {k for k in state if not (k.endswith(".weight") and k.removesuffix(".weight") in export.layers)}
    missing, unexpected = sorted(needed - plain), sorted(plain - needed)
    if missing or unexpected:
        raise PackedFormatError(f"{weights} does not fit the model {config_file} describes: missing {missing[:5]}, "
                                f"unexpected {unexpected[:5]}")
    for key in sorted(needed):
        got, want = export.tensors[key].dtype, state[key].dtype
        if got.is_floating_point != want.is_floating_point or (not got.is_floating_point and got != want):
            raise PackedFormatError(f"{weights}: tensor {key!r} is {str(got).removeprefix('torch.')}, the model needs "
                                    f"{str(want).removeprefix('torch.')}")


def _activation_of(module) -> dict[str, Any] | None:
    quant = getattr(module, "input_quant", None)
    if quant is None:
        return None
    return {"quantizer": quant.quantizer_name, "group_size": int(quant.group_size), "padded_dim": int(quant.padded_dim)}


def quant_structure(model: torch.nn.Module) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """``(activation per quantized layer, KV-cache quantization per attention module)`` of a quantized model.

    Written into the metadata at export and rebuilt from the recipe at load: a recipe edited after the
    export (activation bits, group sizes, quantizers) cannot silently change the model that loads.
    """
    from edgerazor.quant.kv import KVFakeQuant
    from edgerazor.quant.modules import QuantConv3d, QuantEmbedding, QuantLinear

    activations = {n: _activation_of(m) for n, m in model.named_modules()
                   if isinstance(m, (QuantLinear, QuantEmbedding, QuantConv3d))}
    kv = {n.removesuffix(".edgerazor_kv"): {"quantizer": m.quantizer_name, "group_size": int(m.group_size)}
          for n, m in model.named_modules() if isinstance(m, KVFakeQuant)}
    return activations, kv


def check_quantized(export: PackedExport, model: torch.nn.Module) -> None:
    """The skeleton quantized by the export's recipe against every layer entry: same layers, ties, shapes,
    group sizes, quantizers, codecs, activation and KV quantization; ``high_rows`` where the recipe fixes it."""
    from edgerazor.quant.modules import QuantConv3d, QuantEmbedding, QuantLinear

    file, layers = export.metadata_file, export.layers
    modules = {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding, QuantConv3d))}
    for name in modules:
        if name not in layers:
            raise PackedFormatError(f"{file}: layers has no entry for {name!r}, which the recipe quantizes")
    for name in layers:
        if name not in modules:
            raise PackedFormatError(f"{file}: layers[{name!r}] is not a layer the recipe quantizes in this model")
    first: dict[int, str] = {}
    w = export.recipe.quant.weight
    activations, kv = quant_structure(model)
    for name, module in modules.items():
        owner = first.setdefault(id(module.weight), name)
        entry, where = layers[name], f"layers[{name!r}]"
        if entry.get("tied_to") != (owner if owner != name else None):
            want = f"tied to {owner!r}" if owner != name else "stored on its own"
            raise PackedFormatError(f"{file}: {where}.tied_to is {entry.get('tied_to')!r}, but in this model the layer "
                                    f"is {want}")
        wq, owner_module = module.weight_quant, modules[owner]
        kind = ("embedding" if isinstance(owner_module, QuantEmbedding)
                else "conv3d" if isinstance(owner_module, QuantConv3d) else "linear")
        want = {"kind": kind,
                "d_out": int(wq.precision_mask.numel()), "d_in": int(wq.d_in), "padded_d_in": int(wq.padded_dim),
                "group_size": int(wq.group_size), "high": wq.names[0], "low": wq.names[1]}
        for part, quantizer in (("high", wq.high), ("low", wq.low)):
            if entry.get(f"codec_{part}") is not None and quantizer is not None:
                want[f"codec_{part}"] = codec_of(quantizer, wq.names[part == "low"], name)
        if (w.rho in (0.0, 1.0) and not w.allocation_options) or wq.low is None:
            want["high_rows"] = int(wq.precision_mask.sum())
        for key, value in want.items():
            if entry.get(key) != value:
                raise PackedFormatError(f"{file}: {where}.{key} is {entry.get(key)!r}, but the recipe and config.json "
                                        f"give {value!r}")
        if entry.get("activation") != activations[name]:
            raise PackedFormatError(f"{file}: {where}.activation is {entry.get('activation')!r}, but the recipe gives "
                                    f"{activations[name]!r}")
    if export.meta["kv_cache"] != kv:
        names = sorted(set(kv) ^ set(export.meta["kv_cache"])) or sorted(
            n for n in kv if kv[n] != export.meta["kv_cache"].get(n))
        raise PackedFormatError(f"{file}: kv_cache disagrees with the recipe's KV-cache quantization "
                                f"(first difference: {names[0]!r})")
