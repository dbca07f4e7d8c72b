"""Load a packed export as a transformers model that computes from the packed codes.

Quantized layers keep only the packed bytes (and fp16 scales); each forward unpacks them with
bitwise operations and dequantizes exactly as training did (``codes * scale`` in float32), so
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
from edgerazor.shapes import build_model
from edgerazor.quant.modules import ActivationFakeQuant, QuantEmbedding, QuantLinear

#: codec of ``edgerazor.export.pack`` -> (codes per byte, offset of the stored unsigned field)
CODECS = {"ternary_base3": (5, 1), "ternary_2bit": (4, 1), "int4": (2, 8), "int8": (1, 0)}


def unpack_codes(packed: torch.Tensor, codec: str, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Torch twin of ``edgerazor.export.pack``'s unpack functions: int8 codes ``[..., n]``.

    Bitwise operations on the uint8 bytes (several times faster than a byte lookup table);
    ``out`` is an optional int8/uint8 buffer of at least ``packed.numel() * codes per byte``.
    """
    per, offset = CODECS[codec]
    lead, nbytes = packed.shape[:-1], packed.shape[-1]
    if out is None:
        fields = torch.empty(*lead, nbytes, per, dtype=torch.uint8, device=packed.device)
    else:
        fields = out.view(torch.uint8)[: packed.numel() * per].view(*lead, nbytes, per)
    if codec == "int8":
        fields[..., 0].copy_(packed)
    elif codec == "int4":
        torch.bitwise_and(packed, 15, out=fields[..., 0])
        torch.bitwise_right_shift(packed, 4, out=fields[..., 1])
    elif codec == "ternary_2bit":
        for k in range(4):
            torch.bitwise_right_shift(packed, 2 * k, out=fields[..., k]).bitwise_and_(3)
    else:  # five base-3 digits per byte
        for k in range(5):
            torch.div(packed, 3**k, rounding_mode="floor", out=fields[..., k]).remainder_(3)
    codes = fields.view(torch.int8)
    if offset:
        codes.sub_(offset)
    return codes.reshape(*lead, nbytes * per)[..., :n]


class Workspace:
    """Reusable dequantization buffers shared by a model's packed weights.

    A forward needs one dequantized weight at a time, so one float32 buffer the size of the
    largest weight serves every layer; allocating (and page-faulting) a fresh full-size weight per
    layer per token made generation ~10x slower.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def take(self, kind: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (kind, dtype, device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel]


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
        self.workspace: Workspace | None = None  # set by load_packed: shared by the model's weights

    def rows(self, index: torch.Tensor | None = None, workspace: Workspace | None = None) -> torch.Tensor:
        """Dequantized rows ``index`` (all rows when None), ``codes * scale`` in float32 as in training.

        With a ``workspace`` the result is a view into its buffer, valid until its next use.
        """
        lay = self.layout
        width, group = lay["padded_d_in"], lay["group_size"]
        mask = self.precision_mask if index is None else self.precision_mask[index]
        n_rows, device = mask.shape[0], self.scales.device
        if n_rows == 0:
            return torch.empty(0, lay["d_in"], dtype=torch.float32, device=device)

        def buffer(kind: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
            if workspace is None:
                return torch.empty(numel, dtype=dtype, device=device)
            return workspace.take(kind, numel, dtype, device)

        codes = None
        for part, rows in (("high", mask), ("low", ~mask)):
            packed = getattr(self, f"codes_{part}")
            if packed is None or not bool(rows.any()):
                continue
            if index is not None:
                packed = packed[self.part_row[index[rows]]]
            codec = lay[f"codec_{part}"]
            # one unpack buffer serves both parts: the first is scattered into ``codes`` before the second
            unpacked = unpack_codes(packed, codec, width, out=buffer("unpack", packed.numel() * CODECS[codec][0], torch.int8))
            if packed.shape[0] == n_rows:  # a pure tensor: no scatter
                codes = unpacked
                break
            if codes is None:
                codes = buffer("codes", n_rows * width, torch.int8).view(n_rows, width)
            codes.index_copy_(0, rows.nonzero().squeeze(1), unpacked)
        weight = buffer("weight", n_rows * width, torch.float32).view(n_rows, width)
        weight.copy_(codes)
        scales = self.scales if index is None else self.scales[index]
        weight.view(n_rows, -1, group).mul_(scales.to(torch.float32).unsqueeze(-1))
        return weight[:, : lay["d_in"]]

    def materialize(self) -> None:
        self.dense = self.rows().contiguous()

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
        weight = self.packed.dense
        if weight is None:
            # the shared workspace's view is consumed at once; autograd would keep it, so not then
            keeps_graph = torch.is_grad_enabled() and x.requires_grad
            weight = self.packed.rows(workspace=None if keeps_graph else self.packed.workspace)
        return F.linear(x, weight.to(x.dtype), self.bias)


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
    workspace = Workspace()
    for weight in packed.values():
        weight.workspace = workspace
        if dense:
            weight.materialize()
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)
