"""Reload a quantized checkpoint saved with ``save_pretrained``, allocation masks included.

``quantize`` writes the recipe into ``config.edgerazor`` and the row masks are buffers in the
state dict, so a plain ``model.save_pretrained(dir)`` holds everything. ``load`` rebuilds the
fake-quant modules from the recipe and then overwrites every mask with the stored one: the
checkpoint, not the allocation rule, is the source of truth.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig
from transformers.utils import logging as hf_logging

from edgerazor.errors import EdgeRazorError
from edgerazor.progress import library_bars_off
from edgerazor.adapters import resolve_adapter
from edgerazor.quant.modules import WeightFakeQuant
from edgerazor.quant.surgery import FORMAT_VERSION, quantize
from edgerazor.recipe import recipe_from_dict

MASK_SUFFIX = "weight_quant.precision_mask"


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise EdgeRazorError(f"{path} has no model.safetensors or model.safetensors.index.json")


def read_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """Every stored row mask, keyed by module name (without the buffer suffix)."""
    masks = {}
    for file in _safetensors_files(Path(path)):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key.endswith(MASK_SUFFIX):
                    masks[key[: -len(MASK_SUFFIX) - 1]] = f.get_tensor(key)
    return masks


def saved_names(model: torch.nn.Module, keys: list[str]) -> dict[str, str]:
    """The name ``save_pretrained`` gives each state-dict key: transformers renames some modules on save
    (GPT-NeoX's ``lm_head`` is written as ``embed_out``) and back on load, but our masks are read by name."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without conversion mappings saves under the module names
        return {k: k for k in keys}
    names = {}
    for key in keys:
        renamed = list(revert_weight_conversion(model, {key: torch.zeros(1)}))
        names[key] = renamed[0] if len(renamed) == 1 else key
    return names


def apply_masks(model: torch.nn.Module, masks: dict[str, torch.Tensor], source: str) -> None:
    owners = [name.removesuffix(".weight_quant") for name, m in model.named_modules() if isinstance(m, WeightFakeQuant)]
    stored_as = saved_names(model, [f"{o}.{MASK_SUFFIX}" for o in owners])
    for owner in owners:
        module = model.get_submodule(owner).weight_quant
        key = stored_as[f"{owner}.{MASK_SUFFIX}"].removesuffix("." + MASK_SUFFIX)
        if key not in masks and owner in masks:
            key = owner
        if key not in masks:
            raise EdgeRazorError(
                f"{source}: no stored precision mask for layer {owner!r} (key {owner}.{MASK_SUFFIX}); "
                "the checkpoint is incomplete or was saved before quantization"
            )
        stored = masks[key]
        if stored.shape != module.precision_mask.shape:
            raise EdgeRazorError(
                f"{source}: stored mask for {owner!r} has shape {tuple(stored.shape)}, "
                f"expected {tuple(module.precision_mask.shape)}"
            )
        module.precision_mask.copy_(stored.to(torch.bool))


def load_quantized(path: str | Path, **from_pretrained_kwargs):
    """Load a quantized checkpoint directory as a fake-quant transformers model."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise EdgeRazorError(f"{path} is not a model directory (no config.json)")
    config = AutoConfig.from_pretrained(path)
    meta = getattr(config, "edgerazor", None)
    if not isinstance(meta, dict) or "recipe" not in meta:
        raise EdgeRazorError(
            f"{path}/config.json has no 'edgerazor' entry: this is not an EdgeRazor checkpoint "
            "(quantize with edgerazor.quantize, then save_pretrained)"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise EdgeRazorError(
            f"{path}/config.json: edgerazor.format_version {meta.get('format_version')!r} is not supported "
            f"(this EdgeRazor reads version {FORMAT_VERSION})"
        )
    recipe = recipe_from_dict(meta["recipe"], f"{path}/config.json (edgerazor.recipe)")
    adapter = resolve_adapter(config.model_type, meta.get("adapter"))  # the family that was quantized
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the masks are "unexpected keys" to a plain model: we load them below
    try:
        with library_bars_off():
            model = adapter.model_class(config).from_pretrained(path, config=config, **from_pretrained_kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    quantize(model, recipe, adapter=adapter)
    apply_masks(model, read_masks(path), str(path))
    return model
