"""Built-in exporters: the packed format and GGUF, both written from the integer codes.

Each also carries ``size_report(path) -> dict``, read back from what it wrote, which
``edgerazor export`` prints (total bytes, compression against BF16, bytes per tensor).
"""

from __future__ import annotations

import json
from pathlib import Path

from edgerazor.errors import EdgeRazorError
from edgerazor.hookspecs import hookimpl


def packed(model, out_dir, tokenizer=None, overwrite: bool = False, **options) -> Path:
    """True-bit safetensors + JSON metadata; ``edgerazor.load`` reads it back bit-exactly.

    Option ``overwrite``: replace a previous packed export at ``out_dir`` (anything else there is refused).
    """
    from edgerazor.export.packed import export_packed

    if options:
        raise EdgeRazorError(f"the packed exporter takes the option overwrite; got {', '.join(sorted(options))}")
    export_packed(model, tokenizer, out_dir, overwrite=overwrite)
    return Path(out_dir)


def _packed_size_report(path) -> dict:
    from edgerazor.export.packed import METADATA_FILE

    return json.loads((Path(path) / METADATA_FILE).read_text())["size"]


def gguf(model, out_dir, tokenizer=None, type: str = "auto", strict: bool = False, filename: str = "model.gguf",
         overwrite: bool = False, mmproj=None, **options) -> Path:
    """A GGUF file stock llama.cpp loads (TQ1_0 / TQ2_0 / Q4_0 from the codes); ``out_dir`` may name the .gguf file.

    Options: ``type`` (auto, tq1_0, tq2_0, q4_0: an explicit type a tensor cannot take is an error),
    ``strict`` (refuse tensors no GGML type holds exactly), ``filename`` (inside ``out_dir``),
    ``overwrite`` (replace a GGUF file EdgeRazor wrote; anything else is refused), ``mmproj`` (where a
    multimodal model's vision encoder goes; default ``mmproj-<name>.gguf`` beside the text model).
    """
    from edgerazor.export.gguf import export_gguf

    if options:
        raise EdgeRazorError("the gguf exporter takes the options type, strict, filename, overwrite, mmproj; got "
                             f"{', '.join(sorted(options))}")
    return export_gguf(model, out_dir, tokenizer=tokenizer, filename=filename, type=type, strict=strict,
                       overwrite=overwrite, mmproj=mmproj)


def _gguf_size_report(path) -> dict:
    from edgerazor.export.gguf.report import read_report

    return read_report(path).to_dict()


packed.size_report = _packed_size_report
gguf.size_report = _gguf_size_report


@hookimpl
def register_exporters(register):
    register("packed", packed)
    register("gguf", gguf)
