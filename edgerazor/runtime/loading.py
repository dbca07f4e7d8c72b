"""``edgerazor.load``: one entry point for both kinds of saved student."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer

from edgerazor.quant.checkpoint import load_quantized
from edgerazor.runtime.packed import is_packed, load_packed, stored_float_dtype


def stored_dtype(path: str | Path) -> str:
    """The floating dtype a checkpoint or packed export stores its (unpacked) weights in: ``config.json``'s
    ``dtype`` for a checkpoint, the plain tensors' for a packed export; float32 when neither says."""
    path = Path(path)
    if is_packed(path):
        from safetensors import safe_open

        from edgerazor.export.packed_format import PACKED_PARTS, WEIGHTS_FILE

        names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
            found = [names.get(f.get_slice(k).get_dtype()) for k in f.keys() if k.rpartition(".")[2] not in PACKED_PARTS]
        return stored_float_dtype(found)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"  # load says what is wrong with the directory
    dtype = config.get("dtype") or config.get("torch_dtype")
    return str(dtype).removeprefix("torch.") if str(dtype).removeprefix("torch.") in ("bfloat16", "float16") else "float32"


def load(path: str | Path, dense: bool = False, compute_dtype: str = "auto", **from_pretrained_kwargs):
    """``(model, tokenizer)`` from a quantized checkpoint or a packed export.

    A checkpoint (``save_pretrained`` of a quantized model, ``edgerazor run``'s ``student/``) loads
    as a fake-quant model; a packed export loads as a model computing from the packed codes
    (``dense=True``: dequantized once at load, faster, more memory). The tokenizer is None when
    none was saved beside a checkpoint.

    ``compute_dtype``: ``auto`` computes in the stored dtype where this CPU does so natively, else in
    float32 (saying so once: half precision without native support runs ~100x slower); ``as_stored``
    keeps the stored dtype; a dtype name computes in that one. A ``dtype`` keyword for
    ``from_pretrained`` wins over all of them.
    """
    from edgerazor.precision import compute_dtype_for

    if is_packed(path):
        return load_packed(path, dense=dense, compute_dtype=compute_dtype)
    if "dtype" not in from_pretrained_kwargs and "torch_dtype" not in from_pretrained_kwargs:
        import torch

        from_pretrained_kwargs["dtype"] = getattr(torch, compute_dtype_for(stored_dtype(path), compute_dtype))
    model = load_quantized(path, **from_pretrained_kwargs)
    has_tokenizer = any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    return model, AutoTokenizer.from_pretrained(path) if has_tokenizer else None
