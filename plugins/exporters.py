"""Built-in exporters: the packed format and GGUF, both written from the integer codes."""

from __future__ import annotations

from pathlib import Path

from edgerazor.hookspecs import hookimpl


def packed(model, out_dir, tokenizer=None, **options) -> Path:
    """True-bit safetensors + JSON metadata; ``edgerazor.load`` reads it back bit-exactly."""
    from edgerazor.export.packed import export_packed

    export_packed(model, tokenizer, out_dir)
    return Path(out_dir)


def gguf(model, out_dir, tokenizer=None, **options) -> Path:
    """A GGUF file stock llama.cpp loads (TQ1_0 / TQ2_0 / Q4_0 from the codes)."""
    from edgerazor.export.gguf import export_gguf

    return export_gguf(model, out_dir, tokenizer=tokenizer, **options)


@hookimpl
def register_exporters(register):
    register("packed", packed)
    register("gguf", gguf)
