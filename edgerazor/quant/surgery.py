"""``quantize(model, recipe)``: swap a transformers model's layers for fake-quantized ones.

The allocation plugin decides each layer's row mask once; the mask becomes a buffer in the state
dict, so training, export and every runtime read the same allocation. The recipe is written into
``model.config.edgerazor`` so ``save_pretrained`` carries it and ``edgerazor.load`` can rebuild.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgerazor.adapters import ModelAdapter, resolve_adapter
from edgerazor.errors import PluginError, QuantizationError
from edgerazor.plugin_manager import get_plugins
from edgerazor.quant.kv import KVFakeQuant, wrap_attention_implementation
from edgerazor.quant.modules import ActivationFakeQuant, QuantConv3d, QuantEmbedding, QuantLinear, WeightFakeQuant
from edgerazor.recipe import QuantSection, Recipe, TableQuant, load_recipe, recipe_from_dict

#: components with their own recipe sections (quant.weight / quant.include, quant.embedding, quant.lm_head)
CORE_COMPONENTS = ("decoder", "embedding", "lm_head")

FORMAT_VERSION = 1


@dataclass
class LayerReport:
    name: str
    kind: str  # "linear", "conv3d", "embedding" or "lm_head"
    d_out: int
    d_in: int
    high: str
    low: str | None
    group_size: int
    high_fraction: float  # fraction of rows at the high precision (4-bit for SQMP layers)
    padded_d_in: int
    activation_bits: int
    component: str = "decoder"  # the adapter's component name (vision, audio, ...)

    @property
    def params(self) -> int:
        return self.d_out * self.d_in


@dataclass
class QuantReport:
    layers: list[LayerReport]
    w_a_kv: str
    adapter: str
    kv_layers: int
    kv_group_size: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "w_a_kv": self.w_a_kv,
            "adapter": self.adapter,
            "kv_layers": self.kv_layers,
            "kv_group_size": self.kv_group_size,
            "layers": [asdict(layer) for layer in self.layers],
        }

    def table(self):
        from rich.table import Table

        table = Table(title=f"EdgeRazor quantization ({self.w_a_kv}, adapter {self.adapter})")
        for col in ("layer", "kind", "shape", "high", "low", "G", "4-bit rows", "A"):
            table.add_column(col)
        for r in self.layers:
            padding = f" (zero-padded to {r.padded_d_in})" if r.padded_d_in != r.d_in else ""
            table.add_row(
                r.name, r.kind, f"{r.d_out}x{r.d_in}{padding}", r.high, r.low or "-", str(r.group_size),
                f"{r.high_fraction:.4f}", str(r.activation_bits),
            )
        return table


def _as_recipe(recipe: Recipe | dict | str | Path | None) -> Recipe:
    if recipe is None:
        return load_recipe(None)
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return recipe_from_dict(recipe)
    return load_recipe(recipe)


def _matches(name: str, patterns: list[str] | tuple[str, ...]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def _check_group(name: str, dim: int, group_size: int, pad: bool, what: str = "input dimension") -> int:
    """Padded dimension for ``dim``; raises unless G divides it or padding was asked for."""
    if dim % group_size == 0:
        return dim
    if pad:
        return -(-dim // group_size) * group_size
    divisors = ", ".join(str(g) for g in (8, 16, 32, 64, 128, 192, 256, 320) if dim % g == 0 and g < dim) or "a divisor"
    if what.startswith("head_dim"):  # K/V groups run along head_dim: padding would not help
        raise QuantizationError(
            f"layer {name!r}: quant.kv_cache.group_size {group_size} does not divide its head_dim {dim}; "
            f"use a group size that divides {dim} (e.g. {divisors}) or leave it unset (one group per head)"
        )
    raise QuantizationError(
        f"layer {name!r}: group size {group_size} does not divide its {what} {dim}; "
        f"use a group size that divides {dim} (e.g. {divisors}) "
        "or set quant.weight.pad=true to zero-pad each row to a multiple of the group size"
    )


def _allocate(name: str, allocation: str, d_out: int, rho: float, options: dict[str, Any]) -> torch.Tensor:
    fn = get_plugins().get("allocations", allocation)
    mask = fn(d_out, rho, layer_name=name, **options)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (d_out,):
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise PluginError(
            f"allocation {allocation!r} returned {got} for layer {name!r}; "
            f"expected a torch.bool tensor of shape ({d_out},)"
        )
    return mask


def _sized_quantizer(name: str, bits: int, section: str):
    """The ``quant.<section>.quantizer`` plugin, which must declare the section's ``bits`` (the A / KV label)."""
    quantizer = get_plugins().get("quantizers", name)
    if float(quantizer.bits) != float(bits):
        raise QuantizationError(
            f"quant.{section}.quantizer {name!r} declares {quantizer.bits:g} bits, but quant.{section}.bits is "
            f"{bits}; name a {bits}-bit quantizer or change quant.{section}.bits"
        )
    return quantizer


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _module_name(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def _component_specs(adapter: ModelAdapter, q: QuantSection, group: int) -> list[dict[str, Any]]:
    """The quantized components beyond decoder / embedding / lm_head: the adapter's defaults under the
    recipe's ``quant.components`` (whose names must be the adapter's)."""
    own = {c.name: c for c in adapter.components() if c.name not in CORE_COMPONENTS}
    for key in q.components:
        if key in CORE_COMPONENTS:
            raise QuantizationError(f"quant.components.{key}: set the {key} through quant.weight / quant.include, "
                                    "quant.embedding or quant.lm_head instead")
        if key not in own:
            raise QuantizationError(f"quant.components.{key}: adapter {adapter.name!r} has no component {key!r}; "
                                    f"its components: {', '.join(own) or '(none beyond decoder, embedding, lm_head)'}")
    specs = []
    for name, c in own.items():
        override = q.components.get(name)
        chosen = override.model_fields_set if override is not None else set()
        quantizer = override.quantizer if "quantizer" in chosen else (c.quantizer if c.quantized else None)
        if quantizer is None:
            continue
        pick = {key: getattr(override, key) if key in chosen and getattr(override, key) is not None else getattr(c, key)
                for key in ("pad", "include_conv3d")}
        g = (override.group_size if override is not None and override.group_size else None) or c.group_size or group
        specs.append({"name": name, "patterns": c.patterns, "quantizer": quantizer, "group_size": g} | pick)
    return specs


def quantize(
    model: nn.Module,
    recipe: Recipe | dict | str | Path | None = None,
    adapter: str | ModelAdapter | None = None,
) -> QuantReport:
    """Fake-quantize ``model`` in place as ``recipe`` says and return a per-layer report."""
    recipe = _as_recipe(recipe)
    q = recipe.quant
    config = model.config
    if not isinstance(adapter, ModelAdapter):
        adapter = resolve_adapter(config.model_type, adapter or recipe.model.adapter)
    adapter.check_model(model)  # a layout the adapter does not know is named as such, before anything else
    plugins = get_plugins()
    w = q.weight
    group = w.group_size or adapter.default_group_size
    high = plugins.get("quantizers", w.high)
    low = plugins.get("quantizers", w.low) if w.rho < 1 else None
    act = _sized_quantizer(q.activation.quantizer, q.activation.bits, "activation") if q.activation.bits < 16 else None
    include = q.include if q.include is not None else list(adapter.decoder_patterns)

    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    embed_name, head_name = _module_name(model, embed), _module_name(model, head)
    tied = head is not None and embed is not None and head.weight is embed.weight
    if any(isinstance(m, (QuantLinear, QuantEmbedding, QuantConv3d)) for m in model.modules()):
        raise QuantizationError("model is already quantized; quantize a fresh copy (never re-quantize codes)")

    layers: list[LayerReport] = []
    swaps: list[tuple[str, nn.Module]] = []  # applied only after every check passed: an error leaves the model as it was

    def act_quant(name: str, d_in: int, weight_group: int) -> ActivationFakeQuant | None:
        if act is None:
            return None
        a_group = q.activation.group_size or weight_group
        padded = _check_group(name, d_in, a_group, w.pad, "input (activation) dimension")
        return ActivationFakeQuant(act, q.activation.quantizer, a_group, padded)

    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and name not in (head_name, embed_name)
        and _matches(name, include)
        and not _matches(name, q.exclude)
    ]
    for name, linear in targets:
        d_out, d_in = linear.out_features, linear.in_features
        padded = _check_group(name, d_in, group, w.pad)
        mask = _allocate(name, w.allocation, d_out, w.rho, w.allocation_options)
        wq = WeightFakeQuant(d_out, d_in, high, low, (w.high, w.low if low else None), group, mask)
        wq.to(device=linear.weight.device if linear.weight.device.type != "meta" else "cpu")
        swaps.append((name, QuantLinear.from_linear(linear, wq, act_quant(name, d_in, group))))
        layers.append(LayerReport(name, "linear", d_out, d_in, w.high, wq.names[1], group,
                                  wq.high_fraction(), padded, q.activation.bits))

    done = {name for name, _ in targets}
    for spec in _component_specs(adapter, q, group):
        quantizer = plugins.get("quantizers", spec["quantizer"])
        for name, module in model.named_modules():
            is_conv = isinstance(module, nn.Conv3d) and spec["include_conv3d"]
            if not (isinstance(module, nn.Linear) or is_conv) or name in done or name in (head_name, embed_name):
                continue
            if not _matches(name, spec["patterns"]) or _matches(name, q.exclude):
                continue
            d_out = module.weight.shape[0]
            d_in = module.weight[0].numel()  # a Conv3d's flattened kernel: in_channels/groups x t x h x w
            padded = _check_group(name, d_in, spec["group_size"], spec["pad"],
                                  f"input dimension (quant.components.{spec['name']})")
            wq = WeightFakeQuant(d_out, d_in, quantizer, None, (spec["quantizer"], None), spec["group_size"],
                                 torch.ones(d_out, dtype=torch.bool), component=spec["name"])
            wq.to(device=module.weight.device if module.weight.device.type != "meta" else "cpu")
            swaps.append((name, QuantConv3d.from_conv3d(module, wq) if is_conv
                          else QuantLinear.from_linear(module, wq, None)))
            done.add(name)
            layers.append(LayerReport(name, "conv3d" if is_conv else "linear", d_out, d_in, spec["quantizer"], None,
                                      spec["group_size"], 1.0, padded, 16, spec["name"]))

    def table(name: str | None, module: nn.Module, spec: TableQuant, kind: str) -> WeightFakeQuant | None:
        if spec.quantizer is None or name is None:
            return None
        d_out, d_in = module.weight.shape
        g = spec.group_size or group
        padded = _check_group(name, d_in, g, w.pad)
        wq = WeightFakeQuant(d_out, d_in, plugins.get("quantizers", spec.quantizer), None,
                             (spec.quantizer, None), g, torch.ones(d_out, dtype=torch.bool), component=kind)
        layers.append(LayerReport(name, kind, d_out, d_in, spec.quantizer, None, g, 1.0, padded,
                                  q.activation.bits if kind == "lm_head" else 16, kind))
        return wq

    if tied and (q.embedding.quantizer, q.embedding.group_size) != (q.lm_head.quantizer, q.lm_head.group_size):
        raise QuantizationError(
            f"{head_name!r} and {embed_name!r} share one weight (tie_word_embeddings), so quant.embedding and "
            f"quant.lm_head must match: embedding={q.embedding.quantizer}/G{q.embedding.group_size}, "
            f"lm_head={q.lm_head.quantizer}/G{q.lm_head.group_size}"
        )
    if isinstance(embed, nn.Embedding) and not _matches(embed_name or "", q.exclude):
        wq = table(embed_name, embed, q.embedding, "embedding")
        if wq is not None:
            swaps.append((embed_name, QuantEmbedding.from_embedding(embed, wq)))
    if isinstance(head, nn.Linear) and not _matches(head_name or "", q.exclude):
        wq = table(head_name, head, q.lm_head, "lm_head")
        if wq is not None:
            a = act_quant(head_name, head.in_features, wq.group_size)
            swaps.append((head_name, QuantLinear.from_linear(head, wq, a)))

    kv_layers, kv_group = 0, None
    if q.kv_cache.bits == 8:
        kv_quantizer = _sized_quantizer(q.kv_cache.quantizer, q.kv_cache.bits, "kv_cache")
        for name, module, head_dim in adapter.attention_modules(model, include):
            if _matches(name, q.exclude):
                continue
            kv_group = q.kv_cache.group_size or head_dim
            _check_group(name, head_dim, kv_group, False, "head_dim (KV cache)")
            swaps.append((f"{name}.edgerazor_kv", KVFakeQuant(kv_quantizer, q.kv_cache.quantizer, kv_group)))
            kv_layers += 1
        if not kv_layers:
            raise QuantizationError(
                f"quant.kv_cache.bits=8, but adapter {adapter.name!r} finds no attention module under "
                f"{include} to quantize K and V in; set quant.kv_cache.bits=16 or use an adapter that knows "
                "this model's attention"
            )
    for name, module in swaps:
        _set_module(model, name, module)
    if kv_layers:
        wrap_attention_implementation(config)

    config.edgerazor = {"format_version": FORMAT_VERSION, "adapter": adapter.name,
                        "recipe": recipe.model_dump(mode="json")}
    return QuantReport(layers, q.w_a_kv, adapter.name, kv_layers, kv_group)
