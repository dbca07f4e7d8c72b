"""Run the whole offline-demo path and print perplexities, gap closure and timings.

    python tools/demo_trial.py                                  # the shipped settings and configs/demo.yaml
    python tools/demo_trial.py --set teacher_steps=300          # DemoSettings overrides (YAML values)
    python tools/demo_trial.py --override train.max_steps=200   # recipe overrides
    python tools/demo_trial.py --eval-every 50                  # held-out perplexity during distillation

This is the tuning loop behind ``configs/demo.yaml`` and ``DemoSettings``: the demo must close at
least 80% of the log-perplexity gap between the round-to-nearest student and the teacher,
``closure = (log ppl_RTN - log ppl_student) / (log ppl_RTN - log ppl_teacher)``, within the time
budget (about 5 minutes on 2 cores with a cached teacher, at most 10 on the first run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def parse_settings(pairs: list[str]):
    from edgerazor.demo import DemoSettings

    fields = {f.name for f in dataclasses.fields(DemoSettings)}
    values = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--set {pair!r}: expected one of {', '.join(sorted(fields))} as key=value")
        values[key] = yaml.safe_load(raw)
    return dataclasses.replace(DemoSettings(), **values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--override", action="append", default=[], help="recipe override a.b=c (repeatable)")
    parser.add_argument("--set", dest="settings", action="append", default=[], help="DemoSettings field=value")
    parser.add_argument("--cache-dir", default=None, help="demo cache root (default: ~/.cache/edgerazor/demo)")
    parser.add_argument("--output-dir", default=None, help="distillation output (default: a temporary dir)")
    parser.add_argument("--eval-every", type=int, default=0, help="held-out perplexity every N distill steps")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback

    import edgerazor
    from edgerazor.demo import collate_blocks, prepare_demo
    from edgerazor.distill import distill
    from edgerazor.eval import perplexity
    from edgerazor.pipeline import gap_closure
    from edgerazor.recipe import load_recipe

    progress = not args.no_progress
    settings = parse_settings(args.settings)
    recipe = load_recipe(args.recipe, args.override)
    load_start = os.getloadavg()[0]
    wall = time.perf_counter()

    t = time.perf_counter()
    assets = prepare_demo(args.cache_dir, settings, progress=progress)
    prepare_seconds = time.perf_counter() - t
    threads = torch.get_num_threads()

    teacher = AutoModelForCausalLM.from_pretrained(assets.teacher_dir, dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(assets.teacher_dir, dtype=torch.float32)
    report = edgerazor.quantize(student, recipe)
    t = time.perf_counter()
    rtn_ppl = perplexity(student, assets.eval_dataset, progress=progress)
    eval_seconds = time.perf_counter() - t

    curve: list[tuple[int, float]] = []
    eval_time = [0.0]

    class EvalCallback(TrainerCallback):
        def on_step_end(self, train_args, state, control, model=None, **kwargs):
            if args.eval_every and state.global_step % args.eval_every == 0 and state.global_step < state.max_steps:
                t0 = time.perf_counter()
                ppl = perplexity(model, assets.eval_dataset, progress=False)
                eval_time[0] += time.perf_counter() - t0
                curve.append((state.global_step, ppl))
                print(f"  step {state.global_step}: student ppl {ppl:.2f} "
                      f"(closure {gap_closure(assets.teacher_ppl, rtn_ppl, ppl):.1%})", flush=True)

    with tempfile.TemporaryDirectory(prefix="edgerazor-demo-trial-") as tmp:
        out = Path(args.output_dir or tmp)
        t = time.perf_counter()
        trainer = distill(
            teacher, student, assets.train_dataset, recipe, out, collate_blocks,
            callbacks=[EvalCallback()] if args.eval_every else None,
            disable_tqdm=not progress,
        )
        distill_seconds = time.perf_counter() - t - eval_time[0]
    student_ppl = perplexity(student, assets.eval_dataset, progress=progress)
    wall = time.perf_counter() - wall
    close = gap_closure(assets.teacher_ppl, rtn_ppl, student_ppl)
    logs = [h for h in trainer.state.log_history if "loss" in h]

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"EdgeRazor demo trial ({recipe.quant.w_a_kv}, recipe {recipe.name})")
    table.add_column("model")
    table.add_column("held-out ppl", justify="right")
    table.add_column("log ppl", justify="right")
    table.add_row("teacher (16-bit)", f"{assets.teacher_ppl:.2f}", f"{math.log(assets.teacher_ppl):.4f}")
    table.add_row(f"RTN {recipe.quant.w_a_kv}", f"{rtn_ppl:.2f}", f"{math.log(rtn_ppl):.4f}")
    table.add_row(f"distilled {recipe.quant.w_a_kv}", f"{student_ppl:.2f}", f"{math.log(student_ppl):.4f}")
    timing = Table(title="timings")
    timing.add_column("phase")
    timing.add_column("seconds", justify="right")
    cached = "cached" if assets.from_cache else "built now"
    timing.add_row(f"prepare_demo ({cached})", f"{prepare_seconds:.1f}")
    timing.add_row("  teacher pretraining (when built)", f"{assets.teacher_train_seconds:.1f}")
    timing.add_row("  whole build (when built)", f"{assets.build_seconds:.1f}")
    timing.add_row("one held-out perplexity (RTN)", f"{eval_seconds:.1f}")
    timing.add_row(f"distillation ({trainer.state.global_step} steps)", f"{distill_seconds:.1f}")
    timing.add_row("total wall time of this run", f"{wall:.1f}")
    console = Console()
    console.print(table)
    console.print(f"gap closure: [bold]{close:.1%}[/bold] (target >= 80%)   "
                  f"threads {threads}, load average {load_start:.1f} at start / {os.getloadavg()[0]:.1f} at end")
    console.print(timing)
    if logs:
        last = logs[-1]
        console.print("last logged distillation terms: " + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in last.items()))
    result = {
        "settings": assets.settings.to_dict(), "recipe": recipe.model_dump(mode="json"), "cache_dir": str(assets.cache_dir),
        "teacher_ppl": assets.teacher_ppl, "rtn_ppl": rtn_ppl, "student_ppl": student_ppl, "closure": close,
        "from_cache": assets.from_cache, "prepare_seconds": prepare_seconds,
        "teacher_train_seconds": assets.teacher_train_seconds, "build_seconds": assets.build_seconds,
        "distill_seconds": distill_seconds, "eval_seconds": eval_seconds, "wall_seconds": wall,
        "curve": curve, "threads": threads, "loadavg": [load_start, os.getloadavg()[0]],
        "quantized_layers": len(report.layers), "log_history": trainer.state.log_history,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
