"""Which harness evaluates a task: a *family* claims task names and evaluates a model on its own tasks.

``edgerazor eval`` splits ``--tasks`` by family and runs each family once per model; every family returns
lm-eval's results shape (``results -> task -> metric``), so the records, table and plot take them alike.
The text family (lm-evaluation-harness) takes every name no other family claims; a family registers
with ``register_family`` (a video family claims its task names and imports its harness only when run).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class EvalRequest:
    """Everything an evaluation is asked to do, whichever family runs it."""

    model: str  # what the user named: run folder, student, packed export, plain model directory or hub id
    tasks: list[str]
    data_dir: Path | None = None
    limit: int | float | None = None
    batch_size: int | str = 1
    num_fewshot: int | None = None
    seed: int = 42
    allow_code_execution: bool = False
    gen_kwargs: dict[str, Any] | None = None
    max_length: int | None = None
    device: str | None = None
    keep_dtype: bool = False
    dense: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskFamily:
    name: str
    claims: Callable[[str], bool]
    #: (request with only this family's tasks) -> (lm-eval-shaped results, the model's description)
    evaluate: Callable[[EvalRequest], tuple[dict[str, Any], dict[str, Any]]]


_FAMILIES: list[TaskFamily] = []


def register_family(family: TaskFamily) -> None:
    """Add (or replace, by name) a family; families registered later are asked first."""
    _FAMILIES[:] = [f for f in _FAMILIES if f.name != family.name]
    _FAMILIES.insert(0, family)


def families() -> list[TaskFamily]:
    return list(_FAMILIES)


def family_of(task: str) -> str:
    """The family that claims ``task``: the first registered one that does, else ``text``."""
    return next((f.name for f in _FAMILIES if f.name != "text" and f.claims(task)), "text")


def split_by_family(tasks: list[str]) -> dict[str, list[str]]:
    """``tasks`` grouped by family, each group in the order given."""
    out: dict[str, list[str]] = {}
    for task in tasks:
        out.setdefault(family_of(task), []).append(task)
    return out


def get_family(name: str) -> TaskFamily:
    return next(f for f in _FAMILIES if f.name == name)


def _evaluate_text(request: EvalRequest) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the model as ``edgerazor generate`` would and run lm-evaluation-harness on it."""
    from edgerazor.evaluation.harness import evaluate_model
    from edgerazor.evaluation.models import load_for_eval

    loaded = load_for_eval(request.model, keep_dtype=request.keep_dtype, dense=request.dense, device=request.device)
    results = evaluate_model(
        loaded.model, loaded.tokenizer, request.tasks, data_dir=request.data_dir, limit=request.limit,
        batch_size=request.batch_size, num_fewshot=request.num_fewshot, seed=request.seed,
        allow_code_execution=request.allow_code_execution, gen_kwargs=request.gen_kwargs,
        max_length=request.max_length,
    )
    return results, loaded.describe()


def _claims_video(task: str) -> bool:
    """Video tasks (lmms-eval) by name; asking imports nothing of lmms-eval."""
    from edgerazor.evaluation.video import is_video_task

    return is_video_task(task)


def _evaluate_video(request: EvalRequest) -> tuple[dict[str, Any], dict[str, Any]]:
    from edgerazor.evaluation.video import evaluate_request

    return evaluate_request(request)


register_family(TaskFamily("text", lambda task: True, _evaluate_text))
register_family(TaskFamily("video", _claims_video, _evaluate_video))
