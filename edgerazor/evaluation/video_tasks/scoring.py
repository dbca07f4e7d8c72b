"""What the local video tasks' YAMLs name: where a row's clip is, its prompt, choices and target, and scoring.

Two layouts, as the benchmarks ship them:

- Video-MME: ``videoID``, ``question``, ``options`` (``["A. ...", "B. ...", ...]``), ``answer`` (a letter), optional
  ``duration``/``domain``/``sub_category``/``task_type``; the clip is ``<root>/data/<videoID>.mp4`` (``.MP4``,
  ``.mkv`` and ``.webm`` are found too).
- MLVU: ``video_name``, ``question``, ``candidates`` (option texts), ``answer`` (the right candidate's text or its
  letter), optional ``task_type``/``question_type``; the clip is ``<root>/<video_name>``.

``<root>`` is ``lmms_eval_specific_kwargs["video_root"]``, set by ``edgerazor.evaluation.video`` to the task's
folder under the data directory. Every question is answered with an option letter: the likelihood tasks rank the
letters by log-likelihood (highest wins), the generation tasks read the first option letter of the reply.
"""

from __future__ import annotations

import ast
import re
import string
from pathlib import Path
from typing import Any

from edgerazor.errors import EdgeRazorError

LETTERS = string.ascii_uppercase
VIDEO_SUFFIXES = (".mp4", ".MP4", ".mkv", ".webm")


class TaskRowError(EdgeRazorError):
    """A row of a local video task cannot be used; the message names the row and what is wrong."""


def _root(kwargs: dict | None) -> Path:
    root = (kwargs or {}).get("video_root")
    if not root:
        raise TaskRowError("no video_root: run the local video tasks through edgerazor.evaluation.video")
    return Path(root)


def _existing(path: Path, row: dict) -> str:
    for candidate in [path, *(path.with_suffix(s) for s in VIDEO_SUFFIXES)]:
        if candidate.is_file():
            return str(candidate)
    raise TaskRowError(f"question {_row_id(row)}: its video {path} does not exist")


def _row_id(row: dict) -> str:
    return str(row.get("question_id") or row.get("videoID") or row.get("video_name") or "?")


# ---------------------------------------------------------------------------------------------- Video-MME


def videomme_doc_to_visual(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> list[str]:
    return [_existing(_root(lmms_eval_specific_kwargs) / "data" / f"{doc['videoID']}.mp4", doc)]


def _videomme_letters(doc: dict) -> list[str]:
    letters = []
    for i, option in enumerate(doc["options"]):
        match = re.match(r"\s*\(?([A-Z])[.):]", option)
        letters.append(match.group(1) if match else LETTERS[i])
    return letters


def videomme_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    lines = [kwargs.get("pre_prompt", ""), doc["question"], *[str(o).strip() for o in doc["options"]]]
    return "\n".join(line for line in lines if line) + kwargs.get("post_prompt", "")


def videomme_doc_to_choice(doc: dict) -> list[str]:
    return _videomme_letters(doc)


def videomme_doc_to_target(doc: dict) -> int:
    return _answer_index(str(doc["answer"]).strip(), _videomme_letters(doc), None, doc)


# ---------------------------------------------------------------------------------------------------- MLVU


def mlvu_doc_to_visual(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> list[str]:
    return [_existing(_root(lmms_eval_specific_kwargs) / str(doc["video_name"]), doc)]


def mlvu_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    options = [f"({LETTERS[i]}) {str(c).strip()}" for i, c in enumerate(doc["candidates"])]
    lines = [kwargs.get("pre_prompt", ""), doc["question"], "Options:", *options]
    return "\n".join(line for line in lines if line) + kwargs.get("post_prompt", "")


def mlvu_doc_to_choice(doc: dict) -> list[str]:
    return list(LETTERS[: len(doc["candidates"])])


def mlvu_doc_to_target(doc: dict) -> int:
    answer = str(doc["answer"]).strip()
    texts = [str(c).strip() for c in doc["candidates"]]
    return _answer_index(answer, mlvu_doc_to_choice(doc), texts, doc)


# ------------------------------------------------------------------------------------------------ scoring


def _answer_index(answer: str, letters: list[str], texts: list[str] | None, doc: dict) -> int:
    """The right option's index: ``answer`` is its text (MLVU) or its letter, bare or as ``(B)`` / ``B.``."""
    if texts is not None and answer in texts:
        return texts.index(answer)
    match = re.fullmatch(r"\(?([A-Z])[.):]?", answer)
    if match and match.group(1) in letters:
        return letters.index(match.group(1))
    raise TaskRowError(f"question {_row_id(doc)}: answer {answer!r} is none of the options {letters}")


def extract_letter(reply: str, letters: list[str]) -> str | None:
    """The option a free-form reply picks: a leading letter (``B``, ``(B)``, ``B.``, ``B) text``), else the letter
    after "answer is" / "option", else the only option letter standing alone in the reply; None when unclear."""
    text = reply.strip()
    allowed = "".join(letters)
    lead = re.match(rf"^[\s*\"'`(\[]*([{allowed}])(?![A-Za-z])", text)
    if lead:
        return lead.group(1)
    said = re.search(rf"(?i:answer|option)\s*(?i:is|:)?\s*[\"'(\[]*([{allowed}])(?![A-Za-z])", text)
    if said:
        return said.group(1)
    alone = set(re.findall(rf"(?<![A-Za-z])([{allowed}])(?![A-Za-z])", text))
    return alone.pop() if len(alone) == 1 else None


def likelihood_results(doc: dict, results: list[tuple[float, bool]]) -> dict[str, Any]:
    """Accuracy of the option letter with the highest log-likelihood (the first of equals).

    lmms-eval's built-in multiple-choice scoring takes the *lowest* value, expecting models that return a
    loss; ``EdgeRazorVideoLMM.loglikelihood`` returns log-probabilities as the lmms API states, so these tasks
    score with this function instead.
    """
    lls = [float(loglikelihood_of(r)[0]) for r in results]
    choices = _choices(doc)
    if len(lls) != len(choices):
        raise TaskRowError(f"question {_row_id(doc)}: {len(lls)} scores for {len(choices)} options")
    best = max(range(len(lls)), key=lambda i: (lls[i], -i))
    return {"accuracy": float(best == _target(doc))}


def loglikelihood_of(response: Any) -> tuple[float, bool]:
    """A loglikelihood response as ``(logprob, is_greedy)``: lmms-eval 0.7.3 stores every response through
    ``str()`` (its generation unwrapping), so a tuple arrives as its text, read back here exactly (a float's
    repr round-trips)."""
    if isinstance(response, str):
        try:
            response = ast.literal_eval(response)
        except (ValueError, SyntaxError):
            raise TaskRowError(f"a loglikelihood response {response[:80]!r} is not (logprob, is_greedy)") from None
    logprob, greedy = response
    return float(logprob), bool(greedy)


def generation_results(doc: dict, results: list[str]) -> dict[str, Any]:
    """Accuracy of the option letter the generated reply picks (no letter: wrong)."""
    choices = _choices(doc)
    picked = extract_letter(results[0] if results else "", choices)
    return {"accuracy": float(picked is not None and choices.index(picked) == _target(doc))}


def _choices(doc: dict) -> list[str]:
    return videomme_doc_to_choice(doc) if "options" in doc else mlvu_doc_to_choice(doc)


def _target(doc: dict) -> int:
    return videomme_doc_to_target(doc) if "options" in doc else mlvu_doc_to_target(doc)


#: the fields each layout's rows must have
FIELDS = {"videomme": ("videoID", "question", "options", "answer"),
          "mlvu": ("video_name", "question", "candidates", "answer")}


def check_row(doc: dict, layout: str, number: int, video_root: str | Path) -> None:
    """Raise ``TaskRowError`` naming row ``number`` when it lacks a field, has fewer than two options, an answer
    that is none of them, or no clip under ``video_root`` (checked before lmms-eval builds the task: it reads
    rows while building and retries failing scoring calls)."""
    missing = [f for f in FIELDS[layout] if doc.get(f) is None]
    if missing:
        raise TaskRowError(f"row {number}: no {', '.join(missing)} (a {layout} row has {', '.join(FIELDS[layout])})")
    options = doc["options" if layout == "videomme" else "candidates"]
    if isinstance(options, str) or len(options) < 2:
        raise TaskRowError(f"row {number}: needs a list of at least two options, got {options!r}")
    visual = videomme_doc_to_visual if layout == "videomme" else mlvu_doc_to_visual
    try:
        _target(doc)
        visual(doc, {"video_root": str(video_root)})
    except TaskRowError as exc:
        raise TaskRowError(f"row {number}: {exc}") from None
