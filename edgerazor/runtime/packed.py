"""Load a packed export as a transformers model that computes from the packed codes.

Quantized layers keep only the packed bytes (and fp16 scales); each forward unpacks them with
byte lookup tables and dequantizes exactly as training did (``codes * scale`` in float32), so
the logits equal the fake-quant student's bit for bit, A8 and KV8 included.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoTokenizer

from edgerazor.errors import EdgeRazorError
from edgerazor.export import pack
from edgerazor.export.packed import FORMAT, FORMAT_VERSION, METADATA_FILE, TOKENIZER_FILES, WEIGHTS_FILE
from edgerazor.models import build_model
from edgerazor.quant.modules import ActivationFakeQuant, QuantEmbedding, QuantLinear


def _lut(codes_per_byte: int, decode) -> torch.Tensor:
    return torch.tensor([decode(b) for b in range(256)], dtype=torch.int8).reshape(256, codes_per_byte)


#: byte -> the codes it holds, for each codec of ``edgerazor.export.pack``
LUTS = {
    "ternary_base3": _lut(5, lambda b: [(b // 3**k) % 3 - 1 for k in range(5)]),
    "ternary_2bit": _lut(4, lambda b: [((b >> (2 * k)) & 3) - 1 for k in range(4)]),
    "int4": _lut(2, lambda b: [(b & 15) - 8, (b >> 4) - 8]),
    "int8": _lut(1, lambda b: [b - 256 if b > 127 else b]),
}


def unpack_codes(packed: torch.Tensor, codec: str, n: int) -> torch.Tensor:
    """Torch twin of ``edgerazor.export.pack``'s unpack functions: int8 codes ``[..., n]``."""
    lut = LUTS[codec].to(packed.device)
    return lut[packed.int()].reshape(*packed.shape[:-1], -1)[..., :n]


class PackedWeight(nn.Module):
    """A quantized weight stored as packed codes; calling it returns the dequantized float32 weight.

    ``rows(index)`` dequantizes only the rows asked for (an embedding lookup touches a handful of
    the vocabulary's rows per token). ``materialize()`` dequantizes once and keeps the float32
    weight: the same numbers, faster generation, but float32 memory instead of the true bits.
    """

    def __init__(self, layout: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.layout = layout
        mask = torch.from_numpy(pack.unpack_mask(tensors["mask"].numpy(), layout["d_out"]))
        self.register_buffer("precision_mask", mask)
        self.register_buffer("scales", tensors["scales"])
        self.register_buffer("codes_high", tensors.get("codes_high"))
        self.register_buffer("codes_low", tensors.get("codes_low"))
        # row r of the weight is row part_row[r] of codes_high (mask set) or codes_low (mask clear)
        high_rank, low_rank = torch.cumsum(mask, 0) - 1, torch.cumsum(~mask, 0) - 1
        self.register_buffer("part_row", torch.where(mask, high_rank, low_rank), persistent=False)
        self.register_buffer("dense", None, persistent=False)

    def rows(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """Dequantized rows ``index`` (all rows when None), ``codes * scale`` in float32 as in training."""
        lay = self.layout
        width = lay["padded_d_in"]
        mask = self.precision_mask if index is None else self.precision_mask[index]
        codes = torch.empty(mask.shape[0], width, dtype=torch.int8, device=self.scales.device)
        for part, rows in (("high", mask), ("low", ~mask)):
            packed = getattr(self, f"codes_{part}")
            if packed is None:
                continue
            if index is not None:
                packed = packed[self.part_row[index[rows]]]
            codes[rows] = unpack_codes(packed, lay[f"codec_{part}"], width)
        scales = self.scales if index is None else self.scales[index]
        groups = codes.reshape(mask.shape[0], -1, lay["group_size"]).to(torch.float32)
        weight = groups * scales.to(torch.float32).unsqueeze(-1)
        return weight.reshape(mask.shape[0], width)[:, : lay["d_in"]]

    def materialize(self) -> None:
        self.dense = self.rows()

    def forward(self) -> torch.Tensor:
        return self.dense if self.dense is not None else self.rows()


class PackedLinear(nn.Module):
    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None, input_quant: ActivationFakeQuant | None):
        super().__init__()
        self.packed = weight
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.input_quant = input_quant
        self.in_features, self.out_features = weight.layout["d_in"], weight.layout["d_out"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return F.linear(x, self.packed().to(x.dtype), self.bias)


class PackedEmbedding(nn.Module):
    def __init__(self, weight: PackedWeight, padding_idx: int | None):
        super().__init__()
        self.packed = weight
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = weight.layout["d_out"], weight.layout["d_in"]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.packed.dense is not None:
            return F.embedding(input_ids, self.packed.dense, self.padding_idx)
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.num_embeddings):
            raise IndexError(f"token ids must lie in [0, {self.num_embeddings}), got [{input_ids.min()}, {input_ids.max()}]")
        used, position = torch.unique(input_ids, return_inverse=True)
        return self.packed.rows(used)[position]


def read_metadata(path: Path) -> dict[str, Any]:
    file = path / METADATA_FILE
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise EdgeRazorError(f"{file} is not valid JSON (truncated or corrupted export?): {exc}") from None
    if meta.get("format") != FORMAT:
        raise EdgeRazorError(f"{file}: format {meta.get('format')!r} is not {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise EdgeRazorError(
            f"{file}: format_version {meta.get('format_version')!r} is not supported "
            f"(this EdgeRazor reads version {FORMAT_VERSION}); re-export with a matching EdgeRazor"
        )
    return meta


def _verify_checksum(path: Path, expected: str) -> None:
    digest = hashlib.sha256()
    with (path / WEIGHTS_FILE).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise EdgeRazorError(
            f"{path / WEIGHTS_FILE} does not match the checksum in {METADATA_FILE}: the file is truncated or "
            "corrupted; export it again"
        )


def is_packed(path: str | Path) -> bool:
    return (Path(path) / METADATA_FILE).is_file()


def _rebuild_rotary(model: nn.Module) -> None:
    """``to_empty`` leaves non-persistent buffers (RoPE's inv_freq) uninitialised: rebuild them."""
    for name, module in list(model.named_modules()):
        if name.endswith("rotary_emb") and hasattr(module, "config"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, type(module)(config=module.config))


def load_packed(path: str | Path, verify: bool = True, dense: bool = False):
    """``(model, tokenizer)`` from a packed export; quantized layers compute from the packed codes.

    ``dense=True`` dequantizes every layer once at load (float32 weights: several times faster
    generation, float32 memory); the default keeps only the packed bytes in memory. Both give the
    same logits bit for bit.
    """
    from edgerazor.quant.surgery import quantize
    from edgerazor.recipe import recipe_from_dict

    path = Path(path)
    meta = read_metadata(path)
    if not (path / WEIGHTS_FILE).is_file():
        raise EdgeRazorError(f"{path} has no {WEIGHTS_FILE}")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise EdgeRazorError(f"{path} has no tokenizer ({' or '.join(TOKENIZER_FILES)}): the export is incomplete")
    if verify:
        _verify_checksum(path, meta["weights_sha256"])
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except Exception as exc:  # safetensors raises its own error types on a bad header
        raise EdgeRazorError(f"{path / WEIGHTS_FILE} cannot be read ({exc}): truncated or corrupted") from None

    model = build_model(AutoConfig.from_pretrained(path), "meta")
    quantize(model, recipe_from_dict(meta["recipe"], f"{path / METADATA_FILE} (recipe)"), adapter=meta.get("adapter"))
    model.to_empty(device="cpu")
    _rebuild_rotary(model)

    packed: dict[str, PackedWeight] = {}
    for name, layout in meta["layers"].items():
        owner = layout.get("tied_to", name)
        if owner not in packed:
            parts = {k.removeprefix(owner + "."): v for k, v in tensors.items() if k.startswith(owner + ".")}
            packed[owner] = PackedWeight(layout, parts)
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if isinstance(module, QuantEmbedding):
            replacement: nn.Module = PackedEmbedding(packed[owner], module.padding_idx)
        elif isinstance(module, QuantLinear):
            replacement = PackedLinear(packed[owner], tensors.get(f"{name}.bias"), module.input_quant)
        else:
            raise EdgeRazorError(f"{path / METADATA_FILE}: layer {name!r} is not a quantized layer of this model")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, replacement)

    plain = {k: v for k, v in tensors.items() if not any(k.startswith(n + ".") for n in meta["layers"])}
    expected = {k for k in model.state_dict() if ".packed." not in k}
    missing, unexpected = sorted(expected - set(plain)), sorted(set(plain) - expected)
    if missing or unexpected:
        raise EdgeRazorError(
            f"{path / WEIGHTS_FILE} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(plain, strict=False)
    if dense:
        for weight in packed.values():
            weight.materialize()
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)
