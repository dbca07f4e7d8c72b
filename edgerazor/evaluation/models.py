"""What ``edgerazor eval MODEL`` evaluates: a run folder, a student, a packed export or a plain 16-bit model.

Students and packed exports load through ``edgerazor.load`` (fake quantization, A8 and KV8 active as
trained; a packed export computes from its codes); a plain model (a directory or a hub id) loads
through its family's adapter. Every kind computes in the dtype ``edgerazor generate`` would choose.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgerazor.errors import EdgeRazorError

#: the W-A-KV label of an unquantized model
SIXTEEN_BIT = "16-16-16"


def student_dir(path: Path) -> Path:
    """A run directory (``runs/<name>``) holds its student in ``student/``."""
    return path / "student" if (path / "student" / "config.json").is_file() else path


@dataclass
class EvalModel:
    model: Any
    tokenizer: Any
    kind: str  # "student", "packed" or "16-bit"
    source: str  # what the user named
    location: str  # the directory or hub id loaded
    w_a_kv: str
    compute: dict[str, Any]  # the precision plan's record (compute dtype and why)

    def describe(self) -> dict[str, Any]:
        return {"model": self.source, "location": self.location, "kind": self.kind, "w_a_kv": self.w_a_kv,
                **self.compute}


def _config_dict(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / "config.json").read_text())
    except ValueError as exc:
        raise EdgeRazorError(f"{directory / 'config.json'}: not JSON ({exc})") from None


def model_kind(spec: str) -> tuple[str, str]:
    """``(kind, location)`` for ``spec`` without loading weights; a bad path or hub id is one error line."""
    from edgerazor.runtime.packed import is_packed

    path = Path(spec).expanduser()
    if path.exists():
        directory = student_dir(path)
        if is_packed(directory):
            return "packed", str(directory)
        if not (directory / "config.json").is_file():
            raise EdgeRazorError(f"{spec}: not a model (no config.json, no packed export, no student/ of a run)")
        quantized = isinstance(_config_dict(directory).get("edgerazor"), dict)
        return ("student" if quantized else "16-bit"), str(directory)
    from edgerazor.shapes import resolve_model

    resolve_model(spec)  # a hub id: its config from the cache or the hub, or one line saying why not
    return "16-bit", spec


def _w_a_kv(model) -> str:
    from edgerazor.recipe import recipe_from_dict

    meta = getattr(model.config, "edgerazor", None) or {}
    if not meta.get("recipe"):
        return SIXTEEN_BIT
    return recipe_from_dict(meta["recipe"], "the model's config (edgerazor.recipe)").quant.w_a_kv


def load_for_eval(spec: str, keep_dtype: bool = False, dense: bool = False, device: str | None = None) -> EvalModel:
    """The model ``spec`` names, in evaluation mode, with its tokenizer (which every kind must have)."""
    import torch

    import edgerazor
    from edgerazor.adapters import resolve_adapter
    from edgerazor.precision import announce, plan
    from edgerazor.progress import library_bars_off
    from edgerazor.runtime.loading import stored_dtype
    from edgerazor.shapes import resolve_model

    kind, location = model_kind(spec)
    mode = "as_stored" if keep_dtype else "auto"
    with library_bars_off():
        if kind == "16-bit":
            config, _ = resolve_model(location)
            stored = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
            compute = plan(stored if stored in ("bfloat16", "float16") else "float32", mode, stored_by="the model's")
            announce(compute)
            adapter = resolve_adapter(config.model_type)
            model = adapter.load_teacher(location, compute.compute)
            tokenizer = adapter.load_tokenizer(location)
            w_a_kv = SIXTEEN_BIT
        else:
            compute = plan(stored_dtype(location), mode, stored_by="the model's")
            announce(compute)
            model, tokenizer = edgerazor.load(location, dense=dense, compute_dtype=compute.compute)
            if tokenizer is None:
                raise EdgeRazorError(f"{spec}: no tokenizer files beside the model: evaluation needs its tokenizer")
            w_a_kv = _w_a_kv(model)
    if kind == "packed":
        w_a_kv = _w_a_kv(model) if getattr(model.config, "edgerazor", None) else _packed_w_a_kv(Path(location))
    if device:
        model.to(torch.device(device))
    return EvalModel(model.eval(), tokenizer, kind, spec, location, w_a_kv, compute.record())


def _packed_w_a_kv(path: Path) -> str:
    from edgerazor.export.packed_format import METADATA_FILE

    return json.loads((path / METADATA_FILE).read_text()).get("w_a_kv", "?")
