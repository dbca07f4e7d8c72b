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
    return lut[packed.long()].reshape(*packed.shape[:-1], -1)[..., :n]


class PackedWeight(nn.Module):
    """A quantized weight stored as packed codes; calling it returns the dequantized float32 weight."""

    def __init__(self, layout: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.layout = layout
        mask = pack.unpack_mask(tensors["mask"].numpy(), layout["d_out"])
        self.register_buffer("precision_mask", torch.from_numpy(mask))
        self.register_buffer("scales", tensors["scales"])
        self.register_buffer("codes_high", tensors.get("codes_high"))
        self.register_buffer("codes_low", tensors.get("codes_low"))

    def forward(self) -> torch.Tensor:
        lay = self.layout
        width = lay["padded_d_in"]
        codes = torch.empty(lay["d_out"], width, dtype=torch.int8, device=self.scales.device)
        for part, rows in (("high", self.precision_mask), ("low", ~self.precision_mask)):
            packed = getattr(self, f"codes_{part}")
            if packed is not None:
                codes[rows] = unpack_codes(packed, lay[f"codec_{part}"], width)
        groups = codes.reshape(lay["d_out"], -1, lay["group_size"]).to(torch.float32)
        weight = groups * self.scales.to(torch.float32).unsqueeze(-1)
        return weight.reshape(lay["d_out"], width)[:, : lay["d_in"]]


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
        return F.embedding(input_ids, self.packed(), self.padding_idx)


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


def load_packed(path: str | Path, verify: bool = True):
    """``(model, tokenizer)`` from a packed export; quantized layers compute from the packed codes."""
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
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)
