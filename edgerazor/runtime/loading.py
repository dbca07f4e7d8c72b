"""``edgerazor.load``: one entry point for both kinds of saved student."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from edgerazor.quant.checkpoint import load_quantized
from edgerazor.runtime.packed import is_packed, load_packed


def load(path: str | Path, dense: bool = False, **from_pretrained_kwargs):
    """``(model, tokenizer)`` from a quantized checkpoint or a packed export.

    A checkpoint (``save_pretrained`` of a quantized model, ``edgerazor run``'s ``student/``) loads
    as a fake-quant model; a packed export loads as a model computing from the packed codes
    (``dense=True``: dequantized once at load, faster, float32 memory). The tokenizer is None when
    none was saved beside a checkpoint.
    """
    if is_packed(path):
        return load_packed(path, dense=dense)
    model = load_quantized(path, **from_pretrained_kwargs)
    has_tokenizer = any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    return model, AutoTokenizer.from_pretrained(path) if has_tokenizer else None
