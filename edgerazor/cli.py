"""The ``edgerazor`` command line."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import traceback
from pathlib import Path

from edgerazor.errors import EdgeRazorError
from edgerazor.version import __version__


def _cmd_bits(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from edgerazor.adapters import resolve_adapter
    from edgerazor.shapes import load_config, resolve_model
    from edgerazor.quant import count_bits, quantize
    from edgerazor.quant.bits import component_counts
    from edgerazor.recipe import load_recipe

    if args.model is not None:
        config, _ = resolve_model(args.model)
        label = args.model
    else:
        config, label = load_config(args.model_config), Path(args.model_config).name
    named = resolve_adapter(config.model_type, args.adapter)  # the recipe's model.adapter is checked below
    extra_components = [c.name for c in named.components() if c.name not in ("decoder", "embedding", "lm_head")]
    if args.baseline:
        # The paper's "other methods" rows: decoder only, 4-bit, G=128, everything else in 16-bit.
        sets = ["quant.weight.rho=1", "quant.weight.group_size=128", "quant.embedding.quantizer=null",
                "quant.lm_head.quantizer=null"] + [f"quant.components.{c}.quantizer=null" for c in extra_components]
    else:
        g = args.group_size
        rho = args.rho if args.rho is not None else named.extra.get("default_rho", 0.125)
        sets = [f"quant.weight.rho={rho}"]
        if g is not None:
            sets += [f"quant.weight.group_size={g}", f"quant.embedding.group_size={g}", f"quant.lm_head.group_size={g}"]
    recipe = load_recipe(args.recipe, sets + list(args.set or []))
    family = resolve_adapter(config.model_type, args.adapter or recipe.model.adapter)
    model = family.from_config(config, "meta")  # the family's adapter builds it: no memory on meta
    report = quantize(model, recipe, adapter=family)
    summary = count_bits(model)
    components = component_counts(model, family)
    paper = family.extra.get("paper_bits", {}).get(args.model or "")
    data = summary.to_dict() | {"w_a_kv": report.w_a_kv, "model": args.model or str(args.model_config),
                                "components": components} | ({"paper": paper} if paper else {})
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    table = Table(title=f"{label}: {'baseline 4-bit G=128 decoder only' if args.baseline else report.w_a_kv}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("parameters", f"{summary.total_params:,}")
    table.add_row("quantized fraction", f"{summary.quantized_fraction:.2%}")
    table.add_row("effective bits (decoder weights)", f"{summary.effective_bits:.4f}")
    table.add_row("bits per quantized weight (+scales)", f"{summary.bits_per_quantized_weight:.4f}")
    table.add_row("BF16 size", format_size(summary.bf16_bytes))
    table.add_row("quantized size", format_size(summary.quantized_bytes))
    table.add_row("compression ratio", f"{summary.compression_ratio:.2f}x")
    padded = [r for r in report.layers if r.padded_d_in != r.d_in]
    if padded:
        table.add_row("layers with rows zero-padded to a multiple of G", str(len(padded)))
    for name, count in components.items():
        if count["params"]:
            table.add_row(f"{name}: parameters (quantized)",
                          f"{count['params']:,} ({count['quantized_params'] / count['params']:.2%})")
    if paper:
        for method, ref in paper.items():
            if isinstance(ref, dict):
                table.add_row(f"paper {paper['table']}, {method}",
                              f"{ref['quantized_fraction']:.2%} quantized, {ref['compression_ratio']:.2f}x")
    Console().print(table)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from edgerazor.plan import paper_plans, plan_memory

    if args.paper:
        plans = paper_plans(args.zero or 3)
    elif args.model is None or args.gpus is None or args.gpu_mem is None or args.zero is None:
        raise EdgeRazorError("edgerazor plan needs --model, --gpus, --gpu-mem and --zero (or --paper for the "
                             "paper's 8-GPU recipes)")
    else:
        plans = [plan_memory(args.model, args.gpus, args.gpu_mem, args.zero, args.seq, args.micro_batch,
                             args.gradient_checkpointing, args.recipe)]
    if args.json:
        data = [p.to_dict() for p in plans]
        print(json.dumps(data[0] if len(data) == 1 else data, indent=2))
        return 0
    console = Console()
    for p in plans:
        d = p.to_dict()
        table = Table(title=f"{p.model}: {p.gpus} GPU(s) x {p.gpu_mem_gib:g} GiB, ZeRO-{p.zero}, seq {p.seq} x "
                            f"micro-batch {p.micro_batch}, gradient checkpointing {'on' if p.gradient_checkpointing else 'off'}")
        table.add_column("per GPU")
        table.add_column("GiB", justify="right")
        for name, value in d["components"].items():
            table.add_row(name, f"{value:.2f}")
            details = {"model_states": d["model_states_detail"], "activations": d["activations_gib"]}.get(name, {})
            for part, part_value in details.items():
                table.add_row(f"  {part.replace('_', ' ')}", f"{part_value:.2f}")
        table.add_row("total", f"{d['per_gpu_gib']:.2f}")
        table.add_row(f"usable ({p.gpu_mem_gib:g} less {d['reserve_gib']:.1f} reserve)",
                      f"{p.gpu_mem_gib - d['reserve_gib']:.2f}")
        table.add_row("fits", "yes" if p.fits else "NO")
        console.print(table)
        for note in p.notes:
            console.print(f"  {note}", markup=False, highlight=False)
    return 0


def format_size(n_bytes: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (a 2 MiB model is not ``0.002 GiB``)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{n_bytes:.0f} B"


def _cmd_plugins(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    from edgerazor.plugin_manager import get_plugins

    infos = get_plugins().describe()
    if args.json:
        print(json.dumps([asdict(i) for i in infos], indent=2))
        return 0
    table = Table(title="EdgeRazor plugins")
    for col in ("plugin", "distribution", "version", "hooks", "registers"):
        table.add_column(col)
    for i in infos:
        regs = "; ".join(f"{k}: {', '.join(v)}" for k, v in i.registers.items())
        table.add_row(i.name, i.distribution, i.version, ", ".join(i.hooks), regs)
    Console().print(table)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from edgerazor.progress import library_bars_off
    from edgerazor.run import run_command

    overrides = list(args.set or []) + (["model.trust_remote_code=true"] if args.trust_remote_code else [])
    overrides += ["model.compute_dtype=as_stored"] if args.keep_dtype else []
    overrides += [f"train.deepspeed={args.deepspeed}"] if args.deepspeed else []
    with library_bars_off():  # one bar per stage of ours: none for loading or saving a model
        run_command(args.recipe, args.teacher, args.adapter, overrides, args.output, args.resume,
                args.overwrite, args.accept_changes)
    return 0


def _student_dir(path: Path) -> Path:
    """A run directory (``runs/<name>``) holds its student in ``student/``."""
    from edgerazor.evaluation.models import student_dir

    return student_dir(path)


def _export_format(model, requested: str | None) -> str:
    """``--format``, else the ``export.format`` of the recipe the student was quantized with."""
    if requested is not None:
        return requested
    from edgerazor.recipe import recipe_from_dict

    meta = getattr(model.config, "edgerazor", None) or {}
    return recipe_from_dict(meta.get("recipe") or {}, "the student's config.json (edgerazor.recipe)").export.format


def _bytes_on_disk(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _cmd_export(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    import edgerazor
    from edgerazor.plugin_manager import exporter_options, run_exporter
    from edgerazor.plugin_manager import get as get_plugin

    if args.format is not None:
        get_plugin("exporters", args.format)  # an unknown name fails before the model loads
    # exported as stored: computing is not needed, and the stored dtype decides what the export holds
    model, tokenizer = edgerazor.load(_student_dir(args.source), compute_dtype="as_stored")
    name = _export_format(model, args.format)
    options = {"type": args.type} if args.type is not None else {}
    if args.strict:
        options["strict"] = True
    if args.overwrite:
        options["overwrite"] = True
    if args.mmproj is not None:
        options["mmproj"] = args.mmproj
    accepted = exporter_options(get_plugin("exporters", name))
    if accepted is not None and "overwrite" not in accepted and not args.overwrite and args.out.exists():
        from edgerazor.errors import OutputExistsError

        # an exporter without the option cannot promise to keep what is there
        raise OutputExistsError(f"{args.out} already exists and exporter {name!r} has no overwrite option to "
                                "replace only its own files; choose an output path that does not exist")
    path = run_exporter(name, model, args.out, tokenizer=tokenizer, **options)
    console = Console()
    size_report = getattr(get_plugin("exporters", name), "size_report", None)
    if size_report is None:  # the exporter says nothing about its sizes: say what it wrote
        console.print(f"wrote {path} ({name}): {_bytes_on_disk(path) / 2**20:.2f} MiB on disk")
        if args.report:
            console.print(f"exporter {name!r} has no size_report: no per-tensor sizes to print")
        return 0
    report = size_report(path)
    console.print(f"wrote {path}: {report['total_bytes'] / 2**20:.2f} MiB, "
                  f"{report['compression_vs_bf16']:.2f}x smaller than BF16")
    if args.report:
        table = Table(title=f"{name} export: size per tensor")
        for col in ("tensor", "type", "bytes", "bits/weight"):
            table.add_column(col, justify="right" if col != "tensor" else "left")
        for t in report["tensors"]:
            table.add_row(t["name"], t["kind"], f"{t['bytes']:,}", f"{t['bits_per_weight']:.3f}")
        console.print(table)
        if args.json:
            print(json.dumps(report, indent=2))
    return 0


def _generation_inputs(tokenizer, prompt: str, chat: bool, source) -> dict:
    """The prompt's token ids; with ``chat`` the prompt is one user turn of the tokenizer's chat template."""
    if not chat:
        return tokenizer(prompt, return_tensors="pt")
    if not getattr(tokenizer, "chat_template", None):
        raise EdgeRazorError(f"{source}: the tokenizer has no chat template; drop --chat to complete the raw prompt")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)  # the template already has them


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer, set_seed

    import edgerazor

    from edgerazor.precision import announce, plan
    from edgerazor.runtime.loading import stored_dtype

    source = _student_dir(args.model)
    compute = plan(stored_dtype(source), "as_stored" if args.keep_dtype else "auto", stored_by="the model's")
    announce(compute)
    model, tokenizer = edgerazor.load(source, dense=args.dense, compute_dtype=compute.compute)
    if tokenizer is None:
        raise EdgeRazorError(f"{args.model} has no tokenizer files: cannot encode the prompt")
    inputs = _generation_inputs(tokenizer, args.prompt, args.chat, args.model)
    if args.seed is not None:
        set_seed(args.seed)  # sampling draws from the global generators
    # a chat reply is printed without the template's markup around the prompt
    streamer = TextStreamer(tokenizer, skip_prompt=args.chat, skip_special_tokens=args.chat)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                       temperature=args.temperature if args.temperature > 0 else None, streamer=streamer,
                       pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return 0


def _eval_limit(text: str) -> int | float:
    """lm-eval's --limit: a count of examples per task, or a fraction of each task below 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return int(value) if value >= 1 and value == int(value) else value


def _eval_batch_size(text: str) -> int | str:
    if text == "auto" or text.startswith("auto:"):
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a positive number or auto")
    return int(text)


def _cmd_eval(args: argparse.Namespace) -> int:
    from rich.console import Console

    from edgerazor.evaluation.harness import CODE_TASKS, PAPER_TASKS, parse_gen_kwargs
    from edgerazor.evaluation.report import deltas, markdown_table

    console = Console(stderr=True)  # stdout holds only the table or the JSON
    if args.compare:
        from edgerazor.evaluation.records import records_from

        if args.models:
            raise EdgeRazorError("--compare reads saved results: give the results files after --compare, no MODEL")
        records = records_from(args.compare)
        print(markdown_table(records))
        print(deltas(records))
        return 0
    if not args.models:
        raise EdgeRazorError("edgerazor eval needs a MODEL (a run folder, student, packed export, model directory "
                             "or hub id), or --compare RESULTS...")
    from edgerazor.evaluation.families import EvalRequest
    from edgerazor.evaluation.records import evaluate, write_outputs

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else list(PAPER_TASKS)
    if not args.tasks and not args.allow_code_execution:
        tasks = [t for t in tasks if t not in CODE_TASKS]
        console.print(f"leaving out {', '.join(CODE_TASKS)}: it runs the model's code (--allow-code-execution "
                      "to include it)", highlight=False)
    if not tasks:
        raise EdgeRazorError("--tasks names no task")
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else []
    if labels and len(labels) != len(args.models):
        raise EdgeRazorError(f"--labels names {len(labels)} models, but {len(args.models)} are evaluated")
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise EdgeRazorError(f"--data-dir {args.data_dir}: no such folder")
    if args.output is not None:
        from edgerazor.evaluation.records import PLOT_FILE, RESULTS_FILE, TABLE_FILE

        taken = [str(args.output / n) for n in (RESULTS_FILE, TABLE_FILE, PLOT_FILE) if (args.output / n).exists()]
        if taken:  # before minutes of evaluation, not after
            from edgerazor.errors import OutputExistsError

            raise OutputExistsError(f"{', '.join(taken)} already exist(s): choose another --output folder")
    from edgerazor.evaluation.families import split_by_family
    from edgerazor.evaluation.harness import preflight

    text = split_by_family(tasks).get("text")
    if text:  # names and the code opt-in, before any model loads
        preflight(text, args.data_dir, args.allow_code_execution)
    records = []
    for i, model in enumerate(args.models):
        request = EvalRequest(model=model, tasks=tasks, data_dir=args.data_dir, limit=args.limit,
                              batch_size=args.batch_size, num_fewshot=args.num_fewshot, seed=args.seed,
                              allow_code_execution=args.allow_code_execution,
                              gen_kwargs=parse_gen_kwargs(args.gen_kwargs), max_length=args.max_length,
                              device=args.device, keep_dtype=args.keep_dtype, dense=args.dense)
        console.print(f"[bold]evaluating[/] {model} on {', '.join(tasks)}", soft_wrap=True, highlight=False)
        records.append(evaluate(request, labels[i] if labels else None))
    if args.json:
        data = records[0] if len(records) == 1 else {"models": records}
        print(json.dumps(data, indent=2, allow_nan=False))
    else:
        print(markdown_table(records))
    if args.output is not None:
        written = write_outputs(records, args.output)
        console.print(f"wrote {', '.join(str(p) for p in written.values())}", soft_wrap=True, highlight=False)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgerazor", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of any error (also: environment EDGERAZOR_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="distil a quantized student (no arguments: the built-in offline demo)")
    run.add_argument("--recipe", type=Path, default=None, help="recipe YAML (default: the built-in demo)")
    run.add_argument("--adapter", default=None, metavar="NAME|auto",
                     help="model adapter (`edgerazor plugins` lists them; auto, the default: from the teacher's model_type)")
    run.add_argument("--trust-remote-code", action="store_true",
                     help="let transformers run the teacher repository's own code (model.trust_remote_code)")
    run.add_argument("--teacher", default=None, help="teacher directory or hub id (overrides model.teacher)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="recipe override, repeatable")
    run.add_argument("--output", type=Path, default=None, help="output directory (default: runs/<recipe name>)")
    run.add_argument("--keep-dtype", action="store_true",
                     help="compute in model.dtype (and train.bf16 autocast) even where this CPU has no native "
                          "half precision (model.compute_dtype: as_stored); default: float32 there")
    run.add_argument("--resume", action="store_true",
                     help="continue the output folder's latest complete checkpoint (alone with --output: its recipe and teacher)")
    run.add_argument("--accept-changes", action="store_true",
                     help="with --resume: accept safe recipe changes (more steps, logging/saving intervals)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace a previous EdgeRazor run in the output folder (never anything else)")
    run.add_argument("--deepspeed", type=Path, default=None, metavar="CONFIG",
                     help="DeepSpeed JSON config, e.g. configs/deepspeed/zero2.json, zero3.json or zero2-teacher-zero3.json "
                          "(sets train.deepspeed); "
                          "launch with torchrun/deepspeed/accelerate launch")
    run.set_defaults(func=_cmd_run)

    export = sub.add_parser("export", help="export a run's student (or a student dir) with an exporter plugin")
    export.add_argument("source", type=Path, help="run directory or student directory")
    export.add_argument("--format", default=None,
                        help="exporter plugin (`edgerazor plugins` lists them; default: the recipe's export.format)")
    export.add_argument("--out", type=Path, required=True, help="output directory, or the file (e.g. model.gguf)")
    export.add_argument("--type", default=None,
                        help="exporter option 'type' (gguf: auto, tq1_0, tq2_0 or q4_0)")
    export.add_argument("--strict", action="store_true",
                        help="exporter option 'strict' (gguf: refuse tensors no GGML type holds exactly)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace a previous EdgeRazor export of the same format at --out "
                             "(anything else there is refused; without it an existing --out is refused)")
    export.add_argument("--mmproj", type=Path, default=None,
                        help="exporter option 'mmproj' (gguf: where a multimodal student's vision encoder goes; "
                             "default mmproj-<name>.gguf beside the text model)")
    export.add_argument("--report", action="store_true", help="print the size of every tensor")
    export.add_argument("--json", action="store_true", help="with --report: also print it as JSON")
    export.set_defaults(func=_cmd_export)

    generate = sub.add_parser("generate", help="stream text from a packed export or a student")
    generate.add_argument("model", type=Path)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    generate.add_argument("--seed", type=int, default=None, help="seed for sampling (same seed: same tokens)")
    generate.add_argument("--chat", action="store_true",
                          help="send the prompt as a user message through the tokenizer's chat template")
    generate.add_argument("--dense", action="store_true",
                          help="packed exports: dequantize once at load (faster, a float weight's memory; same tokens)")
    generate.add_argument("--keep-dtype", action="store_true",
                          help="compute in the model's stored dtype even where this CPU has no native half "
                               "precision (default: float32 there, ~100x faster)")
    generate.set_defaults(func=_cmd_generate)

    ev = sub.add_parser("eval", help="score models on benchmark tasks (lm-evaluation-harness): table, plot, JSON")
    ev.add_argument("models", nargs="*", metavar="MODEL",
                    help="run folder, student, packed export, or a plain 16-bit model (directory or hub id); "
                         "several: one table, the 16-bit one as the reference")
    ev.add_argument("--tasks", default=None,
                    help="comma-separated lm-eval task names (default: the paper's Table 7 tasks); offline: "
                         "gsm8k, humaneval, wikitext from --data-dir")
    ev.add_argument("--data-dir", type=Path, default=None,
                    help="folder of the offline tasks' files: gsm8k/test.jsonl (+ train.jsonl for few-shot), "
                         "humaneval/HumanEval.jsonl[.gz], wikitext-2/test.txt")
    ev.add_argument("--limit", type=_eval_limit, default=None,
                    help="examples per task (a fraction below 1), as lm-eval's --limit")
    ev.add_argument("--batch-size", type=_eval_batch_size, default=1, help="as lm-eval's: a number or auto")
    ev.add_argument("--num-fewshot", type=int, default=None,
                    help="examples in context for every task (default: each task's own: GSM8K 5, the rest 0)")
    ev.add_argument("--seed", type=int, default=42, help="seed for Python, NumPy, torch and few-shot sampling")
    ev.add_argument("--gen-kwargs", default=None, metavar="K=V,...",
                    help="generation settings for every generating task, e.g. max_gen_toks=64")
    ev.add_argument("--max-length", type=int, default=None, help="context length (default: the model's)")
    ev.add_argument("--allow-code-execution", action="store_true",
                    help="let humaneval run the model's code (a child process, timeout, no network)")
    ev.add_argument("--device", default=None, help="put the model on this torch device (default: where it loads)")
    ev.add_argument("--keep-dtype", action="store_true",
                    help="compute in the stored dtype even where this CPU has no native half precision")
    ev.add_argument("--dense", action="store_true", help="packed exports: dequantize once at load (same scores)")
    ev.add_argument("--labels", default=None, help="comma-separated row names, one per MODEL")
    ev.add_argument("--output", type=Path, default=None,
                    help="write results.json (every metric and setting), table.md and scores.png here")
    ev.add_argument("--json", action="store_true", help="print lm-eval's results object (results -> task -> metric)")
    ev.add_argument("--compare", nargs="+", type=Path, default=None, metavar="RESULTS",
                    help="print the table and the deltas to the first of saved results (results.json files or "
                         "--output folders); evaluates nothing")
    ev.set_defaults(func=_cmd_eval)

    bits = sub.add_parser("bits", help="quantized fraction, effective bits and compression ratio of a model shape")
    shape = bits.add_mutually_exclusive_group(required=True)
    shape.add_argument("--model", metavar="NAME|HUB_ID|PATH",
                       help="a built-in shape (qwen3-0.6b, qwen3-1.7b, mobilellm-350m, ...), a hub id or a local directory")
    shape.add_argument("--model-config", type=Path, help="config.json (or its directory)")
    bits.add_argument("--rho", type=float, default=None,
                      help="fraction of 4-bit rows (default 1/8: 1.88-bit, or the adapter's: 1 for Qwen2.5-Omni)")
    bits.add_argument("--group-size", type=int, default=None, help="group size (default: the adapter's)")
    bits.add_argument("--baseline", action="store_true", help="other methods: decoder only, 4-bit, G=128")
    bits.add_argument("--recipe", type=Path, default=None, help="start from this recipe")
    bits.add_argument("--adapter", default=None, help="model adapter (default: from model_type)")
    bits.add_argument("--set", action="append", metavar="KEY=VALUE", help="recipe override, repeatable")
    bits.add_argument("--json", action="store_true", help="print JSON")
    bits.set_defaults(func=_cmd_bits)

    plan = sub.add_parser("plan", help="per-GPU memory of a distillation run under DeepSpeed ZeRO-2/3, and whether it fits")
    plan.add_argument("--model", metavar="NAME|HUB_ID|PATH",
                      help="a built-in shape (qwen3-0.6b, qwen3-1.7b, mobilellm-350m, qwen2.5-omni-7b-thinker), a hub id "
                           "or a local directory; teacher and student have its shape")
    plan.add_argument("--gpus", type=int, default=None, help="GPUs in all (data-parallel ranks)")
    plan.add_argument("--gpu-mem", type=float, default=None, metavar="GIB", help="memory of one GPU in GiB (A100-80GB: 80)")
    plan.add_argument("--zero", type=int, choices=(2, 3), default=None, help="the student's ZeRO stage")
    plan.add_argument("--seq", type=int, default=None, help="tokens per row (default: the recipe's data.max_length, else 1024)")
    plan.add_argument("--micro-batch", type=int, default=None,
                      help="rows per GPU per step (default: the recipe's train.per_device_batch_size, else 1)")
    plan.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                      help="default: the recipe's train.gradient_checkpointing, else on")
    plan.add_argument("--recipe", type=Path, default=None, help="take quantization, seq, micro-batch and checkpointing from it")
    plan.add_argument("--paper", action="store_true",
                      help="the paper's four 8-GPU recipes (configs/table1) on 8 x 80 GiB, ZeRO-3 unless --zero says")
    plan.add_argument("--json", action="store_true", help="print JSON (per_gpu_gib, components, fits, ...)")
    plan.set_defaults(func=_cmd_plan)

    plugins = sub.add_parser("plugins", help="list installed plugins and what they register")
    plugins.add_argument("--json", action="store_true")
    plugins.set_defaults(func=_cmd_plugins)
    for command in sub.choices.values():  # --debug after the command name works too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


#: What to do about an OS error, when its reason alone does not say.
_OS_HINTS = {
    errno.ENOSPC: "free some space or write somewhere else",
    errno.EROFS: "write somewhere else",
    errno.ENAMETOOLONG: "use a shorter name",
    errno.EACCES: "check its permissions",
    errno.EPERM: "check its permissions",
}


def one_line(text: str) -> str:
    """``text`` on one line: a multi-line message's lines joined with ``; `` (after a ``:``, a space)."""
    out = ""
    for line in (part.strip() for part in str(text).splitlines()):
        if line:
            out += ("" if not out else " " if out.endswith(":") else "; ") + line
    return out


def os_error_message(exc: OSError) -> str:
    """``PATH: reason (what to do)`` for an OS error: missing, unreadable, read-only, disk full, name too long."""
    reason = exc.strerror or one_line(str(exc)) or type(exc).__name__
    paths = [os.fsdecode(p) if isinstance(p, (str, bytes, os.PathLike)) else str(p)
             for p in (exc.filename, exc.filename2) if p is not None]
    hint = _OS_HINTS.get(exc.errno)
    return (f"{' -> '.join(paths)}: " if paths else "") + reason + (f" ({hint})" if hint else "")


def _debug(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("EDGERAZOR_DEBUG", "").lower() not in (
        "", "0", "false", "no")


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user error (an ``EdgeRazorError``, or an OS error on a path the user gave) is
    one ``edgerazor: error:`` line and exit status 2; Ctrl-C is 130; anything else is a bug, so its
    traceback is printed and the status is 1. ``--debug`` prints the traceback of every error."""
    args = build_parser().parse_args(argv)
    debug = _debug(args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("edgerazor: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # whoever read our output stopped (``edgerazor plugins --json | head``): nothing left to say
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a real file (captured): nothing to silence
            pass
        return 141  # 128 + SIGPIPE, what a shell reports for a reader that went away
    except (EdgeRazorError, OSError) as exc:
        if debug:
            traceback.print_exc()
        message = os_error_message(exc) if isinstance(exc, OSError) else one_line(str(exc))
        print(f"edgerazor: error: {message}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - anything else is a bug: show where it happened
        traceback.print_exc()
        print(f"edgerazor: internal error: {type(exc).__name__}: {one_line(str(exc))} - this is a bug in "
              "EdgeRazor or a plugin, not in your input; please report it with the traceback above",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
