"""Video evaluation with lmms-eval on a tiny local task: PyAV clips in the Video-MME and MLVU layouts and a
tiny quantized Qwen2.5-Omni thinker saved as a student.

lmms-eval's accuracies are checked against the same multiple-choice scoring done here with the model directly
(its own forward on the clip's pixels, its own greedy decoding loop); the log-likelihoods must be equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen2_5OmniThinkerForConditionalGeneration

import edgerazor
from edgerazor.data.video import VideoSpec, load_video, video_tokens
from edgerazor.evaluation.video import VIDEO_TASKS, VideoTaskError, evaluate_video
from edgerazor.evaluation.video_tasks.scoring import extract_letter, loglikelihood_of
from edgerazor.quant import QuantLinear
from tests.helpers import REPO
from tests.test_omni_run import clip, video_thinker

try:
    import lmms_eval  # noqa: F401
except ImportError:
    if os.environ.get("CI"):  # CI installs the video-eval path: its absence is a broken set-up
        raise
    pytest.skip("lmms-eval is not installed (pip install 'edgerazor[video-eval]' && pip install --no-deps "
                "lmms-eval==0.7.3)", allow_module_level=True)

#: the student's training video source: 56x56 frames (8 video tokens a clip at 8 frames, 4 fps -> 2 fps)
SAMPLING = dict(fps=2.0, min_pixels=28 * 28, max_pixels=28 * 28 * 4)
SPEC = VideoSpec(**SAMPLING)
COLOURS = ("red", "blue", "green", "white")
DIRECTIONS = ("left", "right", "up", "down")
#: (colour, direction, right option) of each Video-MME-layout question
VIDEOMME = [("red", "left", 0), ("blue", "right", 1), ("green", "up", 2), ("white", "down", 3), ("blue", "up", 0)]
MLVU = [("green", "left", 2), ("white", "right", 1), ("red", "up", 0)]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """(student dir, teacher dir): a tiny random thinker, and the same thinker quantized W4-A8-KV8 and saved as
    a student with its tokenizer and a recipe whose video source gives the sampling."""
    words = [f"the {c} square moves {d}" for c in COLOURS for d in DIRECTIONS]
    tok, config = video_thinker(words * 5 + ["Select the best answer. A. B. C. D. Options: (A) (B)"] * 5,
                                vocab_size=420)
    root = tmp_path_factory.mktemp("video_eval_models")
    torch.manual_seed(0)
    model = Qwen2_5OmniThinkerForConditionalGeneration(config).eval()
    model.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    recipe = {"quant": {"scheme": "4-8-8"},
              "data": {"sources": [{"path": "rows.jsonl", "format": "video", **SAMPLING}]}}
    edgerazor.quantize(model, recipe, adapter="qwen2_5_omni")
    model.save_pretrained(root / "student")
    tok.save_pretrained(root / "student")
    return root / "student", root / "teacher"


def _letters(n: int) -> str:
    return "ABCDEFG"[:n]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A local data directory with both layouts: videomme/test.jsonl + data/<videoID>.mp4, mlvu/test.jsonl +
    clips/<name>.mp4, every clip written with PyAV."""
    root = tmp_path_factory.mktemp("video_eval_data")
    (root / "videomme" / "data").mkdir(parents=True)
    rows = []
    for i, (colour, direction, right) in enumerate(VIDEOMME):
        clip(root / "videomme" / "data" / f"v{i}.mp4", colour, direction)
        options = [f"{colour} {direction}" if k == right else f"{COLOURS[(i + k + 1) % 4]} {DIRECTIONS[k]}"
                   for k in range(4)]
        rows.append({"videoID": f"v{i}", "question_id": f"q{i}", "duration": "short", "task_type": "motion",
                     "question": "Which square moves which way?",
                     "options": [f"{_letters(4)[k]}. the {o}" for k, o in enumerate(options)],
                     "answer": _letters(4)[right]})
    (root / "videomme" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "mlvu" / "clips").mkdir(parents=True)
    rows = []
    for i, (colour, direction, right) in enumerate(MLVU):
        clip(root / "mlvu" / "clips" / f"m{i}.mp4", colour, direction)
        candidates = [direction if k == right else DIRECTIONS[(DIRECTIONS.index(direction) + k + 1) % 4]
                      for k in range(4)]
        rows.append({"video_name": f"clips/m{i}.mp4", "question": f"Where does the {colour} square move?",
                     "candidates": candidates, "answer": direction, "task_type": "motion"})
    (root / "mlvu" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _rows(data_dir: Path, layout: str) -> list[dict]:
    return [json.loads(line) for line in (data_dir / layout / "test.jsonl").read_text().splitlines()]


def _question(row: dict, layout: str) -> tuple[Path, str, list[str], int]:
    """(clip, prompt text, option letters, right option) as the task YAMLs define them, written out here."""
    if layout == "videomme":
        path = Path("videomme") / "data" / f"{row['videoID']}.mp4"
        text = ("Select the best answer to the following multiple-choice question based on the video.\n"
                + row["question"] + "\n" + "\n".join(row["options"])
                + "\nAnswer with the option's letter from the given choices directly.")
        letters = [o[0] for o in row["options"]]
        return path, text, letters, letters.index(row["answer"])
    path = Path("mlvu") / row["video_name"]
    options = "\n".join(f"({_letters(4)[k]}) {c}" for k, c in enumerate(row["candidates"]))
    text = ("Carefully watch the video, then select the best option for the question.\n" + row["question"]
            + "\nOptions:\n" + options + "\nOnly give the best option.")
    return path, text, list(_letters(len(row["candidates"]))), row["candidates"].index(row["answer"])


def _prompt(tok, text: str, n_video: int) -> list[int]:
    rendered = f"<|im_start|>user\n<|vision_bos|>{'<|VIDEO|>' * n_video}<|vision_eos|>{text}<|im_end|>\n" \
               "<|im_start|>assistant\n"
    return tok(rendered, add_special_tokens=False)["input_ids"]


def _inputs(ids: list[int], clip_inputs: dict) -> dict:
    row = torch.tensor([ids])
    return {"input_ids": row, "attention_mask": torch.ones_like(row), **clip_inputs}


@torch.no_grad()
def direct_likelihoods(model, tok, data_dir: Path, layout: str, count: int | None = None) -> list[list[float]]:
    """Each option letter's log-probability after the prompt, from the model's plain forward on the pixels."""
    scores = []
    for row in _rows(data_dir, layout)[:count]:
        path, text, letters, _ = _question(row, layout)
        clip_inputs = load_video(data_dir / path, SPEC)
        prompt = _prompt(tok, text, video_tokens(clip_inputs["video_grid_thw"][0].tolist(), SPEC))
        row_scores = []
        for letter in letters:
            (target,) = tok(letter, add_special_tokens=False)["input_ids"]
            logits = model(**_inputs(prompt + [target], clip_inputs), use_cache=False).logits[0, -2].float()
            row_scores.append(float(torch.log_softmax(logits, -1)[target]))
        scores.append(row_scores)
    return scores


def accuracy(scores: list[list[float]], data_dir: Path, layout: str, count: int | None = None) -> float:
    rows = _rows(data_dir, layout)[:count]
    right = [_question(r, layout)[3] for r in rows]
    return sum(max(range(len(s)), key=lambda k: s[k]) == r for s, r in zip(scores, right)) / len(rows)


def logged_likelihoods(results: dict, task: str) -> list[list[float]]:
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[loglikelihood_of(r[0])[0] for r in s["resps"]] for s in samples]


def test_likelihood_tasks_equal_direct_scoring(student, data_dir):
    """Both layouts by likelihood: lmms-eval's accuracy equals argmax over the letters' log-probabilities
    computed here with the student's own forward, every log-likelihood equal; quantization is in effect (the
    teacher scores differently), and the best option is the highest score, not lmms-eval's built-in lowest."""
    student_dir, teacher_dir = student
    results = evaluate_video(student_dir, ["videomme_local", "mlvu_local"], data_dir, log_samples=True,
                             progress=False)
    model, tok = edgerazor.load(student_dir)
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    teacher = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(teacher_dir).eval()
    for task, layout, n in (("videomme_local", "videomme", len(VIDEOMME)), ("mlvu_local", "mlvu", len(MLVU))):
        direct = direct_likelihoods(model, tok, data_dir, layout)
        logged = logged_likelihoods(results, task)
        assert logged == direct  # the same numbers, bit for bit
        assert results["results"][task]["accuracy,none"] == accuracy(direct, data_dir, layout)
        assert results["n-samples"][task]["effective"] == n
        if layout == "videomme":  # the student's fake quantization is in effect: the teacher scores differently
            assert direct != direct_likelihoods(teacher, tok, data_dir, layout)
    # per question, the logged accuracy is that of the highest score; the lowest (lmms-eval's built-in rule for
    # multiple choice, made for models returning losses) would mark other questions right
    samples = sorted(results["samples"]["videomme_local"], key=lambda s: s["doc_id"])
    right = [_question(r, "videomme")[3] for r in _rows(data_dir, "videomme")]
    scores = logged_likelihoods(results, "videomme_local")
    highest = [float(max(range(4), key=lambda k: s[k]) == r) for s, r in zip(scores, right)]
    lowest = [float(min(range(4), key=lambda k: s[k]) == r) for s, r in zip(scores, right)]
    assert [s["accuracy"] for s in samples] == highest != lowest


@torch.no_grad()
def greedy_reply(model, tok, prompt: list[int], clip_inputs: dict, max_new_tokens: int) -> str:
    """Greedy decoding with a full forward per token (no cache), stopping at <|im_end|> or end of text."""
    stop = {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id}
    ids = list(prompt)
    for _ in range(max_new_tokens):
        logits = model(**_inputs(ids, clip_inputs), use_cache=False).logits[0, -1]
        token = int(logits.argmax())
        if token in stop:
            break
        ids.append(token)
    return tok.decode(ids[len(prompt):], skip_special_tokens=True)


def test_generation_tasks_equal_direct_decoding(student, data_dir):
    """Both layouts by generation (limit 2): every reply equals greedy decoding done here, and the accuracy is
    that of the option letter read from those replies."""
    student_dir, _ = student
    results = evaluate_video(student_dir, ["videomme_local_generate", "mlvu_local_generate"], data_dir, limit=2,
                             log_samples=True, progress=False)
    model, tok = edgerazor.load(student_dir)
    for task, layout in (("videomme_local_generate", "videomme"), ("mlvu_local_generate", "mlvu")):
        samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in samples] == [0, 1]
        hits = 0
        for sample, row in zip(samples, _rows(data_dir, layout)[:2]):
            path, text, letters, right = _question(row, layout)
            clip_inputs = load_video(data_dir / path, SPEC)
            prompt = _prompt(tok, text, video_tokens(clip_inputs["video_grid_thw"][0].tolist(), SPEC))
            reply = greedy_reply(model, tok, prompt, clip_inputs, max_new_tokens=16)
            assert sample["resps"][0][0] == reply
            picked = extract_letter(reply, letters)
            hits += picked is not None and letters.index(picked) == right
        assert results["results"][task]["accuracy,none"] == hits / 2


def test_edgerazor_eval_request_and_packed_export(student, data_dir, tmp_path):
    """The ``edgerazor eval`` family hook on a packed export of the student: the same log-likelihoods as the
    fake-quant student's direct forward (the packed runtime is exact), the model described as packed; a request
    without a data directory or with a batch size is refused before any model loads."""
    from edgerazor.evaluation.families import EvalRequest
    from edgerazor.evaluation.video import evaluate_request
    from edgerazor.export.packed import export_packed

    student_dir, _ = student
    model, tok = edgerazor.load(student_dir)
    export_packed(model, tok, tmp_path / "packed")
    results = evaluate_video(tmp_path / "packed", "videomme_local", data_dir, limit=2, log_samples=True,
                             progress=False)
    assert logged_likelihoods(results, "videomme_local") == direct_likelihoods(model, tok, data_dir, "videomme", 2)
    request = EvalRequest(model=str(tmp_path / "packed"), tasks=["mlvu_local"], data_dir=data_dir, limit=1)
    results, described = evaluate_request(request)
    assert described["kind"] == "packed" and described["w_a_kv"] == "4-8-8"
    assert results["results"]["mlvu_local"]["accuracy,none"] == accuracy(
        direct_likelihoods(model, tok, data_dir, "mlvu", 1), data_dir, "mlvu", 1)
    with pytest.raises(VideoTaskError, match="give the data directory \\(--data-dir\\)"):
        evaluate_request(EvalRequest(model="nowhere", tasks=["mlvu_local"]))
    with pytest.raises(VideoTaskError, match="--batch-size 4 is not supported"):
        evaluate_request(EvalRequest(model="nowhere", tasks=["mlvu_local"], data_dir=data_dir, batch_size=4))


def test_letter_extraction():
    letters = list("ABCD")
    assert [extract_letter(r, letters) for r in ("B", " (C) the red one", "D.", "The answer is A", "option: b",
                                                 "I think C is right", "none of these", "Maybe A or B", "E")] == \
        ["B", "C", "D", "A", None, "C", None, None, None]


def test_bad_tasks_and_rows_are_one_line_errors(student, data_dir, tmp_path):
    """Unknown task, missing folder, a row without a field or with an answer that is no option, a missing clip:
    each an error naming what and where, raised before any model loads."""
    student_dir, _ = student
    with pytest.raises(VideoTaskError, match="unknown video task.*videomme_local, "):
        evaluate_video(student_dir, ["videomme"], data_dir)
    with pytest.raises(VideoTaskError, match=f"{tmp_path / 'mlvu'} is not a directory"):
        evaluate_video(student_dir, ["mlvu_local"], tmp_path)
    (tmp_path / "mlvu").mkdir()
    with pytest.raises(VideoTaskError, match="no questions in .*test.jsonl, test.json, test\\*.parquet"):
        evaluate_video(student_dir, ["mlvu_local"], tmp_path)
    row = {"video_name": "m.mp4", "question": "Where?", "candidates": ["up", "down"], "answer": "left"}
    (tmp_path / "mlvu" / "test.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(VideoTaskError, match="task mlvu_local: .*test.jsonl: row 0: question m.mp4: answer 'left' is "
                                             "none of the options \\['A', 'B'\\]"):
        evaluate_video(student_dir, ["mlvu_local"], tmp_path)
    (tmp_path / "mlvu" / "test.jsonl").write_text(json.dumps({**row, "answer": "down"}) + "\n")
    with pytest.raises(VideoTaskError, match=f"row 0: question m.mp4: its video {tmp_path / 'mlvu' / 'm.mp4'} does "
                                             "not exist"):
        evaluate_video(student_dir, ["mlvu_local"], tmp_path)
    (tmp_path / "mlvu" / "test.jsonl").write_text(json.dumps({k: v for k, v in row.items() if k != "question"}))
    with pytest.raises(VideoTaskError, match="row 0: no question"):
        evaluate_video(student_dir, ["mlvu_local"], tmp_path)


def test_model_class_is_registered_and_nothing_else_imports_lmms_eval():
    """``edgerazor_video`` resolves through lmms-eval's registry; importing EdgeRazor, its CLI and the video
    entry point loads no lmms-eval module."""
    from lmms_eval.models import get_model

    from edgerazor.evaluation.video_model import EdgeRazorVideoLMM

    assert get_model("edgerazor_video") is EdgeRazorVideoLMM
    assert set(VIDEO_TASKS) == {p.stem for p in (REPO / "edgerazor" / "evaluation" / "video_tasks").glob("*.yaml")}
    code = ("import sys, edgerazor, edgerazor.cli, edgerazor.evaluation.video; "
            "print(sorted(m for m in sys.modules if m.startswith('lmms_eval')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
