"""Text evaluation with lm-evaluation-harness, in-process, on our own model object.

lm-eval's ``HFLM`` wraps the loaded model and tokenizer as they are: fake quantization (W, A8, KV8) or
packed codes stay active exactly as trained. Three of HFLM's habits are handled here: it calls
``tie_weights()`` on the model (kept from re-tying anything while it wraps), it ignores the batch size
and device given to ``simple_evaluate`` for a pre-built model (given to HFLM instead, the device by
placing the model), and it looks a tokenizer up by the model's name when none is passed (ours always is).

Our offline tasks (``edgerazor/evaluation/tasks``: gsm8k, humaneval, wikitext) are lm-eval task configs
that read local files under ``--data-dir``; they take the place of lm-eval's hub-backed tasks of the
same names. Every other lm-eval task name works too, with its data from the Hugging Face hub.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
from pathlib import Path
from typing import Any

from edgerazor.errors import EdgeRazorError
from edgerazor.evaluation.local_data import DATA_DIR_KEY

#: Table 7 of the paper, as lm-eval task names (the default task list)
PAPER_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "boolq", "piqa", "winogrande", "social_iqa", "openbookqa",
               "ethics_cm", "truthfulqa_mc2", "mmlu", "ifeval", "gsm8k", "humaneval")
#: the paper's seed for every random generator lm-eval seeds
PAPER_SEED = 42
#: tasks shipped with EdgeRazor that read local files (--data-dir) instead of the hub
OFFLINE_TASKS = ("gsm8k", "humaneval", "wikitext")
#: tasks that execute generated code (need --allow-code-execution)
CODE_TASKS = ("humaneval",)
TASKS_DIR = Path(__file__).resolve().parent / "tasks"


class TaskError(EdgeRazorError):
    """A task name is unknown, or a task cannot be loaded or run as asked."""


@contextlib.contextmanager
def quiet_lm_eval(level: int = logging.ERROR):
    """lm-eval logs every step at INFO/WARNING (including our tasks overriding its hub-backed ones of the
    same name); the user sees progress bars and our own lines instead."""
    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, before):
            lg.setLevel(lvl)


def task_manager(data_dir: str | Path | None = None):
    """lm-eval's TaskManager with our offline task configs added; ``data_dir`` reaches their loaders.
    Indexing every task config takes seconds, so one manager per data folder serves every model."""
    return _task_manager(str(Path(data_dir).expanduser().resolve()) if data_dir else None)


@functools.lru_cache(maxsize=4)
def _task_manager(data_dir: str | None):
    from lm_eval.tasks import TaskManager

    with quiet_lm_eval():
        return TaskManager(include_path=str(TASKS_DIR), metadata={DATA_DIR_KEY: data_dir})


def check_task_names(names: list[str], manager) -> None:
    """Every name must be a task, group or tag lm-eval knows; an unknown one lists the close matches."""
    known = manager.all_tasks
    for name in names:
        if name in known:
            continue
        close = difflib.get_close_matches(name, known, n=6, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise TaskError(f"unknown task {name!r}{hint} (offline tasks: {', '.join(OFFLINE_TASKS)}; "
                        "`lm-eval ls tasks` lists all)")


def preflight(names: list[str], data_dir: str | Path | None, allow_code_execution: bool) -> None:
    """What can be checked before any model loads: the names, and the opt-in for tasks that run code."""
    check_task_names(names, task_manager(data_dir))
    require_opt_in(names, allow_code_execution)


def require_opt_in(names: list[str], allow_code_execution: bool) -> None:
    code = [t for t in names if t in CODE_TASKS]
    if code and not allow_code_execution:
        raise TaskError(f"task {code[0]} runs the code the model writes: pass --allow-code-execution to run it "
                        "(in a child process with a timeout and no network), or leave it out of --tasks")


def load_tasks(names: list[str], manager) -> list:
    """The Task/Group objects for ``names``, built once here so that a task whose data cannot be had is
    one error line naming it before any model runs."""
    objects = []
    for name in names:
        try:
            with quiet_lm_eval():
                loaded = manager.load([name])
        except EdgeRazorError:
            raise
        except Exception as exc:  # noqa: BLE001 - datasets/hub errors come in many types
            cause = exc
            while cause.__cause__ is not None and not isinstance(cause, EdgeRazorError):
                cause = cause.__cause__
            if isinstance(cause, EdgeRazorError):
                raise cause from None
            where = ("its files under --data-dir" if name in OFFLINE_TASKS else
                     "its dataset from the Hugging Face hub (offline, only gsm8k, humaneval and wikitext run, "
                     "from --data-dir)")
            raise TaskError(f"task {name}: could not load {where}: {type(exc).__name__}: {exc}") from None
        groups = loaded.get("groups") or {}
        objects.extend([groups[name]] if name in groups else loaded["tasks"].values())
    return objects


@contextlib.contextmanager
def _no_retying(model):
    """HFLM calls ``model.tie_weights()``; the evaluated model keeps exactly the weights it was given."""
    model.tie_weights = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del model.tie_weights


_LM_CLASS = None


def lm_class():
    """HFLM with one progress bar over a rolling-perplexity task's windows (HFLM draws one per batch)."""
    global _LM_CLASS
    if _LM_CLASS is not None:
        return _LM_CLASS
    from lm_eval import utils as lm_utils
    from lm_eval.models.huggingface import HFLM
    from tqdm import tqdm

    class EdgeRazorLM(HFLM):
        _window_bar = None

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            total = sum(len(list(lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(req.args[0]), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))) for req in requests)
            self._window_bar = tqdm(total=total, desc="Scoring rolling windows", disable=disable_tqdm)
            try:
                return super().loglikelihood_rolling(requests, disable_tqdm=True)
            finally:
                self._window_bar.close()
                self._window_bar = None

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            if self._window_bar is None:
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            out = super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)
            self._window_bar.update(len(requests))
            return out

    _LM_CLASS = EdgeRazorLM
    return _LM_CLASS


def wrap(model, tokenizer, batch_size: int | str = 1, max_length: int | None = None):
    """lm-eval's HFLM around our model object and tokenizer (both required: no lookup by name)."""
    if tokenizer is None:
        raise EdgeRazorError("evaluation needs the model's tokenizer (lm-eval would look one up by name)")
    model.eval()
    with _no_retying(model), quiet_lm_eval():
        return lm_class()(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                          max_length=max_length)


def _check_generation_room(tasks: list, lm, gen_kwargs: dict | None) -> None:
    """lm-eval asserts that generation fits the context; say which task and what to pass instead."""
    for task in _leaf_tasks(tasks):
        if task.get_config("output_type") != "generate_until":
            continue
        kwargs = dict(task.get_config("generation_kwargs") or {}) | dict(gen_kwargs or {})
        wanted = int(kwargs.get("max_gen_toks", lm.max_gen_toks))
        if wanted >= lm.max_length:
            raise TaskError(f"task {task.task_name} generates up to {wanted} tokens but the model's context is "
                            f"{lm.max_length}: pass --gen-kwargs max_gen_toks=N with N < {lm.max_length}")


def _leaf_tasks(objects: list) -> list:
    from lm_eval.api.group import Group

    leaves = []
    for obj in objects:
        leaves.extend(obj.get_all_tasks() if isinstance(obj, Group) else [obj])
    return leaves


def parse_gen_kwargs(text: str | None) -> dict[str, Any] | None:
    """``max_gen_toks=64,temperature=0`` (lm-eval's syntax) as a dict; numbers become numbers."""
    if not text:
        return None
    out: dict[str, Any] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise EdgeRazorError(f"--gen-kwargs {text!r}: expected KEY=VALUE[,KEY=VALUE...], got {part!r}")
        value = value.strip()
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        else:
            value = {"true": True, "false": False}.get(value.lower(), value)
        out[key.strip()] = value
    return out


def evaluate_model(model, tokenizer, tasks: list[str], *, data_dir: str | Path | None = None,
                   limit: int | float | None = None, batch_size: int | str = 1, num_fewshot: int | None = None,
                   seed: int = PAPER_SEED, allow_code_execution: bool = False,
                   gen_kwargs: dict[str, Any] | None = None, max_length: int | None = None,
                   manager=None) -> dict[str, Any]:
    """lm-eval's results object (``results -> task -> metric``, ``n-shot``, ``configs``, ``config``) for
    ``model`` on ``tasks``; ``seed`` seeds Python, NumPy, torch and the few-shot sampler."""
    from lm_eval import simple_evaluate

    manager = manager or task_manager(data_dir)
    check_task_names(tasks, manager)
    require_opt_in(tasks, allow_code_execution)
    objects = load_tasks(tasks, manager)
    lm = wrap(model, tokenizer, batch_size, max_length)
    _check_generation_room(objects, lm, gen_kwargs)
    with quiet_lm_eval():
        results = simple_evaluate(
            model=lm, tasks=objects, num_fewshot=num_fewshot, limit=limit, gen_kwargs=gen_kwargs,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            confirm_run_unsafe_code=allow_code_execution, log_samples=False, bootstrap_iters=0,
            task_manager=manager,
        )
    results["config"].update({"batch_size": batch_size, "max_length": lm.max_length, "seed": seed,
                              "data_dir": str(data_dir) if data_dir else None, "num_fewshot": num_fewshot,
                              "allow_code_execution": allow_code_execution})
    return json_safe(results)


def json_safe(value: Any) -> Any:
    """lm-eval's results hold dtypes, numpy numbers and sets; JSON holds their plain forms (NaN as null)."""
    import math

    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):
        return json_safe(value.item())
    return str(value)
