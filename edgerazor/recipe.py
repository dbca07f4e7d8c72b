"""Recipe schema (pydantic) and loading: YAML files plus ``--set a.b=c`` overrides.

A recipe is one YAML document. Sections are frozen models that forbid unknown keys, so a typo is
an error naming the file, the key path and the allowed keys; later sections (distill, data,
train, export) slot in beside ``quant`` with defaults, so existing recipes keep validating.

Bad input is a one-line ``RecipeError`` naming the file (or ``--set`` override) and the key: an
unreadable, empty or non-mapping file, invalid UTF-8, duplicate keys, non-finite numbers, counts
and ratios out of range, and nesting deeper than ``MAX_DEPTH`` (refused before any recursion).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgerazor.errors import PluginError, RecipeError
from edgerazor.plugin_manager import get as get_plugin


def rho_for_bits(bits: float, high_bits: float, low_bits: float) -> float:
    """The super-group rho whose effective bit-width ``rho * high_bits + (1 - rho) * low_bits`` is ``bits``.

    With the paper's 4-bit / 1.58-bit quantizers: 4 -> 1, 2.79 -> 1/2, 1.88 -> 1/8, 1.58 -> 0.
    """
    if abs(bits - low_bits) < 0.005:
        return 0.0
    if not low_bits < bits <= high_bits + 1e-9:
        raise ValueError(f"weight bits {bits} outside [{low_bits:g}, {high_bits:g}] (the low and high quantizers' bits)")
    period = round((high_bits - low_bits) / (bits - low_bits))
    if abs(low_bits + (high_bits - low_bits) / period - bits) > 0.01:
        reachable = ", ".join(f"{nominal_weight_bits(1 / p, high_bits, low_bits):g}" for p in range(1, 9))
        raise ValueError(
            f"weight bits {bits} is not reachable by a super-group (one {high_bits:g}-bit row in every P); "
            f"reachable: {reachable}, ..."
        )
    return 1.0 / period


def quantizer_bits(name: str, key: str) -> float:
    """The storage bits a quantizer plugin declares; a ValueError naming the recipe key if it is unknown."""
    if not isinstance(name, str):
        raise ValueError(f"{key}: must be a quantizer plugin name, got {name!r}")
    try:
        return float(get_plugin("quantizers", name).bits)
    except PluginError as exc:
        raise ValueError(f"{key}: {exc}") from None


class Section(BaseModel):
    """The base of every recipe section: frozen, and unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


#: Seeds reach ``numpy.random.seed`` (through transformers' ``set_seed``), which takes [0, 2**32).
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


def nominal_weight_bits(rho: float, high_bits: float, low_bits: float) -> float:
    """The paper's label: ``rho * high_bits + (1 - rho) * low_bits`` rounded to 2 decimals (1/8, 4, 1.58 -> 1.88)."""
    return round(rho * high_bits + (1 - rho) * low_bits, 2)


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
    quantizer: str = Field("int8", description="quantizer plugin used when bits is 8 (must declare 8 bits)")
    group_size: int | None = Field(None, gt=0, description="default: the layer's weight group size")


class KVCacheQuant(Section):
    """Per-token K (after RoPE) and V quantization, per group along head_dim."""

    bits: Literal[8, 16] = 8
    quantizer: str = Field("int8", description="quantizer plugin used when bits is 8 (must declare 8 bits)")
    group_size: int | None = Field(None, gt=0, description="default: head_dim")


class TableQuant(Section):
    """Embedding or lm_head: a single quantizer for every row, or ``null`` to keep 16-bit."""

    quantizer: str | None = "int4"
    group_size: int | None = Field(None, gt=0, description="default: the weight group size")


class ComponentQuant(Section):
    """A component beyond decoder / embedding / lm_head (``quant.components.<name>``, e.g. ``vision``),
    named as the adapter's ``components()`` names it; an unset key keeps the adapter's default."""

    quantizer: str | None = Field("int4", description="quantizer plugin, or null to keep the component 16-bit")
    group_size: int | None = Field(None, gt=0, description="default: the adapter's for the component, else the weight group size")
    pad: bool | None = Field(None, description="zero-pad rows to a multiple of group_size (reported per layer)")
    include_conv3d: bool | None = Field(None, description="also quantize the component's nn.Conv3d (patch embedding)")


class QuantSection(Section):
    scheme: str | None = Field(None, description="W-A-KV shorthand such as '1.88-8-8' or '4-16-16'")
    weight: WeightQuant = WeightQuant()
    activation: ActivationQuant = ActivationQuant()
    kv_cache: KVCacheQuant = KVCacheQuant()
    embedding: TableQuant = TableQuant()
    lm_head: TableQuant = TableQuant()
    components: dict[str, ComponentQuant] = Field(
        default_factory=dict, description="other components by the adapter's names (vision, audio, ...)")
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
        weight = data.get("weight") if isinstance(data.get("weight"), dict) else {}
        fields = WeightQuant.model_fields
        high = weight.get("high", fields["high"].default)
        low = weight.get("low", fields["low"].default)
        high_bits = quantizer_bits(high, "quant.weight.high")
        low_bits = quantizer_bits(low, "quant.weight.low")
        implied = {
            ("weight", "rho"): rho_for_bits(w_bits, high_bits, low_bits),
            ("activation", "bits"): a_bits,
            ("kv_cache", "bits"): kv_bits,
        }
        data = dict(data)
        for (section, key), value in implied.items():
            sub = data.get(section) or {}
            if not isinstance(sub, dict):
                continue  # not a mapping: the section's own validation says so
            sub = dict(sub)
            if key in sub and not isinstance(sub[key], (int, float)):
                raise ValueError(f"quant.{section}.{key} must be a number, got {sub[key]!r}")
            if key in sub and not math.isclose(float(sub[key]), float(value), abs_tol=1e-9):
                raise ValueError(f"scheme {scheme!r} implies {section}.{key}={value}, but the recipe sets {sub[key]}")
            sub[key] = value
            data[section] = sub
        return data

    @property
    def w_a_kv(self) -> str:
        """``W-A-KV`` with W from the bits the ``weight.high`` / ``weight.low`` quantizers declare."""
        high = float(get_plugin("quantizers", self.weight.high).bits)
        low = high if self.weight.rho == 1 else float(get_plugin("quantizers", self.weight.low).bits)
        w = nominal_weight_bits(self.weight.rho, high, low)
        return f"{w:g}-{self.activation.bits}-{self.kv_cache.bits}"


class DataSource(Section):
    """One dataset in the mixture: a local file or directory, or a Hugging Face hub dataset id."""

    path: str = Field(min_length=1, description="a .json/.jsonl/.parquet/.txt file or a directory of them, or a hub dataset id")
    name: str | None = Field(None, description="hub dataset config name")
    split: str = Field("train", description="hub split (slicing allowed, e.g. 'train[:10%]'); local files are 'train'")
    format: Literal["text", "prompt_response", "chat", "video"] = Field(
        "text", description="video: jsonl {video, prompt, response} rows, built by a video-capable adapter (qwen2_5_omni)"
    )
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
    # video rows (edgerazor.data.video): {video_field: path relative to the file, prompt_field, response_field}
    video_field: str = Field("video", description="video rows: the column holding the clip's path")
    fps: float = Field(2.0, gt=0, description="video rows: frames sampled per second of clip (Qwen2.5-Omni: 2)")
    min_pixels: int = Field(128 * 28 * 28, gt=0, description="video rows: fewest pixels per resized frame")
    max_pixels: int = Field(768 * 28 * 28, gt=0, description="video rows: most pixels per resized frame")
    on_bad_video: Literal["error", "skip"] = Field(
        "error", description="a missing or unreadable clip: stop naming file and row, or skip it and count it"
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
    seed: Seed = 0
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of rows held out for evaluation")


class ModelSection(Section):
    adapter: str | None = Field(None, description="model adapter plugin, or 'auto' (default): chosen from config.model_type")
    trust_remote_code: bool = Field(False, description="let transformers run the model repository's own code")
    teacher: str | None = Field(None, description="teacher: a hub id or a local directory")
    student: str | None = Field(None, description="student initialisation; default: the teacher's weights")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="what teacher and student are stored, saved and exported in")
    compute_dtype: Literal["auto", "as_stored"] = Field(
        "auto", description="auto: compute in dtype where this device does so natively, else float32 (and no "
                            "train.bf16 autocast); as_stored: always as dtype says (edgerazor run --keep-dtype)")


class DistillSection(Section):
    """Eq. 1: ``a_task * CE + a_feature * L_feature + a_logit * L_logit`` plus plugin loss terms."""

    alpha_task: float = Field(0.1, ge=0)
    alpha_feature: float = Field(0.1, ge=0)
    alpha_logit: float = Field(2.0, ge=0)
    selector: str = Field("adaptive", description="feature-layer selector plugin (adaptive = LAFD)")
    selector_options: dict[str, Any] = Field(default_factory=lambda: {"k": 3})
    kl_mixer: str = Field("eakld", description="KL mixer plugin (eakld, forward, reverse, cakld)")
    kl_mixer_options: dict[str, Any] = Field(default_factory=lambda: {"K": 16})
    extra_losses: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict, description="loss plugin name -> weight"
    )
    chunk_size: int = Field(1024, gt=0, description="tokens per chunk of the full-vocabulary divergence")
    fused_logits: bool = Field(
        True, description="fuse the lm_heads into the chunked logit loss (no [tokens, V] logits held); "
        "models whose logits are post-processed, and extra_losses, use the unfused path"
    )


class TrainSection(Section):
    """Optimisation (AdamW) and checkpointing; fields map onto transformers.TrainingArguments."""

    learning_rate: float = Field(2e-5, gt=0)
    lr_scheduler: Literal["constant_with_warmup", "cosine", "linear", "constant"] = "constant_with_warmup"
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    max_steps: int = Field(-1, description="-1: run num_epochs; else the number of optimizer steps (> 0)")
    num_epochs: float = Field(1.0, gt=0)
    per_device_batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = False
    logging_steps: int = Field(10, gt=0)
    save_steps: int = Field(500, gt=0)
    save_total_limit: int | None = Field(2, gt=0)
    eval_steps: int | None = Field(
        None, gt=0, description="student perplexity on the eval rows every N optimizer steps and at the end"
    )
    seed: Seed = 42
    bf16: bool = False
    dataloader_num_workers: int = Field(0, ge=0)
    deepspeed: str | None = Field(
        None, description="DeepSpeed JSON config (configs/deepspeed/zero2.json, zero3.json, zero2-teacher-zero3.json): the "
        "student trains under its ZeRO stage, the teacher is whole or ZeRO-3-sharded as its 'teacher' section says; "
        "launch with torchrun, deepspeed or accelerate launch"
    )

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, value: int) -> int:
        """0 or another negative would train nothing (or forever) without saying so."""
        if value != -1 and value <= 0:
            raise ValueError("must be -1 (train for num_epochs) or a positive number of optimizer steps")
        return value


class ExportSection(Section):
    """How ``edgerazor export`` writes the student when ``--format`` is not given."""

    format: str = Field("packed", description="exporter plugin name (see `edgerazor plugins`)")


class EvalSection(Section):
    """Benchmark tasks ``edgerazor run`` scores teacher and student on when training ends (``edgerazor
    eval``'s options; results in ``<output>/eval/`` and ``results.json`` ``evaluation``). No tasks: none."""

    tasks: list[str] = Field(default_factory=list, description="lm-eval task names, e.g. [wikitext, gsm8k]")
    data_dir: str | None = Field(None, description="folder of the offline tasks' files (gsm8k/, humaneval/, wikitext-2/)")
    limit: float | None = Field(None, gt=0, description="examples per task (a fraction of each below 1)")
    batch_size: int = Field(1, gt=0)
    num_fewshot: int | None = Field(None, ge=0, description="default: each task's own (GSM8K 5, the rest 0)")
    seed: Seed = 42
    gen_kwargs: str | None = Field(None, description="generation settings as for --gen-kwargs, e.g. 'max_gen_toks=64'")
    max_length: int | None = Field(None, gt=1, description="context length (default: the model's)")
    allow_code_execution: bool = Field(False, description="let humaneval run the model's code (sandboxed child process)")
    teacher: bool = Field(True, description="score the teacher too (the table's 16-bit reference row)")


class DemoTeacher(Section):
    """The demo teacher's shape: a real Qwen3 architecture. Every input dim (hidden, intermediate,
    heads x head_dim) must be a multiple of the student's ``quant.weight.group_size``."""

    hidden_size: int = Field(256, gt=0)
    intermediate_size: int = Field(768, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(2, gt=0, description="must divide num_heads")
    head_dim: int = Field(64, gt=0)
    seq_len: int = Field(256, ge=2, description="the context the teacher is trained for, and the block length")

    @model_validator(mode="after")
    def _heads(self) -> "DemoTeacher":
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        return self


class DemoCorpus(Section):
    """The demo's data: the Python standard library's source, a byte-level BPE trained on it, packed blocks."""

    vocab_size: int = Field(4096, ge=260, description="BPE vocabulary, at least the 256 bytes and 4 special tokens")
    held_out: tuple[str, ...] = Field(
        ("argparse", "csv", "difflib", "fractions", "heapq", "json", "pprint", "shlex", "statistics", "textwrap"),
        min_length=1, description="stdlib modules kept out of tokenizer and teacher training, for evaluation",
    )
    train_chars: int | None = Field(None, gt=0, description="cap on training source characters (null: all)")
    eval_blocks: int | None = Field(192, gt=0, description="evenly spaced held-out blocks to evaluate on (null: all)")


class DemoPretrain(Section):
    """Teacher pretraining: AdamW (betas 0.9/0.95), linear warmup, then cosine decay to min_lr_ratio * lr."""

    steps: int = Field(1000, ge=0)
    learning_rate: float = Field(2e-3, gt=0)
    batch_size: int = Field(4, gt=0)
    warmup_steps: int = Field(50, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.1, ge=0)


class DemoSection(Section):
    """The offline demo's teacher, built by ``edgerazor.demo`` when a recipe with this section has no
    teacher; every value here decides the teacher, so changing one builds (and caches) a new one."""

    teacher: DemoTeacher = DemoTeacher()
    corpus: DemoCorpus = DemoCorpus()
    pretrain: DemoPretrain = DemoPretrain()
    seed: Seed = Field(0, description="corpus shuffle, teacher initialisation and batch order")


class DemoVideoClips(Section):
    """The video demo's synthetic clips: a coloured square or ring moving left, right, up or down."""

    size: int = Field(28, ge=28, multiple_of=28,
                      description="frame width and height in pixels, a multiple of 28 (whole merged patches)")
    frames: int = Field(4, ge=2, description="frames per clip")
    fps: int = Field(8, gt=0, description="the clips' frame rate (and the sampling rate: every frame is used)")
    object_size: int = Field(12, gt=0, description="side of the square and outer diameter of the ring, in pixels")
    speeds: tuple[int, ...] = Field((3, 4), min_length=1, description="pixels per frame a clip's object may move")
    train_per_caption: int = Field(32, gt=0, description="training renderings of each of the 32 captions")
    eval_per_caption: int = Field(3, gt=0, description="held-out renderings of each caption (new positions/speeds)")

    @model_validator(mode="after")
    def _fits(self) -> "DemoVideoClips":
        if min(self.speeds) <= 0 or self.object_size + max(self.speeds) * (self.frames - 1) > self.size:
            raise ValueError(f"speeds {list(self.speeds)}: an object of {self.object_size} px must move a positive "
                             f"number of pixels a frame and stay inside the {self.size} px frame for {self.frames} frames")
        return self


class DemoVideoTeacher(Section):
    """The video demo teacher: a real Qwen2.5-Omni thinker shape, tiny (text decoder, vision tower, audio tower)."""

    hidden_size: int = Field(128, gt=0)
    intermediate_size: int = Field(256, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(2, gt=0)
    vision_depth: int = Field(2, gt=0)
    vision_hidden_size: int = Field(64, gt=0)
    vision_intermediate_size: int = Field(128, gt=0)
    vision_heads: int = Field(2, gt=0)
    vocab_size: int = Field(320, ge=280, description="byte-level BPE on the captions and prompt, with special tokens")


class DemoVideoSection(Section):
    """The offline video demo (``edgerazor.demo_video``): clips, teacher shape and captioning training;
    every value decides the cached assets, so changing one builds a new cache entry."""

    clips: DemoVideoClips = DemoVideoClips()
    teacher: DemoVideoTeacher = DemoVideoTeacher()
    pretrain: DemoPretrain = DemoPretrain(steps=6000, learning_rate=3e-3, batch_size=16, warmup_steps=30)
    seed: Seed = Field(0, description="clip renderings, teacher initialisation and batch order")


class Recipe(Section):
    name: str = Field("edgerazor", min_length=1, max_length=128, description="also the run folder: runs/<name>")
    description: str = ""
    model: ModelSection = ModelSection()
    quant: QuantSection = QuantSection()
    distill: DistillSection = DistillSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    export: ExportSection = ExportSection()
    eval: EvalSection = EvalSection()
    demo: DemoSection | None = Field(None, description="the offline demo's teacher (used when there is no teacher)")
    demo_video: DemoVideoSection | None = Field(
        None, description="the offline video demo (edgerazor.demo_video): clips and captioning teacher")

    @field_validator("name")
    @classmethod
    def _one_folder_name(cls, value: str) -> str:
        """The name is the default output folder ``runs/<name>``: it must not reach outside ``runs/``."""
        if value in (".", "..") or any(c in value for c in "/\\\0"):
            raise ValueError("must be usable as one folder name (no '/', '\\', NUL; not '.' or '..')")
        return value


#: Deepest nesting a recipe, a ``--set`` value or a ``--set`` path may have. The schema needs 5 levels
#: (data.sources.0.path); the limit is checked before anything recurses, so no RecursionError.
MAX_DEPTH = 32
#: Most values one recipe may hold once YAML aliases are expanded (aliases can multiply a small file).
MAX_VALUES = 100_000
#: Largest recipe file read: anything bigger is not a recipe (and a device like /dev/zero never ends).
MAX_FILE_BYTES = 16 * 2**20


class _RefusedYAML(yaml.YAMLError):
    """YAML that parses but that a recipe refuses (a duplicate key, too deep); the message says why."""


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys (PyYAML silently keeps the last one) and nesting
    deeper than ``MAX_DEPTH`` (PyYAML's composer recurses, so a deep document ends in RecursionError)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise _RefusedYAML(f"nested deeper than {MAX_DEPTH} levels at line {line}")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` entries may be overridden by explicit keys
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in first_line:
                        raise _RefusedYAML(f"duplicate key {key!r} at line {line} (first at line "
                                           f"{first_line[key]}); a key may appear once per mapping")
                    first_line[key] = line
                except TypeError:
                    pass  # an unhashable key: the base constructor reports it
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line from a PyYAML error: where, then what (its own message spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    parts = [getattr(exc, "context", None), getattr(exc, "problem", None)]
    what = "; ".join(p for p in parts if p) or " ".join(str(exc).split())
    return f"{where}: {what}"


def _parse_yaml(text: str, what: str) -> Any:
    """``text`` parsed with ``RecipeLoader``; ``what`` names the file or override in the error."""
    try:
        return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except _RefusedYAML as exc:
        raise RecipeError(f"{what}: {exc}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{what} is not valid YAML{_yaml_problem(exc)}") from None


def _parse_override(item: str) -> tuple[list[str], Any]:
    """``"data.sources.0.prompt_field=q"`` -> (["data", "sources", "0", "prompt_field"], "q")."""
    if not isinstance(item, str):
        raise RecipeError(f"override {_short(item)} must be a string key.path=value")
    key, sep, raw = item.partition("=")
    parts = [part.strip() for part in key.split(".")]
    if not sep or not key.strip():
        raise RecipeError(f"override {_short(item)} must look like key.path=value (e.g. quant.weight.rho=0.5)")
    if not all(parts):
        raise RecipeError(f"override {_short(item)}: the key path {key.strip()!r} has an empty part")
    if len(parts) > MAX_DEPTH:
        raise RecipeError(f"override {_short(item)}: the key path is deeper than {MAX_DEPTH} levels")
    value = _parse_yaml(raw, f"override {_short(item)}: the value") if raw.strip() else None
    return parts, value


def _with_override(node: Any, parts: list[str], value: Any, item: str, done: tuple[str, ...] = ()) -> Any:
    """A copy of ``node`` with ``value`` at ``parts``; only the containers on the path are copied.

    A number indexes a list (``data.sources.0``); a mapping value merges into a mapping already there.
    """
    if not parts:
        return _merge(node, value) if isinstance(node, dict) and isinstance(value, dict) else value
    part, rest, here = parts[0], parts[1:], ".".join(done)
    if isinstance(node, (list, tuple)):
        if not part.isdigit():
            raise RecipeError(f"override {_short(item)}: {here} is a list; index it with a number, not {part!r}")
        index = int(part)
        if index >= len(node):
            raise RecipeError(f"override {_short(item)}: {here} has {len(node)} item(s), "
                              f"so index {index} is out of range")
        out = list(node)
        out[index] = _with_override(node[index], rest, value, item, (*done, part))
        return out
    if node is None and done:
        if part.isdigit():
            raise RecipeError(f"override {_short(item)}: {here} is not set, so it has no item {part}")
        node = {}  # a missing (or null) section: the override creates it
    if not isinstance(node, dict):
        raise RecipeError(f"override {_short(item)}: {here} is {_short(node)}, not a mapping or a list, "
                          f"so it has no {part!r}")
    out = dict(node)
    out[part] = _with_override(node.get(part), rest, value, item, (*done, part))
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> tuple[dict[str, Any], dict]:
    """``data`` with every override applied in order (``data`` itself is left alone), and which override
    set each key path, so a validation error can name the override that caused it."""
    origins: dict[tuple[str, ...], str] = {}
    for item in overrides or []:
        parts, value = _parse_override(item)
        data = _with_override(data, parts, value, item)
        origins[tuple(parts)] = item
    return data, origins


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["quant.weight.rho=0.5", ...]`` -> nested dict; values parse as YAML scalars."""
    return apply_overrides({}, overrides)[0]


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _origin(loc: tuple, origins: dict[tuple[str, ...], str], inside: bool = False) -> str:
    """`` (from override 'k=v')`` when an override set the key at ``loc``, or (``inside``: the error is
    about the value's kind or its own sub-keys) a key inside it."""
    key = tuple(str(p) for p in loc)
    for path, item in reversed(origins.items()):  # the last override of a key is the one that counts
        if key[:len(path)] == path or ((inside or len(key) >= 2) and path[:len(key)] == key):
            return f" (from override {_short(item)})"
    return ""


def _key(path: tuple) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _check_values(data: Any, source: str, origins: dict[tuple[str, ...], str]) -> None:
    """Refuse non-finite numbers anywhere (plugin options too), nesting deeper than ``MAX_DEPTH`` and
    more than ``MAX_VALUES`` values. Iterative: YAML aliases can build cycles and very deep trees."""
    stack: list[tuple[Any, tuple]] = [(data, ())]
    count = 0
    while stack:
        value, path = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise RecipeError(f"invalid recipe {source}: more than {MAX_VALUES} values (YAML aliases expanding?)")
        if isinstance(value, float) and not math.isfinite(value):
            raise RecipeError(f"invalid recipe {source}: {_key(path)}: must be a finite number, got {value}"
                              f"{_origin(path, origins)}")
        if isinstance(value, (dict, list, tuple)):
            if len(path) >= MAX_DEPTH:
                raise RecipeError(f"invalid recipe {source}: {_key(path[:4])}...: nested deeper than {MAX_DEPTH} "
                                  "levels (or a YAML alias refers to itself)")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend((v, (*path, k)) for k, v in items)


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed at ``loc`` (a pydantic error location) inside ``model``."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue  # a list item: its model is the list's item type, already taken
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        ann = next((a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)), ann)  # X | None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _format_errors(exc: ValidationError, source: str, origins: dict[tuple[str, ...], str] | None = None) -> str:
    """One line: every problem as ``key: what was expected (got value)``, joined by ``; ``."""
    problems = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        if err["type"] == "extra_forbidden":
            text = f"{_key(loc)}: unknown key; allowed here: {', '.join(_allowed_keys(Recipe, loc))}"
        else:
            got, kind = err.get("input"), err["type"].endswith("_type")  # a value of the wrong kind
            msg = err["msg"].removeprefix("Value error, ")
            text = f"{_key(loc)}: {msg}" + ("" if isinstance(got, dict) and not kind else f" (got {_short(got)})")
        problems.append(text + _origin(loc, origins or {}, inside=err["type"].endswith("_type")))
    return f"invalid recipe {source}: " + "; ".join(problems)


def recipe_from_dict(data: dict[str, Any], source: str = "<dict>", overrides: list[str] | None = None) -> Recipe:
    """Validate a recipe mapping (after ``overrides``); ``source`` names it in errors."""
    if not isinstance(data, dict):
        raise RecipeError(f"invalid recipe {source}: the top level must be a mapping of sections "
                          f"(name:, model:, quant:, ...), got {type(data).__name__}")
    data, origins = apply_overrides(data, overrides)
    _check_values(data, source, origins)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_format_errors(exc, source, origins)) from None


def _read_text(path: Path) -> str:
    """The file's text; every way a path can fail to be a readable UTF-8 file is a RecipeError naming it."""
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise RecipeError(f"recipe file {path} does not exist") from None
    except IsADirectoryError:
        raise RecipeError(f"recipe file {path} is a directory; give the recipe's .yaml file") from None
    except PermissionError:
        raise RecipeError(f"recipe file {path} cannot be read: permission denied") from None
    except OSError as exc:
        raise RecipeError(f"recipe file {path} cannot be read: {exc.strerror or exc}") from None
    except ValueError as exc:  # a NUL byte in the name
        raise RecipeError(f"recipe file {str(path)!r} is not a valid path: {exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise RecipeError(f"recipe file {path} is larger than {MAX_FILE_BYTES // 2**20} MiB: not a recipe")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise RecipeError(f"recipe file {path} is not valid UTF-8 (byte 0x{raw[exc.start]:02x} on line {line}); "
                          "save it as UTF-8") from None


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load and validate a recipe file (or the defaults when ``path`` is None), then apply overrides."""
    if path is None:
        return recipe_from_dict({}, "<defaults>", overrides)
    path = Path(path)
    data = _parse_yaml(_read_text(path), f"recipe file {path}")
    if data is None:
        raise RecipeError(f"recipe file {path} is empty: a recipe is a YAML mapping of sections "
                          "(name:, model:, quant:, train:, ...)")
    return recipe_from_dict(data, str(path), overrides)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
