"""Where the teacher lives while the student trains, decided in one place (``teacher_placement``, then
``place_teacher``), so another engine (e.g. FSDP2) is one more kind here and the trainer stays as it is.

- ``replicated``: every rank holds the whole teacher (one process, DDP, or a ZeRO-2 student by default).
- ``zero3``: DeepSpeed ZeRO-3 in inference mode. The teacher is built under ``deepspeed.zero.Init``
  (transformers' ``HfDeepSpeedConfig`` switches ``from_pretrained`` to it), which loads it layer by layer
  straight into each rank's shard: no rank ever holds the whole teacher. A DeepSpeed engine without an
  optimizer then installs the hooks that gather each module's weights for its forward and free them after.
  Those gathers are collectives, so every rank runs every teacher forward, in the same order.

A ZeRO-3 student always gets a ZeRO-3 teacher (its config without optimizer and scheduler). A ZeRO-2
student gets a replicated teacher unless its DeepSpeed config holds a ``"teacher"`` object: the
teacher's own DeepSpeed config (stage 3: sharded; stage 0: replicated), e.g.
``configs/deepspeed/zero2-teacher-zero3.json``. DeepSpeed runs the two engines side by side in one process.
"""

from __future__ import annotations

import copy
import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from edgerazor.errors import EdgeRazorError

#: top-level keys of a training config that an inference engine has no use for
_TRAINING_ONLY = ("optimizer", "scheduler", "gradient_clipping", "train_batch_size", "teacher")

# engines of placed teachers, kept alive as long as the process runs (their hooks live on the modules)
_ENGINES: dict[int, Any] = {}


@dataclass(frozen=True)
class TeacherPlacement:
    kind: str  # "replicated" or "zero3"
    config: dict[str, Any] | None = field(default=None, compare=False)  # the teacher's DeepSpeed config (zero3)
    reason: str = ""  # why this placement, for the log line

    @property
    def sharded(self) -> bool:
        return self.kind == "zero3"


REPLICATED = TeacherPlacement("replicated", reason="no DeepSpeed config")


def read_deepspeed_config(path: str | Path) -> dict[str, Any]:
    """The DeepSpeed JSON config at ``path``. Missing, unreadable or not a JSON object: one line."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except OSError as exc:
        raise EdgeRazorError(f"DeepSpeed config {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise EdgeRazorError(f"DeepSpeed config {path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise EdgeRazorError(f"DeepSpeed config {path} must be a JSON object, not {type(config).__name__}")
    teacher = config.get("teacher")
    if teacher is not None:
        if not isinstance(teacher, dict):
            raise EdgeRazorError(f"DeepSpeed config {path}: \"teacher\" must be a JSON object (the teacher's own "
                                 f"DeepSpeed config), not {type(teacher).__name__}")
        if zero_stage(teacher) not in (0, 3):
            raise EdgeRazorError(f"DeepSpeed config {path}: teacher.zero_optimization.stage is {zero_stage(teacher)}; "
                                 "a teacher is sharded with stage 3 or replicated with stage 0 (it has no optimizer "
                                 "or gradients for stages 1-2 to shard)")
    return config


def student_config(config: dict[str, Any]) -> dict[str, Any]:
    """What the Trainer's DeepSpeed engine gets: the config without the teacher's own section."""
    return {k: v for k, v in config.items() if k != "teacher"}


def zero_stage(config: dict[str, Any]) -> int:
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def inference_config(base: dict[str, Any], micro_batch: int, hidden_size: int, dtype: str) -> dict[str, Any]:
    """A ZeRO-3 inference config from a training one: no optimizer, scheduler or clipping, the ``"auto"``
    values filled as the Trainer fills them (bucket sizes and the persistence threshold from the hidden size)."""
    config = {k: copy.deepcopy(v) for k, v in base.items() if k not in _TRAINING_ONLY}
    zero = dict(config.get("zero_optimization") or {})
    zero["stage"] = 3
    zero.pop("offload_optimizer", None)
    filled = {"reduce_bucket_size": hidden_size * hidden_size,
              "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
              "stage3_param_persistence_threshold": 10 * hidden_size}
    for key, value in list(zero.items()):
        if value == "auto":
            if key in filled:
                zero[key] = filled[key]
            else:
                del zero[key]
    for key, value in filled.items():
        zero.setdefault(key, value)
    config["zero_optimization"] = zero
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["gradient_accumulation_steps"] = 1
    config["bf16"] = {"enabled": dtype == "bfloat16"}
    config["fp16"] = {"enabled": dtype == "float16"}
    return {k: v for k, v in config.items() if v != "auto"}


def teacher_placement(deepspeed: str | Path | None, micro_batch: int, hidden_size: int,
                      dtype: str = "float32") -> TeacherPlacement:
    """The teacher's placement for a run with DeepSpeed config ``deepspeed`` (None: replicated)."""
    if not deepspeed:
        return REPLICATED
    config = read_deepspeed_config(deepspeed)
    own = config.get("teacher")
    if own is not None:
        if zero_stage(own) == 0:
            return TeacherPlacement("replicated", reason=f"{deepspeed}: teacher stage 0")
        return TeacherPlacement("zero3", inference_config(own, micro_batch, hidden_size, dtype),
                                f"{deepspeed}: the teacher's own ZeRO-3 inference config")
    if zero_stage(config) == 3:
        return TeacherPlacement("zero3", inference_config(config, micro_batch, hidden_size, dtype),
                                f"{deepspeed}: ZeRO-3 student, teacher sharded alike (inference mode)")
    return TeacherPlacement("replicated", reason=f"{deepspeed}: ZeRO-{zero_stage(config)} student, no \"teacher\" "
                                                 "section")


def place_teacher(load: Callable[[], nn.Module], placement: TeacherPlacement) -> nn.Module:
    """Load the teacher (``load()`` calls ``from_pretrained``) where ``placement`` says, in eval mode.

    ``zero3``: every rank calls this at the same time (loading and the engine's set-up are collectives)."""
    if not placement.sharded:
        return load().eval()  # still trainable: the student may be its copy (the trainer freezes it)
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from edgerazor.ranks import init_process_group

    init_process_group()
    config = placement.config
    switch = HfDeepSpeedConfig(config)  # while it lives, from_pretrained builds under deepspeed.zero.Init
    try:
        model = load()
    finally:
        del switch
        unset_hf_deepspeed_config()  # the student loads whole; the Trainer sets its own config later
    whole = [name for name, p in model.named_parameters() if not hasattr(p, "ds_id")]
    if whole:  # built outside deepspeed.zero.Init: every rank would have held the whole teacher
        raise EdgeRazorError(f"the teacher was not built sharded (e.g. {whole[0]} is whole): its class or loader "
                             "bypasses deepspeed.zero.Init; use a teacher stage 0 (replicated) for this model")
    model.eval().requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    _ENGINES[id(model)] = engine
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s weights are ZeRO-3 partitions (empty outside a forward)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def gathered(params) -> Any:
    """A context in which ZeRO-3 partitioned ``params`` are whole (read-only); nothing for whole ones.

    For any read of weights outside a forward: the fused loss's lm_head, a save, an export."""
    params = [p for p in params if p is not None]
    if not any(hasattr(p, "ds_id") for p in params):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

