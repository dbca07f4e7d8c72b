"""Load a packed export as a transformers model that computes from the packed codes.

Quantized layers keep only the packed bytes (and fp16 scales); each forward unpacks them with
bitwise operations and dequantizes exactly as training did (``codes * scale`` in float32), so
the logits equal the fake-quant student's bit for bit, A8 and KV8 included.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoTokenizer

from edgerazor.errors import EdgeRazorError, PackedFormatError
from edgerazor.export import pack
from edgerazor.export.packed_format import (
    CONFIG_FILE, METADATA_FILE, PACKED_PARTS, WEIGHTS_FILE, check_quantized, check_shapes, check_tokenizer, read_packed,
)
from edgerazor.adapters import resolve_adapter
from edgerazor.quant.modules import ActivationFakeQuant, QuantConv3d, QuantEmbedding

#: codec of ``edgerazor.export.pack`` -> (codes per byte, offset of the stored unsigned field)
CODECS = {"ternary_base3": (5, 1), "ternary_2bit": (4, 1), "int4": (2, 8), "int8": (1, 0)}


def unpack_codes(packed: torch.Tensor, codec: str, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Torch twin of ``edgerazor.export.pack``'s unpack functions: int8 codes ``[..., n]``.

    Bitwise operations on the uint8 bytes (several times faster than a byte lookup table);
    ``out`` is an optional int8/uint8 buffer of at least ``unpacked_numel(packed, codec, n)`` codes.
    The codec name alone says how to read the bytes: no quantizer plugin is needed.
    """
    if codec not in CODECS:
        return _unpack_symmetric(packed, codec, n, out)
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


def _unpack_symmetric(packed: torch.Tensor, codec: str, n: int, out: torch.Tensor | None) -> torch.Tensor:
    """The generic ``sym{qmax}`` codec: field ``i`` starts at stream bit ``i * w`` and spans at most two bytes."""
    qmax = pack.symmetric_qmax(codec)
    if qmax is None:
        raise EdgeRazorError(f"unknown packed codec {codec!r} (known: {pack.codec_names()}); re-export with this EdgeRazor")
    width = pack.symmetric_width(qmax)
    start = torch.arange(n, device=packed.device) * width
    byte, shift = start // 8, (start % 8).to(torch.int32)
    padded = torch.cat([packed, packed.new_zeros(*packed.shape[:-1], 1)], dim=-1)  # the last field's second byte
    pair = padded[..., byte].to(torch.int32) | (padded[..., byte + 1].to(torch.int32) << 8)
    fields = (pair >> shift) & ((1 << width) - 1)
    if out is None:
        return (fields - qmax).to(torch.int8)
    codes = out.view(torch.int8)[: fields.numel()].view(fields.shape)
    return codes.copy_(fields - qmax)


def unpacked_numel(packed: torch.Tensor, codec: str, n: int) -> int:
    """How many int8 codes ``unpack_codes(packed, codec, n, out)`` needs in ``out``."""
    if codec in CODECS:
        return packed.numel() * CODECS[codec][0]
    return packed.shape[:-1].numel() * n


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
            unpacked = unpack_codes(packed, codec, width, out=buffer("unpack", unpacked_numel(packed, codec, width), torch.int8))
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

    def materialize(self, dtype: torch.dtype = torch.float32) -> None:
        """Dequantize once, kept in ``dtype`` (the model's compute dtype: no cast per forward)."""
        self.dense = self.rows().to(dtype).contiguous()

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
        self.compute_dtype = torch.float32  # the hidden states' dtype; set by load_packed

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.packed.dense is not None:
            return F.embedding(input_ids, self.packed.dense, self.padding_idx)
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.num_embeddings):
            raise IndexError(f"token ids must lie in [0, {self.num_embeddings}), got [{input_ids.min()}, {input_ids.max()}]")
        used, position = torch.unique(input_ids, return_inverse=True)
        return self.packed.rows(used)[position].to(self.compute_dtype)


class PackedConv3d(nn.Module):
    """A quantized Conv3d (a video patch embedding): its packed rows are the flattened kernels."""

    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None, like: nn.Conv3d):
        super().__init__()
        self.packed = weight
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.kernel_shape = tuple(like.weight.shape)
        self.stride, self.padding, self.dilation, self.groups = like.stride, like.padding, like.dilation, like.groups
        self.compute_dtype = torch.float32  # set by load_packed
        if like.padding_mode != "zeros":
            raise PackedFormatError(f"a packed Conv3d with padding_mode {like.padding_mode!r} is not supported")

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized kernel (patch embeddings read ``proj.weight.dtype`` to cast their input)."""
        weight = self.packed.dense if self.packed.dense is not None else self.packed.rows()
        return weight.reshape(self.kernel_shape).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv3d(x, self.weight.to(x.dtype), self.bias, self.stride, self.padding, self.dilation, self.groups)


def is_packed(path: str | Path) -> bool:
    return (Path(path) / METADATA_FILE).is_file()


def _rebuild_rotary(model: nn.Module) -> None:
    """``to_empty`` leaves non-persistent buffers (RoPE's inv_freq) uninitialised: rebuild them."""
    for name, module in list(model.named_modules()):
        if name.endswith("rotary_emb") and hasattr(module, "config"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, type(module)(config=module.config))


def _restore_buffers(model: nn.Module) -> None:
    """Every other non-persistent buffer ``to_empty`` wiped (a vision encoder's axial RoPE, an audio encoder's
    sinusoids): recomputed by the model's own ``_init_weights`` for the modules that own one."""
    init = getattr(model, "_init_weights", None)
    if init is None:
        return
    for module in model.modules():
        if module._non_persistent_buffers_set:
            init(module)


def _built(what: str, file: Path, build):
    """``build()``; any failure of transformers or the adapter on the export's files is a PackedFormatError."""
    try:
        return build()
    except EdgeRazorError as exc:
        raise PackedFormatError(f"{file}: {exc}") from None
    except Exception as exc:  # transformers raises many types on a malformed config or tokenizer
        raise PackedFormatError(f"{file}: {what} fails ({type(exc).__name__}: {exc}); the export is damaged or "
                                "inconsistent; export it again") from None


def stored_float_dtype(dtypes) -> str:
    """The most common of ``dtypes`` (names, None for a non-float tensor): what a model's plain weights are stored in."""
    counts = Counter(d for d in dtypes if d in ("float32", "bfloat16", "float16"))
    return counts.most_common(1)[0][0] if counts else "float32"


def load_packed(path: str | Path, verify: bool = True, dense: bool = False, compute_dtype: str = "auto"):
    """``(model, tokenizer)`` from a packed export; quantized layers compute from the packed codes.

    Every check of ``edgerazor.export.packed_format`` (checksums unless ``verify=False``, metadata against
    tensors, recipe and ``config.json`` against the layers, the tokenizer) passes before any weight is
    allocated: a damaged or inconsistent export is a ``PackedFormatError``, never a different model.
    ``dense=True`` dequantizes every layer once at load (several times faster generation, a float
    weight's memory); the default keeps only the packed bytes in memory. Both give the same logits
    bit for bit. ``compute_dtype`` as in ``edgerazor.load``: ``auto`` computes in the dtype the plain
    tensors are stored in where this CPU does so natively, else in float32; weights are always
    dequantized in float32 first, exactly as training did.
    """
    from edgerazor.precision import cast_parameters, compute_dtype_for
    from edgerazor.quant.surgery import quantize

    path = Path(path)
    export = read_packed(path, verify=verify)
    meta, tensors = export.meta, export.tensors
    config_file = path / CONFIG_FILE
    config = _built("reading it as a transformers config", config_file, lambda: AutoConfig.from_pretrained(path))
    tokenizer = _built("loading the tokenizer from its files", path, lambda: AutoTokenizer.from_pretrained(path))
    check_tokenizer(export, tokenizer)
    adapter = _built("resolving the model adapter", path / METADATA_FILE,
                     lambda: resolve_adapter(config.model_type, meta.get("adapter")))
    model = _built("building the model it describes", config_file, lambda: adapter.from_config(config, "meta"))
    check_shapes(export, model)
    _built("quantizing the model as its recipe says", path / METADATA_FILE,
           lambda: quantize(model, export.recipe, adapter=adapter))
    check_quantized(export, model)
    model.to_empty(device="cpu")
    _rebuild_rotary(model)
    _restore_buffers(model)

    packed: dict[str, PackedWeight] = {}
    for name in meta["layers"]:
        owner = export.owner(name)
        if owner not in packed:
            parts = {part: tensors[f"{owner}.{part}"] for part in PACKED_PARTS if f"{owner}.{part}" in tensors}
            packed[owner] = PackedWeight(meta["layers"][owner], parts)
        module = model.get_submodule(name)
        if isinstance(module, QuantEmbedding):
            replacement: nn.Module = PackedEmbedding(packed[owner], module.padding_idx)
        elif isinstance(module, QuantConv3d):
            replacement = PackedConv3d(packed[owner], tensors.get(f"{name}.bias"), module)
        else:
            replacement = PackedLinear(packed[owner], tensors.get(f"{name}.bias"), module.input_quant)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, replacement)

    # everything but the packed parts (a quantized linear's bias is a plain tensor too)
    plain = {k: v for k, v in tensors.items() if not export.is_packed_part(k)}
    expected = {k for k in model.state_dict() if ".packed." not in k}
    missing, unexpected = sorted(expected - set(plain)), sorted(set(plain) - expected)
    if missing or unexpected:
        raise PackedFormatError(
            f"{path / WEIGHTS_FILE} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(plain, strict=False)
    names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    compute = compute_dtype_for(stored_float_dtype(names.get(t.dtype) for t in plain.values()), compute_dtype)
    cast_parameters(model, compute)  # the packed parts are buffers: they stay as stored
    dtype = getattr(torch, compute)
    for module in model.modules():
        if isinstance(module, (PackedEmbedding, PackedConv3d)):
            module.compute_dtype = dtype
    workspace = Workspace()
    for weight in packed.values():
        weight.workspace = workspace
        if dense:
            weight.materialize(dtype)
    model.eval()
    return model, tokenizer
