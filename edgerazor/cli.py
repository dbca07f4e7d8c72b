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

    from edgerazor.models import build_model, load_config
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
    from edgerazor.pipeline import run_command

    run_command(args.recipe, args.teacher, args.adapter, list(args.set or []), args.output, args.resume)
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
