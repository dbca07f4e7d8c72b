"""The ``llama_cpp`` Python bindings bound to our llama.cpp build: logits and tokens of a GGUF file."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

from edgerazor.llama_cpp.build import (
    LLAMA_CPP_PYTHON_VERSION, LlamaCpp, LlamaCppError, _installed_bindings_version, find_llama_cpp,
)


def llama_cpp_python_available() -> bool:
    """Whether the pinned ``llama_cpp`` package is installed (does not import it)."""
    return _installed_bindings_version() == LLAMA_CPP_PYTHON_VERSION


def import_llama_cpp(llama: LlamaCpp | None = None):
    """Import the ``llama_cpp`` package bound to our build's ``libllama``.

    The package reads ``$LLAMA_CPP_LIB_PATH`` once, at import; importing it before this call with a
    different library is an error rather than a silent mix of two llama.cpp builds.
    """
    if llama is None:
        llama = find_llama_cpp()
        if llama is None:
            raise LlamaCppError("llama.cpp is not built; run tools/build_llama_cpp.py (or ensure_llama_cpp())")
    version = _installed_bindings_version()
    if version is None:
        raise LlamaCppError(
            "the llama_cpp Python package is not installed; run tools/build_llama_cpp.py, which "
            "installs it without compiling llama.cpp again"
        )
    if version != llama.version:
        raise LlamaCppError(f"llama_cpp Python package {version} does not match the llama.cpp build ({llama.version})")
    lib_dir = str(llama.lib_dir)
    mod = sys.modules.get("llama_cpp.llama_cpp")
    if mod is None:
        previous = os.environ.get("LLAMA_CPP_LIB_PATH")
        os.environ["LLAMA_CPP_LIB_PATH"] = lib_dir
        try:
            import llama_cpp  # noqa: F401
            import llama_cpp.llama_cpp as mod
        finally:
            if previous is None:
                os.environ.pop("LLAMA_CPP_LIB_PATH", None)
            else:
                os.environ["LLAMA_CPP_LIB_PATH"] = previous
    loaded = Path(str(mod._base_path)).resolve()
    if loaded != Path(lib_dir).resolve():
        raise LlamaCppError(f"llama_cpp was already imported with libllama from {loaded}, not {lib_dir}")
    quiet_logs(mod.llama_log_set)
    return sys.modules["llama_cpp"]


_LOG_CALLBACK = None


def quiet_logs(set_log) -> None:
    """Route a llama.cpp library's (very chatty) log to nowhere through its ``set_log(callback, user_data)``
    (``llama_log_set``, libmtmd's ``mtmd_log_set``) unless EDGERAZOR_LLAMA_CPP_VERBOSE is set."""
    global _LOG_CALLBACK
    if os.environ.get("EDGERAZOR_LLAMA_CPP_VERBOSE"):
        return
    if _LOG_CALLBACK is None:
        import llama_cpp.llama_cpp as ll

        @ll.llama_log_callback
        def _silent(level, text, user_data):  # pragma: no cover - called from C
            pass

        _LOG_CALLBACK = _silent  # keep a reference: C holds the pointer
    set_log(_LOG_CALLBACK, None)


def _ggml_type(ll, name: str) -> int:
    return int(getattr(ll, f"GGML_TYPE_{name.upper()}"))


def llama_cpp_logits(
    gguf_path: str | os.PathLike,
    token_ids: Sequence[int],
    kv_f32: bool = True,
    *,
    kv_type: str | None = None,
    n_threads: int | None = None,
    llama: LlamaCpp | None = None,
):
    """llama.cpp's next-token logits for every position of ``token_ids``: ``np.ndarray [n, vocab]``.

    ``kv_f32=True`` keeps the KV cache in f32, so the only rounding llama.cpp adds to the weights'
    own is its activation quantization in the matmuls; ``False`` uses llama.cpp's default f16 cache.
    ``kv_type`` ("f32", "f16", "q8_0", ...) overrides ``kv_f32``; a quantized V cache needs flash
    attention in llama.cpp, which is then switched on. The tokens are evaluated as given (no BOS is
    added), in one batch, on the CPU.
    """
    import numpy as np

    lc = import_llama_cpp(llama)
    ll = lc.llama_cpp
    ids = [int(t) for t in token_ids]
    if not ids:
        raise ValueError("token_ids is empty")
    n = len(ids)
    kv_name = (kv_type or ("f32" if kv_f32 else "f16")).lower()
    kv = _ggml_type(ll, kv_name)
    model = lc.Llama(
        model_path=str(gguf_path),
        n_ctx=max(n, 8),
        n_batch=n,
        n_ubatch=n,
        n_gpu_layers=0,
        logits_all=True,
        type_k=kv,
        type_v=kv,
        flash_attn=kv_name not in ("f32", "f16"),
        n_threads=n_threads or max(1, min(4, os.cpu_count() or 1)),
        n_threads_batch=n_threads or max(1, min(4, os.cpu_count() or 1)),
        seed=0,
        verbose=False,
    )
    try:
        if n > model.n_ctx():
            raise LlamaCppError(f"{n} tokens do not fit llama.cpp's context ({model.n_ctx()})")
        model.eval(ids)
        logits = np.array(model.scores[:n], dtype=np.float32, copy=True)
    finally:
        model.close()
    return logits


def llama_cpp_tokenize(
    gguf_path: str | os.PathLike,
    text: str,
    *,
    add_special: bool = False,
    parse_special: bool = False,
    llama: LlamaCpp | None = None,
) -> list[int]:
    """llama.cpp's tokenization of ``text`` with the GGUF's own tokenizer (vocabulary only)."""
    lc = import_llama_cpp(llama)
    model = lc.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    try:
        return list(model.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special))
    finally:
        model.close()


def llama_cpp_version_info(llama: LlamaCpp | None = None) -> str:
    """``llama_print_system_info()`` of the loaded library (SIMD features it was built with)."""
    lc = import_llama_cpp(llama)
    return lc.llama_cpp.llama_print_system_info().decode()
