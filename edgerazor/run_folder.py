"""The output folder of ``edgerazor run``: what may be written there, and what ``--resume`` may change.

A run writes ``run.json`` (the teacher's location and the adapter, so a bare ``--resume`` finds
them), ``recipe.yaml``, ``checkpoints/``, ``student/`` and ``results.json``. A folder that already
holds something is refused unless the user resumes it or passes ``--overwrite`` for a previous
EdgeRazor run there (never for anything else); the replaced run is moved aside and removed only
when the new run has finished. ``--resume`` continues the latest complete checkpoint only with the
recipe it was trained with: a change the checkpoint cannot honour (quantization, allocation, data,
optimiser and schedule, model) is refused naming the keys, and the changes that are safe (more
steps, logging and saving intervals) need ``--accept-changes``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from edgerazor.errors import EdgeRazorError, OutputExistsError

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"

#: recipe keys a resumed run may change (with --accept-changes): they do not alter what was trained so far
SAFE_RESUME_CHANGES = frozenset({
    "name", "description", "train.max_steps", "train.num_epochs", "train.logging_steps", "train.save_steps",
    "train.save_total_limit", "train.eval_steps", "train.dataloader_num_workers", "export.format",
    "model.compute_dtype",  # the arithmetic, not what is stored: a resume on another machine may differ
}) | {f"eval.{key}" for key in ("tasks", "data_dir", "limit", "batch_size", "num_fewshot", "seed", "gen_kwargs",
                                "max_length", "allow_code_execution", "teacher")}  # scored after training


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay whole (a changed source list is one change)."""
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def recipe_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Every dotted key whose value differs between two recipe dumps: key -> (old, new)."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` holds a previous ``edgerazor run`` (its run.json or recipe.yaml and checkpoints)."""
    return (path / RUN_FILE).is_file() or ((path / "recipe.yaml").is_file() and (path / CHECKPOINTS).is_dir())


@dataclass
class OutputPlan:
    """What ``prepare_output`` decided: where to write, the checkpoint resumed, a run replaced."""

    folder: Path
    checkpoint: Path | None = None
    replaced: Path | None = None  # the previous run, moved aside until the new one has finished
    stored: dict[str, Any] | None = None  # run.json of the folder (teacher, adapter), when resuming

    def abort(self) -> None:
        """The new run failed: remove what it wrote and put the replaced run back where it was."""
        if self.replaced is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.replaced.rename(self.folder)
            self.replaced = None

    def finish(self) -> None:
        """The new run is complete: the run it replaced can go."""
        if self.replaced is not None:
            shutil.rmtree(self.replaced, ignore_errors=True)
            self.replaced = None


def _format_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    def short(value: Any) -> str:
        text = json.dumps(value)
        return text if len(text) <= 40 else text[:37] + "..."

    return ", ".join(f"{k} ({short(a)} -> {short(b)})" for k, (a, b) in changes.items())


def check_resume(folder: Path, recipe_dump: dict[str, Any], accept_changes: bool) -> Path:
    """The latest complete checkpoint under ``folder``, after checking the recipe may continue it."""
    from edgerazor.distill.trainer import latest_checkpoint

    checkpoint = latest_checkpoint(folder / CHECKPOINTS)
    if checkpoint is None:
        raise EdgeRazorError(f"--resume: {folder / CHECKPOINTS} has no complete checkpoint to resume "
                             "(run without --resume to start this run)")
    saved = checkpoint / "recipe.yaml"
    try:
        old = yaml.safe_load(saved.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise EdgeRazorError(f"--resume: cannot read {saved}: {exc}".splitlines()[0]) from None
    if not isinstance(old, dict):
        raise EdgeRazorError(f"--resume: {saved} is not a recipe (expected a mapping)")
    changes = recipe_changes(old, recipe_dump)
    unsafe = {k: v for k, v in changes.items() if k not in SAFE_RESUME_CHANGES}
    if unsafe:
        raise EdgeRazorError(
            f"--resume: {checkpoint.name} was trained with another recipe; it cannot continue with changed "
            f"{_format_changes(unsafe)}. Resume with the recipe in {saved}, or start a new run (another --output)"
        )
    if changes and not accept_changes:
        raise EdgeRazorError(
            f"--resume: the recipe changes {_format_changes(changes)} against {saved}; these are safe to change "
            "on resume: pass --accept-changes to continue with them"
        )
    return checkpoint


def prepare_output(folder: Path, recipe_dump: dict[str, Any], resume: bool, overwrite: bool,
                   accept_changes: bool = False) -> OutputPlan:
    """Check ``folder`` before any weights load: resume a checkpoint, replace a previous run, or refuse."""
    if resume:
        if not folder.is_dir():
            raise EdgeRazorError(f"--resume: the output folder {folder} does not exist (nothing to resume)")
        checkpoint = check_resume(folder, recipe_dump, accept_changes)
        return OutputPlan(folder, checkpoint=checkpoint, stored=read_run_file(folder))
    if os.path.lexists(folder):
        if folder.is_symlink() or not folder.is_dir():
            raise OutputExistsError(f"--output {folder} exists and is not a folder; choose another output folder")
        if any(folder.iterdir()):
            if not overwrite:
                raise OutputExistsError(
                    f"the output folder {folder} already holds files; pass --resume to continue its run, "
                    "--overwrite to replace a previous EdgeRazor run there, or choose another --output"
                )
            if not is_run_folder(folder):
                raise OutputExistsError(
                    f"the output folder {folder} is not a previous EdgeRazor run (no {RUN_FILE}, or recipe.yaml "
                    "with checkpoints/); refusing to replace it, even with --overwrite: choose another --output"
                )
            aside = folder.with_name(f".{folder.name}.replaced-{os.getpid()}")
            folder.rename(aside)
            return OutputPlan(folder, replaced=aside)
    return OutputPlan(folder)


def write_run_file(folder: Path, teacher: str, adapter: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps({"teacher": teacher, "adapter": adapter}, indent=1))
    os.replace(tmp, folder / RUN_FILE)


def read_run_file(folder: Path) -> dict[str, Any] | None:
    path = folder / RUN_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgeRazorError(f"{path} cannot be read: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict) or not isinstance(data.get("teacher"), str):
        raise EdgeRazorError(f"{path} is damaged: expected an object with a 'teacher' location")
    return data
