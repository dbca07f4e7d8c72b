"""Does real llama.cpp reproduce a trained student? Next-token agreement on held-out text.

    python tools/llama_cpp_agreement.py runs/demo                      # the demo: held-out stdlib modules
    python tools/llama_cpp_agreement.py runs/mine --text valid.txt --tokens 4000

Exports the student (a run directory or a student directory) as GGUF and packed, runs llama.cpp
(built by tools/build_llama_cpp.py) on windows of held-out tokens and compares its logits with
the packed runtime as trained, without its own A8/KV8 rounding, and rounding activations exactly as
llama.cpp does (``edgerazor.llama_cpp.agreement``), for llama.cpp's f32 and default f16 KV caches.
Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def held_out_text(run: Path, text_file: Path | None) -> str:
    if text_file is not None:
        return text_file.read_text(encoding="utf-8")
    results = run / "results.json"
    meta = Path(json.loads(results.read_text())["teacher"]).parent / "meta.json" if results.is_file() else None
    if meta is None or not meta.is_file():
        raise SystemExit(f"{run} is not a demo run (no results.json pointing at the demo cache): pass --text FILE")
    info = json.loads(meta.read_text())
    root = Path(info["stdlib"])
    return "".join((root / rel).read_text(encoding="utf-8") for rel in info["held_out_files"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="run directory (runs/<name>) or student directory")
    parser.add_argument("--text", type=Path, default=None, help="held-out text (default: the demo's held-out modules)")
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--window", type=int, default=250, help="tokens per llama.cpp context (<= the model's positions)")
    parser.add_argument("--skip-chars", type=int, default=2000, help="skip the start of the text (license headers)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))

    from rich.console import Console
    from rich.table import Table

    import edgerazor
    from edgerazor.llama_cpp.agreement import compare
    from edgerazor.llama_cpp import ensure_llama_cpp

    student = args.run / "student" if (args.run / "student" / "config.json").is_file() else args.run
    model, tokenizer = edgerazor.load(student)  # a bad path fails here, before llama.cpp is looked for
    ensure_llama_cpp()
    ids = tokenizer.encode(held_out_text(args.run, args.text)[args.skip_chars:], add_special_tokens=False)
    if len(ids) < args.tokens:
        raise SystemExit(f"the text has {len(ids)} tokens; --tokens {args.tokens} asks for more")
    windows = []
    with tempfile.TemporaryDirectory(prefix="edgerazor-agreement-") as tmp:
        for start in range(0, args.tokens, args.window):
            window = ids[start:min(start + args.window, args.tokens)]
            windows.append(compare(model, tokenizer, window, Path(tmp) / f"w{start}", kv_types=("f32", "f16")))
    table = Table(title=f"llama.cpp vs the packed runtime: {student}, {args.tokens} held-out tokens")
    for col in ("llama.cpp KV", "reference", "max |diff|", "mean |diff|", "top-1 agreement"):
        table.add_column(col, justify="left" if col in ("llama.cpp KV", "reference") else "right")
    summary = {}
    for key in windows[0].diffs:
        diffs = [w.diffs[key] for w in windows]
        n = [min(args.window, args.tokens - i * args.window) for i in range(len(windows))]
        row = {
            "max_abs": max(d.max_abs for d in diffs),
            "mean_abs": sum(d.mean_abs * k for d, k in zip(diffs, n)) / sum(n),
            "top1": sum(d.top1 * k for d, k in zip(diffs, n)) / sum(n),
        }
        summary[f"{key[0]}/{key[1]}"] = row
        table.add_row(key[0], key[1], f"{row['max_abs']:.4f}", f"{row['mean_abs']:.5f}", f"{row['top1']:.2%}")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps({"student": str(student), "tokens": args.tokens, "summary": summary}, indent=1))
    return 0


def cli(argv: list[str] | None = None) -> int:
    """``main`` with EdgeRazor's error convention: a missing build or bindings is one line, exit 2."""
    sys.path.insert(0, str(REPO))
    from edgerazor.errors import EdgeRazorError

    try:
        return main(argv)
    except (EdgeRazorError, OSError) as exc:
        print(f"edgerazor: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
