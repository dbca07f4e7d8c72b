"""The ``edgerazor`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgerazor.errors import EdgeRazorError


def _cmd_bits(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from edgerazor.shapes import build_model, load_config
    from edgerazor.quant import count_bits, quantize
    from edgerazor.recipe import load_recipe

    config = load_config(args.model_config)
    if args.baseline:
        # The paper's "other methods" rows: decoder only, 4-bit, G=128, embedding and lm_head in 16-bit.
        sets = ["quant.weight.rho=1", "quant.weight.group_size=128", "quant.embedding.quantizer=null",
                "quant.lm_head.quantizer=null"]
    else:
        g = args.group_size
        sets = [f"quant.weight.rho={args.rho}"]
        if g is not None:
            sets += [f"quant.weight.group_size={g}", f"quant.embedding.group_size={g}", f"quant.lm_head.group_size={g}"]
    recipe = load_recipe(args.recipe, sets + list(args.set or []))
    model = build_model(config, "meta")
    report = quantize(model, recipe, adapter=args.adapter)
    summary = count_bits(model)
    data = summary.to_dict() | {"w_a_kv": report.w_a_kv, "model_config": str(args.model_config)}
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    table = Table(title=f"{Path(args.model_config).name}: {'baseline 4-bit G=128 decoder only' if args.baseline else report.w_a_kv}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("parameters", f"{summary.total_params:,}")
    table.add_row("quantized fraction", f"{summary.quantized_fraction:.2%}")
    table.add_row("effective bits (decoder weights)", f"{summary.effective_bits:.4f}")
    table.add_row("bits per quantized weight (+scales)", f"{summary.bits_per_quantized_weight:.4f}")
    table.add_row("BF16 size", f"{summary.bf16_bytes / 2**30:.3f} GiB")
    table.add_row("quantized size", f"{summary.quantized_bytes / 2**30:.3f} GiB")
    table.add_row("compression ratio", f"{summary.compression_ratio:.2f}x")
    Console().print(table)
    return 0


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
    from edgerazor.run import run_command

    run_command(args.recipe, args.teacher, args.adapter, list(args.set or []), args.output, args.resume)
    return 0


def _student_dir(path: Path) -> Path:
    """A run directory (``runs/<name>``) holds its student in ``student/``."""
    return path / "student" if (path / "student" / "config.json").is_file() else path


def _cmd_export(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    import edgerazor

    model, tokenizer = edgerazor.load(_student_dir(args.source))
    if args.format == "packed":
        from edgerazor.export.packed import export_packed

        report = export_packed(model, tokenizer, args.out)["size"]
    else:
        from edgerazor.export.gguf import write_gguf

        report = write_gguf(model, tokenizer, args.out, type=args.type, strict=args.strict).to_dict()
    console = Console()
    console.print(f"wrote {args.out}: {report['total_bytes'] / 2**20:.2f} MiB, "
                  f"{report['compression_vs_bf16']:.2f}x smaller than BF16")
    if args.report:
        table = Table(title=f"{args.format} export: size per tensor")
        for col in ("tensor", "type", "bytes", "bits/weight"):
            table.add_column(col, justify="right" if col != "tensor" else "left")
        for t in report["tensors"]:
            table.add_row(t["name"], t["kind"], f"{t['bytes']:,}", f"{t['bits_per_weight']:.3f}")
        console.print(table)
        if args.json:
            print(json.dumps(report, indent=2))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    import edgerazor

    model, tokenizer = edgerazor.load(_student_dir(args.model), dense=args.dense)
    if tokenizer is None:
        raise EdgeRazorError(f"{args.model} has no tokenizer files: cannot encode the prompt")
    inputs = tokenizer(args.prompt, return_tensors="pt")
    streamer = TextStreamer(tokenizer, skip_prompt=False)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                       temperature=args.temperature if args.temperature > 0 else None, streamer=streamer,
                       pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgerazor", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="distil a quantized student (no arguments: the built-in offline demo)")
    run.add_argument("--recipe", type=Path, default=None, help="recipe YAML (default: the built-in demo)")
    run.add_argument("--adapter", default=None, help="model adapter (default: from the teacher's model_type)")
    run.add_argument("--teacher", default=None, help="teacher directory or hub id (overrides model.teacher)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="recipe override, repeatable")
    run.add_argument("--output", type=Path, default=None, help="output directory (default: runs/<recipe name>)")
    run.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    run.set_defaults(func=_cmd_run)

    export = sub.add_parser("export", help="export a run's student (or a student dir) as packed or GGUF")
    export.add_argument("source", type=Path, help="run directory or student directory")
    export.add_argument("--format", choices=("packed", "gguf"), default="packed")
    export.add_argument("--out", type=Path, required=True, help="output directory (packed) or .gguf file")
    export.add_argument("--type", choices=("auto", "tq1_0", "tq2_0", "q4_0"), default="auto", help="GGUF tensor type")
    export.add_argument("--strict", action="store_true", help="GGUF: refuse tensors no GGML type holds exactly")
    export.add_argument("--report", action="store_true", help="print the size of every tensor")
    export.add_argument("--json", action="store_true", help="with --report: also print it as JSON")
    export.set_defaults(func=_cmd_export)

    generate = sub.add_parser("generate", help="stream text from a packed export or a student")
    generate.add_argument("model", type=Path)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    generate.add_argument("--dense", action="store_true",
                          help="packed exports: dequantize once at load (faster, float32 memory; same tokens)")
    generate.set_defaults(func=_cmd_generate)

    bits = sub.add_parser("bits", help="quantized fraction, effective bits and compression ratio of a model shape")
    bits.add_argument("--model-config", required=True, type=Path, help="config.json (or its directory)")
    bits.add_argument("--rho", type=float, default=0.125, help="fraction of 4-bit rows (default 1/8: 1.88-bit)")
    bits.add_argument("--group-size", type=int, default=None, help="group size (default: the adapter's)")
    bits.add_argument("--baseline", action="store_true", help="other methods: decoder only, 4-bit, G=128")
    bits.add_argument("--recipe", type=Path, default=None, help="start from this recipe")
    bits.add_argument("--adapter", default=None, help="model adapter (default: from model_type)")
    bits.add_argument("--set", action="append", metavar="KEY=VALUE", help="recipe override, repeatable")
    bits.add_argument("--json", action="store_true", help="print JSON")
    bits.set_defaults(func=_cmd_bits)

    plugins = sub.add_parser("plugins", help="list installed plugins and what they register")
    plugins.add_argument("--json", action="store_true")
    plugins.set_defaults(func=_cmd_plugins)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EdgeRazorError as exc:
        print(f"edgerazor: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
