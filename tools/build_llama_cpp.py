"""Build (or find in the cache) llama.cpp for the GGUF tests, and install its Python bindings.

    python tools/build_llama_cpp.py                 # build llama-bench, llama-quantize, libllama and libmtmd, 2 jobs
    python tools/build_llama_cpp.py --jobs 8 --target llama-cli
    python tools/build_llama_cpp.py --check         # exit 0 if built (and bindings installed), 1 if not

llama.cpp comes from the pinned llama-cpp-python sdist on PyPI (see ``edgerazor/llama_cpp/build.py``)
and is cached under ``~/.cache/edgerazor/llama.cpp/<version>-<hash>`` (``$EDGERAZOR_LLAMA_CPP_DIR``
replaces ``~/.cache/edgerazor/llama.cpp``): keep that directory across CI runs and this takes
seconds; a cold build takes ~10-20 minutes on 2 cores. The ``llama_cpp`` Python package is then
installed into the running interpreter with ``CMAKE_ARGS=-DLLAMA_BUILD=OFF`` (Python files only) and
loads our ``libllama`` through ``$LLAMA_CPP_LIB_PATH``.

``--optional`` turns a failure (no compiler, no network) into a warning and exit status 0, so CI
can call this unconditionally and the llama.cpp tests skip with a reason instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    from edgerazor import llama_cpp as lc

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", default=None, help="cache root (default: $EDGERAZOR_LLAMA_CPP_DIR or ~/.cache/edgerazor/llama.cpp)")
    ap.add_argument("--target", action="append", default=None, help=f"tool to build (repeatable; default {' '.join(lc.DEFAULT_TARGETS)})")
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("EDGERAZOR_LLAMA_CPP_JOBS", os.cpu_count() or 2)))
    ap.add_argument("--native", action="store_true", help="-march=native build (not portable across CI machines)")
    ap.add_argument("--no-bindings", action="store_true", help="do not install the llama_cpp Python package")
    ap.add_argument("--check", action="store_true", help="only report whether a build is cached; never build")
    ap.add_argument("--optional", action="store_true", help="on failure print a warning and exit 0")
    args = ap.parse_args(argv)
    targets = tuple(args.target) if args.target else lc.DEFAULT_TARGETS
    native = True if args.native else None

    if args.check:
        found = lc.find_llama_cpp(targets, cache_dir=args.cache_dir, native=native)
        bindings = lc.llama_cpp_python_available()
        print(f"llama.cpp: {found.root if found else 'not built'}; llama_cpp bindings: {'installed' if bindings else 'missing'}")
        return 0 if found and (bindings or args.no_bindings) else 1

    t0 = time.monotonic()
    try:
        llama = lc.ensure_llama_cpp(args.cache_dir, targets=targets, jobs=args.jobs, native=native)
        if not args.no_bindings:
            lc.install_llama_cpp_python(llama)
    except Exception as exc:  # noqa: BLE001 - reported, and fatal unless --optional
        print(f"llama.cpp build failed: {exc}", file=sys.stderr)
        return 0 if args.optional else 1
    print(f"llama.cpp {llama.version} ready in {time.monotonic() - t0:.0f}s: {llama.root}")
    print(f"  bin/lib dir: {llama.bin_dir}  (targets: {', '.join(llama.targets)})")
    if "build_seconds" in llama.manifest:
        print(f"  cold build took {llama.manifest['build_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
