"""``edgerazor run``: recipe -> teacher and student -> quantize -> distil -> evaluate -> save.

Each stage is a plain function call with a typed value; no stage reaches back into an earlier one.
The output directory holds ``student/`` (loadable with ``edgerazor.load``), the training
checkpoints, ``results.json`` (teacher/RTN/student perplexity, effective bits, the data's row
counts, the eval curve, the recipe and the teacher's location) and ``training.png`` (training loss
and held-out perplexity per step).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass
from types import SimpleNamespace
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.table import Table

from edgerazor.adapters import ModelAdapter, resolve_adapter
from edgerazor.errors import EdgeRazorError
from edgerazor.precision import Capability, ComputePlan, announce, cast_parameters
from edgerazor import ranks
from edgerazor.export.files import staged
from edgerazor.recipe import Recipe, dump_recipe, load_recipe
from edgerazor.run_folder import prepare_output, write_run_file

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
    adapter: ModelAdapter
    data_stats: Any = None  # edgerazor.data.DataStats: rows per source read, dropped, truncated, kept; eval rows


def gap_closure(teacher_ppl: float, rtn_ppl: float, student_ppl: float) -> float:
    """Fraction of the log-perplexity gap between RTN and the teacher that distillation recovers."""
    gap = math.log(rtn_ppl) - math.log(teacher_ppl)
    return (math.log(rtn_ppl) - math.log(student_ppl)) / gap if gap > 0 else float("nan")


def teacher_config(location: str, trust_remote_code: bool = False):
    """The teacher's config alone (no weights): enough to choose its adapter and check the recipe."""
    from edgerazor.shapes import model_config

    return model_config(location, trust_remote_code)


def check_recipe_fits(recipe: Recipe, family: ModelAdapter, config) -> None:
    """Quantize a weightless (meta) copy of the teacher: group sizes, KV groups and plugin names are
    checked against the real shapes before minutes go into loading weights or training a teacher."""
    from edgerazor.quant import quantize

    quantize(family.from_config(config, "meta"), recipe, adapter=family)


def place_teacher(recipe: Recipe, family: ModelAdapter, location: str, config, compute: str | None = None,
                  trust: bool = False, stored: str | None = None) -> torch.nn.Module:
    """The teacher's weights, loaded where ``distill.placement`` puts them for this recipe: whole on every
    rank in ``stored`` (default ``model.dtype``; ``run`` casts it to the compute dtype), or ZeRO-3-sharded
    as it loads, directly in the ``compute`` dtype (a partitioned model cannot be cast afterwards)."""
    from edgerazor.distill.placement import place_teacher as place
    from edgerazor.distill.placement import teacher_placement

    stored = stored or recipe.model.dtype
    dtype = compute or stored
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    placement = teacher_placement(recipe.train.deepspeed, recipe.train.per_device_batch_size, text.hidden_size, dtype)
    if not placement.sharded:
        dtype = stored
    elif ranks.is_main():
        console.print(f"teacher sharded with ZeRO-3 ({placement.reason})", soft_wrap=True)
    return place(lambda: family.load_teacher(location, dtype, trust), placement)


def load_inputs(recipe: Recipe, teacher: str | None, adapter: str | None = None, dtype: str | None = None) -> RunInputs:
    """Teacher, tokenizer and data for a user recipe (hub ids or local directories), through its adapter.

    Everything that can fail without weights (config, adapter, recipe against the shapes, tokenizer,
    data sources and fields) is checked before the teacher's weights load. ``dtype``: the teacher's
    (default ``model.dtype``; a ZeRO-3 teacher is loaded in the dtype it computes in)."""
    location = teacher or recipe.model.teacher
    if not location:
        raise EdgeRazorError("no teacher: pass --teacher DIR_OR_HUB_ID or set model.teacher in the recipe")
    trust = recipe.model.trust_remote_code
    config = teacher_config(location, trust)
    family = resolve_adapter(config.model_type, adapter or recipe.model.adapter)
    check_recipe_fits(recipe, family, config)
    tokenizer = family.load_tokenizer(location, trust)
    built = family.build_datasets(recipe.data, tokenizer)
    train, evaluation = built
    if evaluation is None:
        raise EdgeRazorError("data.eval_fraction is 0: set it (e.g. 0.02) so the run can report held-out perplexity")
    if ranks.is_main():
        console.print(f"[bold]loading teacher[/] {location} (adapter {family.name})")
    model = place_teacher(recipe, family, location, config, dtype, trust)  # dtype: a sharded teacher's
    return RunInputs(model, location, tokenizer, train, evaluation, family, getattr(built, "stats", None))


def build_on_rank_0(build) -> None:
    """Under a launcher, rank 0 builds a demo cache alone and the others then read it (``build`` again finds
    it); its assets stay on rank 0, only success or rank 0's error reaches the others."""
    def built() -> None:  # the assets are not sent to the other ranks
        build()

    if ranks.world_size() > 1:
        ranks.on_main(built)


def demo_inputs(recipe: Recipe, adapter: str | None = None) -> RunInputs:
    """The demo teacher and data that the recipe's ``demo:`` section describes (built once, then cached)."""
    from edgerazor.data import DataStats, SourceStats
    from edgerazor.demo import prepare_demo
    from edgerazor.demo import teacher_config as demo_teacher_config
    from edgerazor.recipe import DemoSection

    settings = recipe.demo or DemoSection()
    config = demo_teacher_config(settings.teacher, SimpleNamespace(eos_token_id=0, pad_token_id=1),
                                 settings.corpus.vocab_size)
    family = resolve_adapter(config.model_type, adapter or recipe.model.adapter)
    check_recipe_fits(recipe, family, config)  # before minutes of teacher training
    build_on_rank_0(lambda: prepare_demo(settings=settings))
    assets = prepare_demo(settings=settings)
    location = str(assets.teacher_dir)
    teacher = place_teacher(recipe, family, location, config, stored="float32")
    tokenizer = family.load_tokenizer(location)
    blocks = len(assets.train_dataset)
    stdlib = SourceStats("Python standard library (demo)", "text", records=len(assets.meta["train_files"]),
                         kept=blocks, drawn=blocks)
    stats = DataStats([stdlib], assets.settings.teacher.seq_len, train=blocks, eval=len(assets.eval_dataset))
    return RunInputs(teacher, location, tokenizer, assets.train_dataset, assets.eval_dataset, family, stats)


def video_demo_inputs(recipe: Recipe, adapter: str | None = None):
    """The video demo's teacher and clip rows that the recipe's ``demo_video:`` section describes (built once,
    then cached), and its measure: held-out caption accuracy."""
    from transformers import AutoTokenizer

    from edgerazor.demo_video import caption_accuracy, demo_datasets, encode_rows, prepare_video_demo

    build_on_rank_0(lambda: prepare_video_demo(recipe.demo_video))
    assets = prepare_video_demo(recipe.demo_video)
    family = resolve_adapter(teacher_config(str(assets.teacher_dir)).model_type, adapter or recipe.model.adapter)
    teacher = family.load_teacher(str(assets.teacher_dir))
    tokenizer = AutoTokenizer.from_pretrained(assets.teacher_dir)
    train, evaluation, stats = demo_datasets(assets, tokenizer, family)
    rows = encode_rows(assets.eval_jsonl, tokenizer, recipe.demo_video)
    measure = ("caption_accuracy", lambda model: caption_accuracy(model, tokenizer, rows, recipe.demo_video))
    return RunInputs(teacher, str(assets.teacher_dir), tokenizer, train, evaluation, family, stats), measure


def whole_teacher(inputs: RunInputs, recipe: Recipe) -> torch.nn.Module:
    """The teacher as one process can run it: a ZeRO-3-sharded teacher's forward is a collective of all
    ranks, so work done on rank 0 alone (the end-of-run evaluation) loads it whole from its location."""
    from edgerazor.distill.placement import is_sharded

    if not is_sharded(inputs.teacher):
        return inputs.teacher
    return inputs.adapter.load_teacher(inputs.teacher_location, recipe.model.dtype, recipe.model.trust_remote_code)


def _build_student(inputs: RunInputs, recipe: Recipe) -> torch.nn.Module:
    from edgerazor.distill.placement import is_sharded

    location = recipe.model.student or (inputs.teacher_location if is_sharded(inputs.teacher) else None)
    if location:  # a sharded teacher cannot be copied: the student loads whole from the teacher's weights
        return inputs.adapter.load_student(location, recipe.model.dtype, recipe.model.trust_remote_code)
    return copy.deepcopy(inputs.teacher)


def compute_plan(recipe: Recipe, capability: Capability | None = None) -> ComputePlan:
    """What this run computes in: ``model.dtype`` where the device computes it natively (and
    ``train.bf16`` autocast only where bfloat16 is native), else float32; ``model.compute_dtype:
    as_stored`` (``--keep-dtype``) keeps both as the recipe says. ``capability``: this machine's by default."""
    from edgerazor.precision import plan

    return plan(recipe.model.dtype, recipe.model.compute_dtype, recipe.train.bf16, capability,
                insist="--keep-dtype or model.compute_dtype: as_stored")


def _not_a_student(path: Path) -> str | None:
    """None when ``path`` is a student an earlier save of this run left (its config.json has an edgerazor entry)."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "it has no readable config.json"
    return None if isinstance(config, dict) and "edgerazor" in config else "its config.json has no edgerazor entry"


def save_atomically(model, tokenizer, target: Path, state_dict: dict | None = None) -> None:
    """Save into a unique temporary sibling and rename it into place (the exports' staged write): a killed
    save never leaves a half model at ``target``, only an earlier student is ever replaced, and file modes
    follow the umask (safetensors alone writes 0600)."""
    with staged(target, directory=True, overwrite=True, foreign=_not_a_student, what="student") as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)  # state_dict: a ZeRO-3 student's, gathered
        tokenizer.save_pretrained(tmp)


def gap_closure_fields(teacher_ppl: float, rtn_ppl: float, student_ppl: float) -> dict[str, Any]:
    """``gap_closure`` for results.json: JSON has no NaN, so an undefined closure is null with the reason."""
    closure = gap_closure(teacher_ppl, rtn_ppl, student_ppl)
    if math.isfinite(closure):
        return {"gap_closure": closure}
    if not all(math.isfinite(p) for p in (teacher_ppl, rtn_ppl, student_ppl)):
        why = (f"a perplexity is not finite (teacher {teacher_ppl}, round-to-nearest {rtn_ppl}, "
               f"student {student_ppl})")
    else:
        why = (f"round-to-nearest perplexity ({rtn_ppl:.4g}) is not above the teacher's ({teacher_ppl:.4g}), "
               "so there is no gap to close")
    return {"gap_closure": None, "gap_closure_note": f"undefined: {why}"}


def finite_json(value: Any, path: str = "", replaced: list[str] | None = None) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON has neither); the key paths
    replaced are appended to ``replaced``."""
    if isinstance(value, float) and not math.isfinite(value):
        if replaced is not None:
            replaced.append(path or "(top level)")
        return None
    if isinstance(value, dict):
        return {k: finite_json(v, f"{path}.{k}" if path else str(k), replaced) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v, f"{path}[{i}]", replaced) for i, v in enumerate(value)]
    return value


def write_json_atomically(path: Path, data: dict) -> None:
    """Write ``data`` as strict JSON: a non-finite float becomes null and its key is listed under
    ``non_finite_as_null``; ``allow_nan=False`` refuses any that would still get through."""
    replaced: list[str] = []
    data = finite_json(data, replaced=replaced)
    if replaced:
        data["non_finite_as_null"] = replaced
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False))
    os.replace(tmp, path)


def run(
    recipe: Recipe,
    inputs: RunInputs,
    output_dir: Path,
    resume: bool | Path = False,
    compute: ComputePlan | None = None,
    measure: tuple[str, Callable[[torch.nn.Module], Any]] | None = None,
) -> dict[str, Any]:
    """Quantize, evaluate RTN, distil, evaluate, save; returns the results written to results.json.

    ``resume``: True for the latest complete checkpoint, or the checkpoint folder itself. ``compute``:
    the dtype to compute in (default: ``compute_plan(recipe)``); the student is saved in the recipe's.
    ``measure``: (name, model -> value), a task score taken of teacher, round-to-nearest and student beside
    perplexity (the video demo's caption accuracy); ``results[name]`` = {teacher, rtn, student}."""
    from edgerazor.distill import distill
    from edgerazor.distill.memory import rank_memory
    from edgerazor.distill.placement import is_sharded
    from edgerazor.eval.perplexity import perplexity
    from edgerazor.quant import count_bits, quantize

    def begin() -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_run_file(output_dir, inputs.teacher_location, inputs.adapter.name)  # a bare --resume finds them here
        (output_dir / "recipe.yaml").write_text(dump_recipe(recipe))
        if inputs.data_stats is not None:
            print_data_summary(inputs.data_stats)

    ranks.on_main(begin)  # only rank 0 writes the run folder; every rank computes (the same) below
    start = time.perf_counter()
    compute = compute if compute is not None else compute_plan(recipe)
    announce(compute)
    cast_parameters(inputs.teacher, compute.compute)  # both run, evaluate and train in the compute dtype
    student = cast_parameters(_build_student(inputs, recipe), compute.compute)
    report = quantize(student, recipe, adapter=inputs.adapter)
    bits = count_bits(student)  # now: training changes no shape, and a ZeRO-3 student's are partitions later
    if ranks.is_main():
        console.print(f"[bold]quantized[/] {len(report.layers)} layers to {report.w_a_kv}")
    collate = inputs.adapter.collator(inputs.tokenizer)  # the family's batches (video: clips too), everywhere
    scored = dict(collate=collate, model_inputs=inputs.adapter.model_inputs)
    teacher_ppl = perplexity(inputs.teacher, inputs.eval_dataset, recipe.train.per_device_batch_size, **scored)
    rtn_ppl = perplexity(student, inputs.eval_dataset, recipe.train.per_device_batch_size, **scored)
    if ranks.is_main():
        console.print(f"teacher ppl {teacher_ppl:.2f}, round-to-nearest {report.w_a_kv} ppl {rtn_ppl:.2f}")
    measured = {"teacher": measure[1](inputs.teacher), "rtn": measure[1](student)} if measure else {}
    trainer = distill(
        inputs.teacher, student, inputs.train_dataset, recipe, output_dir / "checkpoints",
        collate, resume=resume, adapter=inputs.adapter, eval_dataset=inputs.eval_dataset,
        bf16=compute.autocast,
    )
    memory = rank_memory(inputs.teacher, student, trainer.optimizer)  # measured on every rank, after training
    curve = training_curve(trainer.state.log_history)
    final = curve["eval_perplexity"][-1] if curve["eval_perplexity"] else None
    rounded = compute.compute != compute.stored
    zero3 = is_sharded(student)  # trained under ZeRO-3: every rank holds a partition of each weight
    if rounded and zero3:
        raise EdgeRazorError(f"a ZeRO-3 student computed in {compute.compute} cannot be rounded to the stored "
                             f"{compute.stored} in place: run with --keep-dtype or on a device where "
                             f"{compute.stored} is native")
    if rounded:  # report the weights that are saved: rounded to the recipe's dtype, computed as here
        cast_parameters(student, compute.compute, through=compute.stored)
    if final is not None and final["step"] == trainer.state.global_step and not rounded:
        student_ppl = final["perplexity"]  # the trainer just measured this very model, the same way
    else:
        student_ppl = perplexity(student, inputs.eval_dataset, recipe.train.per_device_batch_size, **scored)
    if measure:
        measured["student"] = measure[1](student)
    # ZeRO-3: every rank takes part in gathering the whole weights, rank 0 receives them and saves
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped) if zero3 else None
    results = {
        "teacher_ppl": teacher_ppl,
        "rtn_ppl": rtn_ppl,
        "student_ppl": student_ppl,
        **gap_closure_fields(teacher_ppl, rtn_ppl, student_ppl),
        "effective_bits": bits.effective_bits,
        "w_a_kv": report.w_a_kv,
        "compression_ratio": bits.compression_ratio,
        "quantized_fraction": bits.quantized_fraction,
        "train_steps": trainer.state.global_step,
        "eval_perplexity": curve["eval_perplexity"],
        "train_loss": curve["loss"],
        "data": inputs.data_stats.to_dict() if inputs.data_stats is not None else None,
        **({measure[0]: measured} if measure else {}),
        "wall_seconds": time.perf_counter() - start,
        "ranks": {"world_size": ranks.world_size(), "deepspeed": recipe.train.deepspeed,
                  "teacher": "zero3" if is_sharded(inputs.teacher) else "replicated",
                  "student_zero3": zero3, "bytes": memory},
        **compute.record(),
        "recipe": recipe.model_dump(mode="json"),
        "teacher": inputs.teacher_location,
        "adapter": inputs.adapter.name,
        "student": str(output_dir / "student"),
        "training_plot": str(output_dir / "training.png"),
    }

    def finish() -> None:
        save_atomically(cast_parameters(student, compute.stored), inputs.tokenizer, output_dir / "student", state)
        if recipe.eval.tasks:  # end-of-run evaluation (recipe eval: section), into <output>/eval/
            from edgerazor.evaluation.run_end import evaluate_run

            results["evaluation"] = evaluate_run(recipe.eval, whole_teacher(inputs, recipe), inputs.tokenizer,
                                                 inputs.teacher_location, output_dir)
        plot_training(results, output_dir / "training.png")
        write_json_atomically(output_dir / "results.json", results)
        print_results(results)

    ranks.on_main(finish)  # the other ranks wait, and fail with rank 0's error if it fails
    return results


def training_curve(log_history: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """``{"loss": [{step, loss}], "eval_perplexity": [{step, perplexity}]}`` from the Trainer's log history."""
    loss = [{"step": h["step"], "loss": h["loss"]} for h in log_history if "loss" in h and "step" in h]
    ppl = [{"step": h["step"], "perplexity": h["eval_perplexity"]} for h in log_history if "eval_perplexity" in h]
    return {"loss": loss, "eval_perplexity": ppl}


def plot_training(results: dict[str, Any], path: Path) -> None:
    """Training loss and held-out perplexity per step (step 0: the round-to-nearest student), as a PNG.

    Drawn on matplotlib's Agg canvas directly, so the process's pyplot backend is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_ppl = fig.subplots(1, 2)
    loss = results["train_loss"]
    ax_loss.plot([p["step"] for p in loss], [p["loss"] for p in loss], marker="." if len(loss) < 30 else None)
    ax_loss.set(title="training loss (eq. 1)", xlabel="step", ylabel="loss")
    points = [(0, results["rtn_ppl"])] + [(p["step"], p["perplexity"]) for p in results["eval_perplexity"]]
    if points[-1][0] != results["train_steps"]:
        points.append((results["train_steps"], results["student_ppl"]))
    ax_ppl.plot([s for s, _ in points], [v for _, v in points], marker="o", label=f"student {results['w_a_kv']}")
    ax_ppl.axhline(results["teacher_ppl"], color="gray", linestyle="--", label="teacher")
    ax_ppl.set(title="held-out perplexity (step 0: round-to-nearest)", xlabel="step", ylabel="perplexity")
    ax_ppl.legend()
    fig.suptitle(f"{results['recipe']['name']}: W-A-KV {results['w_a_kv']}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def print_data_summary(stats) -> None:
    """Rows per source through every stage, so silently dropped or truncated data is visible."""
    videos = any(s.format == "video" for s in stats.sources)
    table = Table(
        title=f"data: rows per source (max_length {stats.max_length})",
        caption="capped: left out by max_samples; dropped as empty, or with no response token within "
                "max_length; truncated: kept, cut at max_length; kept: rows (text: packed blocks)"
                + ("; bad video: missing or unreadable clip, skipped" if videos else ""),
    )
    table.add_column("source [format]", overflow="fold")
    for col in ("read", "capped", "empty", "no resp.") + (("bad video",) if videos else ()) + ("truncated", "kept", "mixed"):
        table.add_column(col, justify="right", no_wrap=True)
    for s in stats.sources:
        bad = (str(getattr(s, "bad_video", 0)),) if videos else ()
        table.add_row(f"{s.source} [{s.format}]", str(s.records), str(s.capped), str(s.empty), str(s.no_response),
                      *bad, str(s.truncated), str(s.kept), str(s.drawn))
    console.print(table)
    console.print(f"train rows {stats.train}, eval rows {stats.eval}")


def print_results(results: dict[str, Any]) -> None:
    table = Table(title=f"EdgeRazor {results['w_a_kv']}: held-out perplexity")
    table.add_column("model")
    table.add_column("perplexity", justify="right")
    table.add_row("teacher (16-bit)", f"{results['teacher_ppl']:.2f}")
    table.add_row(f"round-to-nearest {results['w_a_kv']}", f"{results['rtn_ppl']:.2f}")
    table.add_row(f"EdgeRazor {results['w_a_kv']}", f"{results['student_ppl']:.2f}")
    Console().print(table)
    closure = results["gap_closure"]
    closed = f"{closure:.1%}" if closure is not None else results.get("gap_closure_note", "undefined")
    Console().print(
        f"log-perplexity gap closed: {closed}; effective bits {results['effective_bits']:.2f}; "
        f"student saved to {results['student']}; loss and perplexity curves in {results['training_plot']}"
    )


def run_command(recipe_path: Path | None, teacher: str | None, adapter: str | None, overrides: list[str],
                output: Path | None, resume: bool, overwrite: bool = False,
                accept_changes: bool = False, capability: Capability | None = None) -> dict[str, Any]:
    """The whole ``edgerazor run``: the built-in offline demo (configs/demo.yaml) when no recipe and no
    teacher are given; a recipe with a ``demo:`` section and no teacher runs on the demo teacher too.

    ``--resume --output DIR`` alone continues DIR's run with its own recipe and teacher. ``capability``:
    the device's (default: this machine's), which decides the compute dtype (``compute_plan``)."""
    if resume and recipe_path is None and teacher is None and output is not None and (output / "recipe.yaml").is_file():
        recipe_path = output / "recipe.yaml"
    builtin = recipe_path is None and teacher is None
    recipe = load_recipe(builtin_recipe("demo") if builtin else recipe_path, overrides)
    demo = recipe.demo is not None and not (teacher or recipe.model.teacher)
    demo_video = recipe.demo_video is not None and not (teacher or recipe.model.teacher)
    if demo and demo_video:
        raise EdgeRazorError("the recipe has both a demo: and a demo_video: section: keep one")
    if demo_video and recipe.data.sources:
        raise EdgeRazorError("the recipe has a demo_video: section and data.sources but no teacher: "
                             "set model.teacher (or --teacher) to train on data.sources, or remove them")
    if demo and recipe.data.sources:
        raise EdgeRazorError("the recipe has a demo: section and data.sources but no teacher: "
                             "set model.teacher (or --teacher) to train on data.sources, or remove them")
    if not demo and recipe.data.sources and recipe.data.eval_fraction == 0:
        raise EdgeRazorError("data.eval_fraction is 0: set it (e.g. 0.02) so the run can report held-out perplexity")
    if recipe.eval.tasks:  # end-of-run evaluation: task names and data checked before training, not after
        from edgerazor.evaluation.run_end import check_section

        check_section(recipe.eval)
    if recipe.train.deepspeed:
        from edgerazor.distill.trainer import deepspeed_config

        deepspeed_config(recipe.train.deepspeed)  # a bad config fails here, not after minutes of loading
    output_dir = output or Path("runs") / recipe.name
    ranks.init_process_group()  # under a launcher: rank 0 alone prepares the folder, the others learn how it went
    plan = ranks.on_main(prepare_output, output_dir, recipe.model_dump(mode="json"), resume, overwrite, accept_changes)
    if plan.stored is not None and not demo and not demo_video and not teacher and not recipe.model.teacher:
        teacher, adapter = plan.stored["teacher"], adapter or plan.stored.get("adapter")
    if plan.checkpoint is not None and ranks.is_main():
        console.print(f"[bold]resuming[/] from {plan.checkpoint.name} ({plan.checkpoint})", soft_wrap=True)
    if plan.replaced is not None and ranks.is_main():
        console.print(f"replacing the previous run in {output_dir} (kept aside until this run finishes)", soft_wrap=True)
    compute = compute_plan(recipe, capability)
    announce(compute)  # before minutes of loading
    try:
        measure = None
        if demo_video:
            inputs, measure = video_demo_inputs(recipe, adapter)
        else:
            inputs = demo_inputs(recipe, adapter) if demo else load_inputs(recipe, teacher, adapter, compute.compute)
        results = run(recipe, inputs, output_dir, resume=plan.checkpoint or False, compute=compute, measure=measure)
        if demo_video:
            from edgerazor.demo_video import caption_closure_fields, print_accuracies

            results.update(caption_closure_fields(results["caption_accuracy"]))  # the demo's headline number
            write_json_atomically(output_dir / "results.json", results)
            print_accuracies(results)
    except BaseException:
        if ranks.is_main():
            plan.abort()
        raise
    if ranks.is_main():
        plan.finish()
    ranks.shutdown()
    return results
