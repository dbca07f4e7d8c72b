"""Video benchmarks for a Qwen2.5-Omni student with lmms-eval, in-process and offline.

``evaluate_video(model, tasks, data_dir, limit)`` loads the model as ``edgerazor eval`` does (a run folder,
student, packed export or 16-bit thinker; fake quantization active as trained), wraps it in
``EdgeRazorVideoLMM`` and runs lmms-eval's ``simple_evaluate`` on local tasks in the layouts of Video-MME and
MLVU (``VIDEO_TASKS``; configs in ``video_tasks/``), returning lmms-eval's results dict. Each task reads its
questions from ``<data_dir>/<folder>/test.jsonl`` (or ``test.json``, ``test*.parquet``) and its clips from
the same folder; only lmms-eval's local builders are used, so no task reaches the hub. Every row is checked
(fields, options, answer, clip present) before the model loads.

lmms-eval is optional and is installed without its declared dependencies (they pin a CUDA torchvision and an
older PyAV); ``pip install 'edgerazor[video-eval]'`` adds what this path needs. Nothing else in EdgeRazor
imports lmms-eval, and this module imports it only inside its functions, when a video evaluation runs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from edgerazor.errors import EdgeRazorError

TASK_DIR = Path(__file__).with_name("video_tasks")
#: local video task -> (its folder under the data directory, the row layout)
VIDEO_TASKS = {
    "videomme_local": ("videomme", "videomme"),
    "videomme_local_generate": ("videomme", "videomme"),
    "mlvu_local": ("mlvu", "mlvu"),
    "mlvu_local_generate": ("mlvu", "mlvu"),
}
#: where each task's questions may be, in order of preference, and the datasets builder reading them
QUESTION_FILES = (("json", "test.jsonl"), ("json", "test.json"), ("parquet", "test*.parquet"))
LMMS_EVAL_VERSION = "0.7.3"
INSTALL = f"pip install 'edgerazor[video-eval]' && pip install --no-deps lmms-eval=={LMMS_EVAL_VERSION}"


class VideoTaskError(EdgeRazorError):
    """A video task cannot run: unknown name, missing data, bad rows, or lmms-eval not installed."""


def is_video_task(name: str) -> bool:
    return name in VIDEO_TASKS


def require_lmms_eval() -> None:
    """lmms-eval's evaluator and task modules import, or a one-line error saying how to install them."""
    try:
        import lmms_eval.evaluator  # noqa: F401
        import lmms_eval.tasks  # noqa: F401
    except ImportError as exc:
        raise VideoTaskError(f"video evaluation needs lmms-eval and its evaluation dependencies "
                             f"({exc.name or exc} is missing): {INSTALL}") from None
    import importlib.util

    if importlib.util.find_spec("filelock._api") is None:  # lmms-eval 0.7.3's simple_evaluate patches it
        raise VideoTaskError("lmms-eval 0.7.3 needs filelock 3 (filelock._api; filelock 4 removed it): "
                             "pip install 'filelock>=3.16,<4' (the video-eval extra pins it)")


def _check_names(tasks: list[str]) -> None:
    if not tasks:
        raise VideoTaskError(f"no video task given; choose from {', '.join(VIDEO_TASKS)}")
    unknown = [t for t in tasks if t not in VIDEO_TASKS]
    if unknown:
        raise VideoTaskError(f"unknown video task(s) {', '.join(unknown)}; choose from {', '.join(VIDEO_TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise VideoTaskError(f"a video task is named twice in {', '.join(tasks)}")


def question_files(task: str, data_dir: str | Path) -> tuple[str, list[str], Path]:
    """(datasets builder, question files, the task's folder) for ``task`` under ``data_dir``."""
    folder = Path(data_dir).expanduser() / VIDEO_TASKS[task][0]
    if not folder.is_dir():
        raise VideoTaskError(f"task {task}: {folder} is not a directory (the task's questions and clips go there)")
    for builder, pattern in QUESTION_FILES:
        files = sorted(str(f) for f in folder.glob(pattern) if f.is_file())
        if files:
            return builder, files, folder
    raise VideoTaskError(f"task {task}: no questions in {folder}; expected one of "
                         f"{', '.join(p for _, p in QUESTION_FILES)}")


def task_configs(tasks: list[str], data_dir: str | Path) -> list[dict[str, Any]]:
    """lmms-eval task configs: each task's YAML with its questions and clip folder under ``data_dir`` filled in
    (``dataset_path`` a local builder, ``dataset_kwargs.data_files``, ``lmms_eval_specific_kwargs.video_root``)."""
    from lmms_eval.utils import load_yaml_config

    configs = []
    for task in tasks:
        builder, files, folder = question_files(task, data_dir)
        base = load_yaml_config(str(TASK_DIR / f"{task}.yaml"), mode="simple")
        kwargs = dict((base.get("lmms_eval_specific_kwargs") or {}).get("default") or {})
        configs.append({"task": task, "dataset_path": builder, "dataset_kwargs": {"data_files": {"test": files}},
                        "lmms_eval_specific_kwargs": {"default": {**kwargs, "video_root": str(folder)}}})
    return configs


def _doc_count(total: int, limit: int | float | None) -> int:
    if limit is None:
        return total
    return min(total, int(math.ceil(total * limit)) if limit < 1 else int(limit))


def check_questions(task: str, data_dir: str | Path, limit: int | float | None) -> int:
    """Read ``task``'s questions as lmms-eval will (the same local datasets builder) and check every row that
    will be scored: fields, options, answer and clip; returns how many will be scored."""
    import datasets

    from edgerazor.evaluation.video_tasks.scoring import TaskRowError, check_row
    from edgerazor.progress import library_bars_off

    builder, files, folder = question_files(task, data_dir)
    try:
        with library_bars_off():
            rows = datasets.load_dataset(builder, data_files={"test": files}, split="test")
    except Exception as exc:  # datasets' parse errors
        raise VideoTaskError(f"task {task}: {', '.join(files)} cannot be read as {builder}: "
                             f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
    count = _doc_count(len(rows), limit)
    if count == 0:
        raise VideoTaskError(f"task {task}: no questions to score in {', '.join(files)}")
    for i in range(count):
        try:
            check_row(rows[i], VIDEO_TASKS[task][1], i, folder)
        except TaskRowError as exc:
            raise VideoTaskError(f"task {task}: {files[0] if len(files) == 1 else folder}: {exc}") from None
    return count


def build_tasks(tasks: list[str], data_dir: str | Path) -> tuple[dict[str, Any], Any]:
    """(task objects, task manager) of the local video tasks, from this package's configs only."""
    from lmms_eval.tasks import TaskManager, get_task_dict
    from loguru import logger

    from edgerazor.evaluation.video_model import MODEL_NAME

    manager = TaskManager("WARNING", include_path=str(TASK_DIR), include_defaults=False, model_name=MODEL_NAME)
    logger.disable("lmms_eval")  # building warns once per option that letters need no leading space
    try:
        return get_task_dict(task_configs(tasks, data_dir), manager), manager
    finally:
        logger.enable("lmms_eval")


def prepare_tasks(tasks: list[str] | str, data_dir: str | Path | None,
                  limit: int | float | None = None) -> tuple[dict[str, Any], Any]:
    """Everything that can be checked without the model - names, data files, every scored row and clip,
    lmms-eval installed - then the built tasks and their manager."""
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    _check_names(tasks)
    if data_dir is None:
        raise VideoTaskError(f"video tasks ({', '.join(tasks)}) read local questions and clips: give the data "
                             "directory (--data-dir) holding videomme/ and mlvu/")
    for task in tasks:
        question_files(task, data_dir)  # a missing folder or file is said before anything heavy loads
    require_lmms_eval()
    for task in tasks:
        check_questions(task, data_dir, limit)
    return build_tasks(tasks, data_dir)


def run_tasks(lmm, prepared: tuple[dict[str, Any], Any], limit: int | float | None = None, *,
              log_samples: bool = False, seed: int = 1234, gen_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """lmms-eval's ``simple_evaluate`` of ``lmm`` (an ``EdgeRazorVideoLMM``) on tasks from ``prepare_tasks``."""
    from lmms_eval.evaluator import simple_evaluate

    task_dict, manager = prepared
    overrides = ",".join(f"{k}={v}" for k, v in gen_kwargs.items()) if gen_kwargs else None
    return simple_evaluate(model=lmm, tasks=list(task_dict.values()), task_manager=manager, limit=limit,
                           log_samples=log_samples, gen_kwargs=overrides, verbosity="WARNING", random_seed=seed,
                           numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                           process_docs_parallel=1)


def evaluate_video(model, tasks: list[str] | str, data_dir: str | Path, limit: int | float | None = None, *,
                   fps: float | None = None, min_pixels: int | None = None, max_pixels: int | None = None,
                   dense: bool = False, keep_dtype: bool = False, log_samples: bool = False,
                   progress: bool = True, seed: int = 1234) -> dict[str, Any]:
    """lmms-eval's results dict for ``tasks`` (names from ``VIDEO_TASKS``) over ``data_dir``.

    ``model``: a path (run folder, student, packed export, 16-bit thinker), a loaded ``(model, tokenizer)`` or
    an ``EdgeRazorVideoLMM``. ``limit``: questions per task (a fraction below 1). ``fps``/``min_pixels``/
    ``max_pixels``: clip sampling, by default the student's training video source's (else Qwen2.5-Omni's
    processor defaults). The accuracy of task T is ``results["results"][T]["accuracy,none"]``;
    ``log_samples`` adds each question's scores. Data and rows are checked before the model loads.
    """
    prepared = prepare_tasks(tasks, data_dir, limit)
    from edgerazor.evaluation.video_model import EdgeRazorVideoLMM

    sampling = {"fps": fps, "min_pixels": min_pixels, "max_pixels": max_pixels, "progress": progress}
    if isinstance(model, EdgeRazorVideoLMM):
        lmm = model
    elif isinstance(model, tuple):
        lmm = EdgeRazorVideoLMM(*model, **sampling)
    else:
        lmm = EdgeRazorVideoLMM(pretrained=str(model), dense=dense, keep_dtype=keep_dtype, **sampling)
    return run_tasks(lmm, prepared, limit, log_samples=log_samples, seed=seed)


def evaluate_request(request) -> tuple[dict[str, Any], dict[str, Any]]:
    """``edgerazor eval``'s video family: (lmms-eval's results, the model's description) for a request whose
    tasks are all video tasks (``request`` has ``model``, ``tasks``, ``data_dir``, ``limit``, ``seed``,
    ``gen_kwargs``, ``batch_size``, ``keep_dtype``, ``dense``, ``device``, as ``families.EvalRequest``)."""
    if request.batch_size not in (1, "1"):
        raise VideoTaskError(f"video tasks score one question at a time: --batch-size {request.batch_size} "
                             "is not supported for them")
    if request.num_fewshot:
        raise VideoTaskError("video tasks are zero-shot: --num-fewshot is not supported for them")
    prepared = prepare_tasks(request.tasks, request.data_dir, request.limit)
    from edgerazor.evaluation.models import load_for_eval
    from edgerazor.evaluation.video_model import EdgeRazorVideoLMM

    loaded = load_for_eval(request.model, keep_dtype=request.keep_dtype, dense=request.dense, device=request.device)
    lmm = EdgeRazorVideoLMM(loaded.model, loaded.tokenizer)
    return run_tasks(lmm, prepared, request.limit, seed=request.seed, gen_kwargs=request.gen_kwargs), \
        loaded.describe()
