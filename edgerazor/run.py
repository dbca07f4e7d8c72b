"""``edgerazor run``: recipe -> teacher and student -> quantize -> distil -> evaluate -> save.

Each stage is a plain function call with a typed value; no stage reaches back into an earlier one.
The output directory holds ``student/`` (loadable with ``edgerazor.load``), the training
checkpoints, and ``results.json`` (teacher/RTN/student perplexity, effective bits, the recipe and
the teacher's location).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from edgerazor.errors import EdgeRazorError
from edgerazor.recipe import Recipe, dump_recipe, load_recipe

console = Console(stderr=True)


def builtin_recipe(name: str) -> Path:
    """A recipe shipped with EdgeRazor (``configs/<name>.yaml``)."""
    path = Path(str(resources.files("edgerazor.configs") / f"{name}.yaml"))
    if not path.is_file():
        raise EdgeRazorError(f"no built-in recipe {name!r} (looked for {path})")
    return path


@dataclass
class RunInputs:
    teacher: torch.nn.Module
    teacher_location: str
    tokenizer: Any
    train_dataset: Any
    eval_dataset: Any


def gap_closure(teacher_ppl: float, rtn_ppl: float, student_ppl: float) -> float:
    """Fraction of the log-perplexity gap between RTN and the teacher that distillation recovers."""
    gap = math.log(rtn_ppl) - math.log(teacher_ppl)
    return (math.log(rtn_ppl) - math.log(student_ppl)) / gap if gap > 0 else float("nan")


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_inputs(recipe: Recipe, teacher: str | None) -> RunInputs:
    """Teacher, tokenizer and data for a user recipe (hub ids or local directories)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgerazor.data import build_datasets

    location = teacher or recipe.model.teacher
    if not location:
        raise EdgeRazorError("no teacher: pass --teacher DIR_OR_HUB_ID or set model.teacher in the recipe")
    console.print(f"[bold]loading teacher[/] {location}")
    model = AutoModelForCausalLM.from_pretrained(location, dtype=_dtype(recipe.model.dtype))
    tokenizer = AutoTokenizer.from_pretrained(location)
    train, evaluation = build_datasets(recipe.data, tokenizer)
    if evaluation is None:
        raise EdgeRazorError("data.eval_fraction is 0: set it (e.g. 0.02) so the run can report held-out perplexity")
    return RunInputs(model, location, tokenizer, train, evaluation)


def demo_inputs() -> RunInputs:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgerazor.demo import prepare_demo

    assets = prepare_demo()
    teacher = AutoModelForCausalLM.from_pretrained(assets.teacher_dir)
    tokenizer = AutoTokenizer.from_pretrained(assets.teacher_dir)
    return RunInputs(teacher, str(assets.teacher_dir), tokenizer, assets.train_dataset, assets.eval_dataset)


def _build_student(inputs: RunInputs, recipe: Recipe) -> torch.nn.Module:
    if recipe.model.student:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(recipe.model.student, dtype=_dtype(recipe.model.dtype))
    return copy.deepcopy(inputs.teacher)


def save_atomically(model, tokenizer, target: Path) -> None:
    """Write to a temporary sibling, then rename: a killed save never leaves a half model at ``target``."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    old = target.with_name(target.name + ".old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def write_json_atomically(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def run(
    recipe: Recipe,
    inputs: RunInputs,
    output_dir: Path,
    adapter: str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Quantize, evaluate RTN, distil, evaluate, save; returns the results written to results.json."""
    from edgerazor.data import DistillCollator
    from edgerazor.distill import distill
    from edgerazor.eval.perplexity import perplexity
    from edgerazor.quant import count_bits, quantize

    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    start = time.perf_counter()
    student = _build_student(inputs, recipe)
    report = quantize(student, recipe, adapter=adapter)
    console.print(f"[bold]quantized[/] {len(report.layers)} layers to {report.w_a_kv}")
    teacher_ppl = perplexity(inputs.teacher, inputs.eval_dataset, recipe.train.per_device_batch_size)
    rtn_ppl = perplexity(student, inputs.eval_dataset, recipe.train.per_device_batch_size)
    console.print(f"teacher ppl {teacher_ppl:.2f}, round-to-nearest {report.w_a_kv} ppl {rtn_ppl:.2f}")
    trainer = distill(
        inputs.teacher, student, inputs.train_dataset, recipe, output_dir / "checkpoints",
        DistillCollator(inputs.tokenizer), resume=resume,
    )
    student_ppl = perplexity(student, inputs.eval_dataset, recipe.train.per_device_batch_size)
    save_atomically(student, inputs.tokenizer, output_dir / "student")
    bits = count_bits(student)
    results = {
        "teacher_ppl": teacher_ppl,
        "rtn_ppl": rtn_ppl,
        "student_ppl": student_ppl,
        "gap_closure": gap_closure(teacher_ppl, rtn_ppl, student_ppl),
        "effective_bits": bits.effective_bits,
        "w_a_kv": report.w_a_kv,
        "compression_ratio": bits.compression_ratio,
        "quantized_fraction": bits.quantized_fraction,
        "train_steps": trainer.state.global_step,
        "wall_seconds": time.perf_counter() - start,
        "recipe": recipe.model_dump(mode="json"),
        "teacher": inputs.teacher_location,
        "student": str(output_dir / "student"),
    }
    write_json_atomically(output_dir / "results.json", results)
    print_results(results)
    return results


def print_results(results: dict[str, Any]) -> None:
    table = Table(title=f"EdgeRazor {results['w_a_kv']}: held-out perplexity")
    table.add_column("model")
    table.add_column("perplexity", justify="right")
    table.add_row("teacher (16-bit)", f"{results['teacher_ppl']:.2f}")
    table.add_row(f"round-to-nearest {results['w_a_kv']}", f"{results['rtn_ppl']:.2f}")
    table.add_row(f"EdgeRazor {results['w_a_kv']}", f"{results['student_ppl']:.2f}")
    Console().print(table)
    Console().print(
        f"log-perplexity gap closed: {results['gap_closure']:.1%}; effective bits {results['effective_bits']:.2f}; "
        f"student saved to {results['student']}"
    )


def run_command(recipe_path: Path | None, teacher: str | None, adapter: str | None, overrides: list[str],
                output: Path | None, resume: bool) -> dict[str, Any]:
    """The whole ``edgerazor run``: the built-in offline demo when no recipe and no teacher are given."""
    demo = recipe_path is None and teacher is None
    recipe = load_recipe(builtin_recipe("demo") if demo else recipe_path, overrides)
    inputs = demo_inputs() if demo else load_inputs(recipe, teacher)
    output_dir = output or Path("runs") / recipe.name
    return run(recipe, inputs, output_dir, adapter=adapter, resume=resume)
