"""Scoring a finished run on the recipe's ``eval:`` tasks: the saved student, loaded as ``edgerazor eval``
loads it (so the numbers are the ones a later ``edgerazor eval RUN`` prints), and the teacher as trained
against, into ``<output>/eval/`` (results.json, table.md, scores.png)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgerazor.evaluation.families import EvalRequest
from edgerazor.evaluation.models import SIXTEEN_BIT
from edgerazor.evaluation.records import evaluate as evaluate_request
from edgerazor.evaluation.records import settings, write_outputs

EVAL_FOLDER = "eval"


def request_from(section, model: str) -> EvalRequest:
    """An ``EvalRequest`` from a recipe's ``eval:`` section (the same options as ``edgerazor eval``)."""
    from edgerazor.evaluation.harness import parse_gen_kwargs

    return EvalRequest(model=model, tasks=list(section.tasks),
                       data_dir=Path(section.data_dir).expanduser() if section.data_dir else None,
                       limit=int(section.limit) if section.limit and section.limit >= 1 else section.limit,
                       batch_size=section.batch_size, num_fewshot=section.num_fewshot, seed=section.seed,
                       allow_code_execution=section.allow_code_execution,
                       gen_kwargs=parse_gen_kwargs(section.gen_kwargs), max_length=section.max_length)


def check_section(section) -> None:
    """Task names and data files are checked before training, not after it."""
    from edgerazor.evaluation.families import split_by_family
    from edgerazor.evaluation.harness import CODE_TASKS, TaskError, preflight

    code = [t for t in section.tasks if t in CODE_TASKS]
    if code and not section.allow_code_execution:
        raise TaskError(f"eval.tasks lists {code[0]}, which runs the model's code: set eval.allow_code_execution: "
                        "true to run it (sandboxed), or remove it")
    text = split_by_family(list(section.tasks)).get("text", [])
    if text:
        preflight(text, section.data_dir, section.allow_code_execution)
    if section.data_dir and not Path(section.data_dir).expanduser().is_dir():
        raise TaskError(f"eval.data_dir {section.data_dir}: no such folder")


def evaluate_run(section, teacher, teacher_tokenizer, teacher_location: str, output_dir: Path) -> dict[str, Any]:
    """Records of teacher (unless ``eval.teacher: false``) and student; the per-task scores and where the
    files are, for results.json."""
    from edgerazor.evaluation.harness import evaluate_model
    from edgerazor.evaluation.report import markdown_table, scores

    records = []
    if section.teacher:
        request = request_from(section, teacher_location)
        results = evaluate_model(teacher, teacher_tokenizer, request.tasks, data_dir=request.data_dir,
                                 limit=request.limit, batch_size=request.batch_size, num_fewshot=request.num_fewshot,
                                 seed=request.seed, allow_code_execution=request.allow_code_execution,
                                 gen_kwargs=request.gen_kwargs, max_length=request.max_length)
        results["edgerazor"] = {"model": teacher_location, "kind": "16-bit", "w_a_kv": SIXTEEN_BIT,
                                "label": "teacher", "settings": settings(request)}
        records.append(results)
    student = output_dir / "student"
    records.append(evaluate_request(request_from(section, str(student)), label="student"))
    written = write_outputs(records, output_dir / EVAL_FOLDER)
    print(markdown_table(records))
    return {"scores": {r["edgerazor"]["label"]: {t: s.value for t, s in scores(r).items()} for r in records},
            **{name.replace(".", "_"): str(path) for name, path in written.items()}}
