"""The exporter-registry form of GGUF export: the text model, plus the mmproj file where the model has one."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from edgerazor.errors import EdgeRazorError
from edgerazor.export.files import check_target
from edgerazor.export.gguf.check import not_an_edgerazor_gguf
from edgerazor.export.gguf.mmproj import default_mmproj_path, mmproj_spec, write_mmproj
from edgerazor.export.gguf.vocabulary import detect_pre_tokenizer
from edgerazor.export.gguf.writer import write_gguf


def export_gguf(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, filename: str = "model.gguf",
                type: str = "auto", strict: bool = False, overwrite: bool = False,
                mmproj: str | os.PathLike | None = None) -> Path:
    """Exporter-registry form (``fn(model, out_dir, **options) -> Path``) of :func:`write_gguf`.

    ``out_dir`` is a directory (the file is ``out_dir / filename``) or, ending in ``.gguf``, the file
    itself, as ``edgerazor export --out model.gguf`` names it. A model whose adapter describes an mmproj
    (Qwen2.5-Omni's vision encoder) also gets that file: ``mmproj``, else ``mmproj-<name>.gguf`` beside the
    text model. Both targets are checked before anything is written; the mmproj is written first and
    removed again if the text model then fails (unless it replaced an earlier export, which stays replaced).
    """
    path = Path(out_dir)
    path = path if path.suffix == ".gguf" else path / filename
    has_mmproj = mmproj_spec(model) is not None
    if mmproj is not None and not has_mmproj:
        write_mmproj(model, mmproj)  # refuses, naming the model and why
    if not has_mmproj:
        return write_gguf(model, tokenizer, path, type=type, strict=strict, overwrite=overwrite).path
    mm_path = Path(mmproj) if mmproj is not None else default_mmproj_path(path)
    if mm_path.resolve() == path.resolve():
        raise EdgeRazorError(f"the mmproj file and the text model cannot both be {path}")
    for target in (path, mm_path):
        check_target(target, overwrite, not_an_edgerazor_gguf, "GGUF file")
    if tokenizer is None:
        raise EdgeRazorError("GGUF export needs the tokenizer: llama.cpp reads the vocabulary from the file")
    detect_pre_tokenizer(tokenizer)  # an unsupported tokenizer is refused before any file is written
    existed = os.path.lexists(mm_path)
    write_mmproj(model, mm_path, strict=strict, overwrite=overwrite)
    try:
        return write_gguf(model, tokenizer, path, type=type, strict=strict, overwrite=overwrite).path
    except BaseException:
        if not existed:
            mm_path.unlink(missing_ok=True)
        raise
