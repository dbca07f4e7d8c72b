"""Recipe schema (pydantic) and loading: YAML files plus ``--set a.b=c`` overrides.

A recipe is one YAML document. Sections are frozen models that forbid unknown keys, so a typo is
an error naming the file, the key path and the allowed keys; later sections (distill, data,
train, export) slot in beside ``quant`` with defaults, so existing recipes keep validating.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgerazor.errors import RecipeError

#: Paper bit-widths counted the paper's way: effective bits = rho * 4 + (1 - rho) * 1.58.
TERNARY_BITS, HIGH_BITS = 1.58, 4.0


def rho_for_bits(bits: float) -> float:
    """The super-group rho whose effective bit-width is ``bits`` (4 -> 1, 2.79 -> 1/2, 1.88 -> 1/8, 1.58 -> 0)."""
    if abs(bits - TERNARY_BITS) < 0.005:
        return 0.0
    if not TERNARY_BITS < bits <= HIGH_BITS + 1e-9:
        raise ValueError(f"weight bits {bits} outside [{TERNARY_BITS}, {HIGH_BITS}]")
    period = round((HIGH_BITS - TERNARY_BITS) / (bits - TERNARY_BITS))
    if abs(TERNARY_BITS + (HIGH_BITS - TERNARY_BITS) / period - bits) > 0.01:
        raise ValueError(
            f"weight bits {bits} is not reachable by a super-group (one 4-bit row in every P); "
            "reachable: 4, 2.79, 2.39, 2.19, 2.06, 1.98, 1.93, 1.88, ..."
        )
    return 1.0 / period


class Section(BaseModel):
    """The base of every recipe section: frozen, and unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def nominal_weight_bits(rho: float) -> float:
    """The paper's label: ``rho * 4 + (1 - rho) * 1.58`` rounded to 2 decimals (1/8 -> 1.88)."""
    return round(rho * HIGH_BITS + (1 - rho) * TERNARY_BITS, 2)


class WeightQuant(Section):
    """Decoder linear weights: rows mix ``high`` (rho of them) and ``low`` precision."""

    rho: float = Field(0.125, ge=0.0, le=1.0, description="fraction of output rows at high precision")
    allocation: str = Field("super_group", description="allocation plugin name")
    allocation_options: dict[str, Any] = Field(default_factory=dict)
    high: str = Field("int4", description="quantizer plugin for high-precision rows")
    low: str = Field("ternary", description="quantizer plugin for the other rows")
    group_size: int | None = Field(None, gt=0, description="default: the model adapter's (Qwen3 256, MobileLLM 64)")
    pad: bool = Field(False, description="zero-pad rows whose input dim is not a multiple of group_size")


class ActivationQuant(Section):
    """Dynamic per-token, per-group activation quantization of every quantized linear's input."""

    bits: Literal[8, 16] = 8
    group_size: int | None = Field(None, gt=0, description="default: the layer's weight group size")


class KVCacheQuant(Section):
    """Per-token K (after RoPE) and V quantization, per group along head_dim."""

    bits: Literal[8, 16] = 8
    group_size: int | None = Field(None, gt=0, description="default: head_dim")


class TableQuant(Section):
    """Embedding or lm_head: a single quantizer for every row, or ``null`` to keep 16-bit."""

    quantizer: str | None = "int4"
    group_size: int | None = Field(None, gt=0, description="default: the weight group size")


class QuantSection(Section):
    scheme: str | None = Field(None, description="W-A-KV shorthand such as '1.88-8-8' or '4-16-16'")
    weight: WeightQuant = WeightQuant()
    activation: ActivationQuant = ActivationQuant()
    kv_cache: KVCacheQuant = KVCacheQuant()
    embedding: TableQuant = TableQuant()
    lm_head: TableQuant = TableQuant()
    include: list[str] | None = Field(None, description="module-name globs to quantize; default: the adapter's decoder")
    exclude: list[str] = Field(default_factory=list, description="module-name globs to leave in 16-bit")

    @model_validator(mode="before")
    @classmethod
    def _expand_scheme(cls, data: Any) -> Any:
        """Expand ``scheme`` into rho / activation.bits / kv_cache.bits; explicit values must agree."""
        if not isinstance(data, dict) or data.get("scheme") is None:
            return data
        scheme = data["scheme"]
        parts = str(scheme).split("-")
        if len(parts) != 3:
            raise ValueError(f"scheme {scheme!r} must be W-A-KV, e.g. '1.88-8-8' or '4-16-16'")
        try:
            w_bits, a_bits, kv_bits = float(parts[0]), int(parts[1]), int(parts[2])
        except ValueError:
            raise ValueError(f"scheme {scheme!r} must be W-A-KV with numbers, e.g. '1.88-8-8'") from None
        implied = {
            ("weight", "rho"): rho_for_bits(w_bits),
            ("activation", "bits"): a_bits,
            ("kv_cache", "bits"): kv_bits,
        }
        data = dict(data)
        for (section, key), value in implied.items():
            sub = dict(data.get(section) or {})
            if key in sub and not math.isclose(float(sub[key]), float(value), abs_tol=1e-9):
                raise ValueError(f"scheme {scheme!r} implies {section}.{key}={value}, but the recipe sets {sub[key]}")
            sub[key] = value
            data[section] = sub
        return data

    @property
    def w_a_kv(self) -> str:
        w = nominal_weight_bits(self.weight.rho)
        return f"{w:g}-{self.activation.bits}-{self.kv_cache.bits}"


class DataSource(Section):
    """One dataset in the mixture: a local file or directory, or a Hugging Face hub dataset id."""

    path: str = Field(description="a .json/.jsonl/.parquet/.txt file or a directory of them, or a hub dataset id")
    name: str | None = Field(None, description="hub dataset config name")
    split: str = Field("train", description="hub split (slicing allowed, e.g. 'train[:10%]'); local files are 'train'")
    format: Literal["text", "prompt_response", "chat"] = "text"
    ratio: float = Field(1.0, gt=0.0, description="relative weight of this source in the mixture")
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    prompt_separator: str = Field(
        "", description="prompt_response: text placed between prompt and response (part of the prompt, no loss)"
    )
    max_samples: int | None = Field(
        None, gt=0, description="cap on rows taken from this source: records, or packed blocks for 'text'"
    )

    def describe(self, index: int | None = None) -> str:
        """``data.sources[1] ('gsm8k/train.jsonl')``: how error messages name this source."""
        where = f"data.sources[{index}]" if index is not None else "data source"
        config = f", name={self.name!r}" if self.name else ""
        return f"{where} ({self.path!r}{config})"


class DataSection(Section):
    """Training data: a seeded mixture of sources, tokenized with response-only loss masks."""

    sources: list[DataSource] = Field(default_factory=list)
    max_length: int = Field(1024, gt=1, description="tokens per row: truncation, and the block size for text")
    strip_think: bool = Field(False, description="drop <think>...</think> blocks from responses / assistant turns")
    response_only: bool = Field(True, description="loss only on responses / assistant turns (text is all response)")
    num_samples: int | None = Field(
        None, gt=0, description="rows in the mixture; default: as many as the ratios allow without repeating"
    )
    seed: int = 0
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of rows held out for evaluation")


class ModelSection(Section):
    adapter: str | None = Field(None, description="model adapter plugin; default: chosen from config.model_type")
    teacher: str | None = Field(None, description="teacher: a hub id or a local directory")
    student: str | None = Field(None, description="student initialisation; default: the teacher's weights")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class DistillSection(Section):
    """Eq. 1: ``a_task * CE + a_feature * L_feature + a_logit * L_logit`` plus plugin loss terms."""

    alpha_task: float = Field(0.1, ge=0)
    alpha_feature: float = Field(0.1, ge=0)
    alpha_logit: float = Field(2.0, ge=0)
    selector: str = Field("adaptive", description="feature-layer selector plugin (adaptive = LAFD)")
    selector_options: dict[str, Any] = Field(default_factory=lambda: {"k": 3})
    kl_mixer: str = Field("eakld", description="KL mixer plugin (eakld, forward, reverse, cakld)")
    kl_mixer_options: dict[str, Any] = Field(default_factory=lambda: {"K": 16})
    extra_losses: dict[str, float] = Field(default_factory=dict, description="loss plugin name -> weight")
    chunk_size: int = Field(1024, gt=0, description="tokens per chunk of the full-vocabulary divergence")


class TrainSection(Section):
    """Optimisation (AdamW) and checkpointing; fields map onto transformers.TrainingArguments."""

    learning_rate: float = Field(2e-5, gt=0)
    lr_scheduler: Literal["constant_with_warmup", "cosine", "linear", "constant"] = "constant_with_warmup"
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    max_steps: int = Field(-1, description="-1: run num_epochs")
    num_epochs: float = Field(1.0, gt=0)
    per_device_batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = False
    logging_steps: int = Field(10, gt=0)
    save_steps: int = Field(500, gt=0)
    save_total_limit: int | None = Field(2, gt=0)
    eval_steps: int | None = Field(None, gt=0)
    seed: int = 42
    bf16: bool = False
    dataloader_num_workers: int = Field(0, ge=0)


class Recipe(Section):
    name: str = "edgerazor"
    description: str = ""
    model: ModelSection = ModelSection()
    quant: QuantSection = QuantSection()
    distill: DistillSection = DistillSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["quant.weight.rho=0.5", ...]`` -> nested dict; values parse as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"override {item!r} must look like key.path=value (e.g. quant.weight.rho=0.5)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise RecipeError(f"override {item!r}: value is not valid YAML: {exc}") from None
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed at ``loc`` (a pydantic error location) inside ``model``."""
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid recipe {source}:"]
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(Recipe, loc)
            lines.append(f"  {key}: unknown key; allowed here: {', '.join(allowed)}")
        else:
            got = err.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {key}: {err['msg']}{got_s}")
    return "\n".join(lines)


def recipe_from_dict(data: dict[str, Any], source: str = "<dict>", overrides: list[str] | None = None) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"invalid recipe {source}: the top level must be a mapping, got {type(data).__name__}")
    data = _merge(data, parse_overrides(overrides))
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_format_errors(exc, source)) from None


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load and validate a recipe file (or the defaults when ``path`` is None), then apply overrides."""
    if path is None:
        return recipe_from_dict({}, "<defaults>", overrides)
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe file {path} is not valid YAML: {exc}") from None
    return recipe_from_dict(data, str(path), overrides)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
