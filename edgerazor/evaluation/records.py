"""Evaluating several models into records, and writing them: results.json, table.md and scores.png."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from edgerazor.errors import EdgeRazorError, OutputExistsError
from edgerazor.evaluation.families import EvalRequest, get_family, split_by_family
from edgerazor.version import __version__

RESULTS_FILE, TABLE_FILE, PLOT_FILE = "results.json", "table.md", "scores.png"

#: lm-eval's per-task maps, merged when several families evaluated one model
_PER_TASK = ("results", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")


def default_label(source: str, kind: str) -> str:
    name = Path(source).name or str(source)
    return f"{name} ({kind})"


def settings(request: EvalRequest) -> dict[str, Any]:
    data = asdict(request)
    data.pop("model")
    data["data_dir"] = str(request.data_dir) if request.data_dir else None
    return data


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One lm-eval results object from the families' objects (per-task maps joined; the rest from the first)."""
    merged = dict(parts[0])
    for part in parts[1:]:
        for key in _PER_TASK:
            if isinstance(part.get(key), dict):
                merged[key] = {**merged.get(key, {}), **part[key]}
    return merged


def evaluate(request: EvalRequest, label: str | None = None) -> dict[str, Any]:
    """One model's record: lm-eval's results object for every task, and an ``edgerazor`` entry with the
    model (kind, W-A-KV, compute dtype) and every setting."""
    parts, described = [], None
    for family, tasks in split_by_family(request.tasks).items():
        results, info = get_family(family).evaluate(replace(request, tasks=tasks))
        parts.append(results)
        described = described or info
    record = merge(parts)
    record["edgerazor"] = {"version": __version__, **(described or {}),
                           "label": label or default_label(request.model, (described or {}).get("kind", "model")),
                           "settings": settings(request)}
    return record


def records_from(paths: list[Path]) -> list[dict[str, Any]]:
    """Records saved by ``edgerazor eval --output`` (a results.json holds one or more)."""
    from edgerazor.evaluation.report import load_record

    out = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            path = path / RESULTS_FILE
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise EdgeRazorError(f"{path}: not JSON ({exc})") from None
        if isinstance(data, dict) and isinstance(data.get("models"), list):
            out.extend(data["models"])
        else:
            out.append(load_record(path))
    if not out:
        raise EdgeRazorError("no evaluation results to compare")
    return out


def write_outputs(records: list[dict[str, Any]], folder: Path) -> dict[str, Path]:
    """results.json, table.md and scores.png in ``folder``; an existing file there is never replaced."""
    from edgerazor.evaluation.report import bar_plot, markdown_table

    folder = Path(folder)
    targets = {name: folder / name for name in (RESULTS_FILE, TABLE_FILE, PLOT_FILE)}
    taken = [str(p) for p in targets.values() if p.exists()]
    if taken:
        raise OutputExistsError(f"{', '.join(taken)} already exist(s): choose another --output folder")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{RESULTS_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"models": records}, indent=2, allow_nan=False))
    os.replace(tmp, targets[RESULTS_FILE])
    targets[TABLE_FILE].write_text(markdown_table(records))
    bar_plot(records, targets[PLOT_FILE])
    return targets
