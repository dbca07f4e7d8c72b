"""The offline tasks' documents, read from files under the user's ``--data-dir`` (never from the hub).

Layout under the data folder (each task reads only its own files)::

    gsm8k/test.jsonl            GSM8K problems to score ({"question", "answer"} per line)
    gsm8k/train.jsonl           the few-shot examples (needed for the paper's 5-shot)
    humaneval/HumanEval.jsonl   HumanEval problems (.jsonl.gz works too)
    wikitext-2/test.txt         WikiText-2 in its token format (`` = Title = `` lines, ``<unk>``, `` @-@ ``)
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

from edgerazor.errors import EdgeRazorError

#: lm-eval hands a task's metadata to its custom_dataset function; this key carries --data-dir
DATA_DIR_KEY = "edgerazor_data_dir"

GSM8K_TEST, GSM8K_TRAIN = "gsm8k/test.jsonl", "gsm8k/train.jsonl"
HUMANEVAL_FILES = ("humaneval/HumanEval.jsonl", "humaneval/HumanEval.jsonl.gz")
WIKITEXT_TEST = "wikitext-2/test.txt"

#: a top-level WikiText title: `` = Title = `` (sections are `` = = Section = = ``)
_TITLE = re.compile(r"^ = [^=].* = $")


class TaskDataError(EdgeRazorError):
    """An offline task's data file is missing or malformed; the message names the file and the line."""


def data_dir(metadata: dict) -> Path:
    value = metadata.get(DATA_DIR_KEY)
    if not value:
        raise TaskDataError("the offline tasks read their files from a data folder: pass --data-dir DIR "
                            f"(layout: {GSM8K_TEST}, {HUMANEVAL_FILES[0]}, {WIKITEXT_TEST})")
    return Path(value)


def _required(folder: Path, relative: str, task: str) -> Path:
    path = folder / relative
    if not path.is_file():
        raise TaskDataError(f"task {task}: {path} does not exist (the task reads {relative} under --data-dir {folder})")
    return path


def read_jsonl(path: Path, fields: tuple[str, ...]) -> list[dict]:
    """Rows of a jsonl file (gzip if it ends in .gz), each checked for ``fields``; a bad line is named."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise TaskDataError(f"{path}:{number}: not JSON ({exc})") from None
                missing = [k for k in fields if not isinstance(row, dict) or not isinstance(row.get(k), str)]
                if missing:
                    raise TaskDataError(f"{path}:{number}: no text field {', '.join(missing)}")
                rows.append({k: row[k] for k in fields})
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise TaskDataError(f"{path}: cannot be read ({exc})") from None
    if not rows:
        raise TaskDataError(f"{path}: holds no rows")
    return rows


def gsm8k_rows(folder: Path) -> dict[str, list[dict]]:
    """``test`` (scored) and, when present, ``train`` (few-shot examples)."""
    splits = {"test": read_jsonl(_required(folder, GSM8K_TEST, "gsm8k"), ("question", "answer"))}
    if (folder / GSM8K_TRAIN).is_file():
        splits["train"] = read_jsonl(folder / GSM8K_TRAIN, ("question", "answer"))
    return splits


def humaneval_rows(folder: Path) -> dict[str, list[dict]]:
    for relative in HUMANEVAL_FILES:
        if (folder / relative).is_file():
            fields = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
            return {"test": read_jsonl(folder / relative, fields)}
    raise TaskDataError(f"task humaneval: neither {' nor '.join(str(folder / r) for r in HUMANEVAL_FILES)} exists")


def wikitext_documents(text: str) -> list[str]:
    """WikiText's token format split into articles: each starts at its `` = Title = `` line and runs to
    the next one (section headings `` = = ... = = `` stay inside); text before the first title is dropped."""
    pages: list[list[str]] = []
    for line in text.splitlines(keepends=True):
        if _TITLE.match(line.rstrip("\n")):
            pages.append([])
        if pages:
            pages[-1].append(line)
    return ["".join(p) for p in pages]


def wikitext_rows(folder: Path) -> dict[str, list[dict]]:
    path = _required(folder, WIKITEXT_TEST, "wikitext")
    try:
        pages = wikitext_documents(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskDataError(f"{path}: cannot be read ({exc})") from None
    if not pages:
        raise TaskDataError(f"{path}: no ' = Title = ' line, so no document to score (WikiText's token format expected)")
    return {"test": [{"page": p} for p in pages]}


def as_datasets(splits: dict[str, list[dict]]):
    """The splits as a ``datasets.DatasetDict``, what lm-eval's tasks index into."""
    import datasets

    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})
