"""llama.cpp's multimodal library (``libmtmd``) on our mmproj files: the embeddings it computes for an image.

The ``llama_cpp`` package's ``mtmd_cpp`` module binds ``libmtmd`` from ``$MTMD_CPP_LIB`` at import;
:func:`import_mtmd` points it at our build (the ``mtmd`` target of :func:`ensure_llama_cpp`), next to the
``libllama`` the text model runs on, so both come from one llama.cpp.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgerazor.llama_cpp.bindings import import_llama_cpp, quiet_logs
from edgerazor.llama_cpp.build import LlamaCpp, LlamaCppError, find_llama_cpp


def import_mtmd(llama: LlamaCpp | None = None):
    """``llama_cpp.mtmd_cpp`` bound to our build's ``libmtmd`` (refused when the build lacks it)."""
    llama = llama or find_llama_cpp()
    if llama is None:
        raise LlamaCppError("llama.cpp is not built; run tools/build_llama_cpp.py (or ensure_llama_cpp())")
    if "mtmd" not in llama.targets:
        raise LlamaCppError(f"the llama.cpp build in {llama.root} has no libmtmd; rebuild with "
                            "ensure_llama_cpp(targets=(..., 'mtmd')) (tools/build_llama_cpp.py builds it by default)")
    import_llama_cpp(llama)
    mod = sys.modules.get("llama_cpp.mtmd_cpp")
    if mod is None:
        previous = os.environ.get("MTMD_CPP_LIB")
        os.environ["MTMD_CPP_LIB"] = str(llama.lib_dir)
        try:
            import llama_cpp.mtmd_cpp as mod
        finally:
            if previous is None:
                os.environ.pop("MTMD_CPP_LIB", None)
            else:
                os.environ["MTMD_CPP_LIB"] = previous
    loaded = Path(str(mod._libmtmd_base_path)).resolve()
    if loaded != Path(llama.lib_dir).resolve():
        raise LlamaCppError(f"llama_cpp.mtmd_cpp was already imported with libmtmd from {loaded}, not {llama.lib_dir}")
    quiet_logs(mod.mtmd_log_set)  # clip.cpp prints every key and tensor
    return mod


@dataclass
class _Session:
    """A text model, its libmtmd context and one tokenized prompt holding one image."""

    lc: object
    mtmd: object
    model: object
    ctx: object
    chunks: object
    parts: list  # per chunk: the text chunk's token ids, or the image chunk's token count
    image_chunk: object


@contextlib.contextmanager
def _session(text_gguf, mmproj, image: np.ndarray, before: str, after: str, n_threads: int | None,
             llama: LlamaCpp | None) -> Iterator[_Session]:
    """Load ``text_gguf`` (KV cache F32, no flash attention) and ``mmproj`` into libmtmd on the CPU and tokenize
    ``before`` + image + ``after`` (special tokens parsed); everything is freed on exit."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 [height, width, 3], got shape {image.shape}")
    lc = import_llama_cpp(llama)
    mtmd = import_mtmd(llama)
    ll = lc.llama_cpp
    threads = n_threads or max(1, min(4, os.cpu_count() or 1))
    model = lc.Llama(model_path=str(text_gguf), n_ctx=512, n_batch=512, n_ubatch=512, n_gpu_layers=0,
                     n_threads=threads, n_threads_batch=threads, type_k=ll.GGML_TYPE_F32, type_v=ll.GGML_TYPE_F32,
                     flash_attn=False, verbose=False)
    ctx = chunks = bitmap = None
    try:
        params = mtmd.mtmd_context_params_default()
        params.use_gpu, params.print_timings, params.n_threads, params.warmup = False, False, threads, False
        params.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED: the vision graph computes in F32
        ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), model._model.model, params)
        if not ctx:
            raise LlamaCppError(f"llama.cpp's multimodal library could not load {mmproj} with {text_gguf} "
                                "(set EDGERAZOR_LLAMA_CPP_VERBOSE=1 for its log)")
        if not mtmd.mtmd_support_vision(ctx):
            raise LlamaCppError(f"{mmproj} has no vision encoder llama.cpp recognises")
        height, width = image.shape[:2]
        bitmap = mtmd.mtmd_bitmap_init(width, height, (ctypes.c_uint8 * image.size).from_buffer_copy(image.tobytes()))
        chunks = mtmd.mtmd_input_chunks_init()
        prompt = before.encode() + mtmd.mtmd_default_marker() + after.encode()
        text = mtmd.mtmd_input_text(prompt, len(prompt), False, True)
        if mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) != 0:
            raise LlamaCppError(f"llama.cpp's multimodal library could not tokenize an image for {mmproj}")
        parts, images = [], []
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                images.append(chunk)
                parts.append(int(mtmd.mtmd_input_chunk_get_n_tokens(chunk)))
            else:
                n = ctypes.c_size_t()
                tokens = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                parts.append([int(tokens[j]) for j in range(n.value)])
        if len(images) != 1:
            raise LlamaCppError(f"expected one image chunk from llama.cpp's multimodal library, got {len(images)}")
        yield _Session(lc, mtmd, model, ctx, chunks, parts, images[0])
    finally:
        if chunks:
            mtmd.mtmd_input_chunks_free(chunks)
        if bitmap:
            mtmd.mtmd_bitmap_free(bitmap)
        if ctx:
            mtmd.mtmd_free(ctx)
        model.close()


def mtmd_image_embeddings(text_gguf: str | os.PathLike, mmproj: str | os.PathLike, image: np.ndarray, *,
                          n_threads: int | None = None, llama: LlamaCpp | None = None) -> np.ndarray:
    """The embeddings llama.cpp's multimodal library feeds the text model for ``image``: ``[n_tokens, n_embd]``.

    ``image`` is RGB ``uint8 [height, width, 3]``; libmtmd preprocesses it itself (for Qwen's projectors:
    resized to multiples of patch x merge within its pixel limits - a size already on that grid and
    within the limits is used as is - then ``(x / 255 - mean) / std``). Flash attention is off and
    nothing runs on a GPU.
    """
    with _session(text_gguf, mmproj, image, "", "", n_threads, llama) as s:
        n_tokens = s.mtmd.mtmd_input_chunk_get_n_tokens(s.image_chunk)
        if s.mtmd.mtmd_encode_chunk(s.ctx, s.image_chunk) != 0:
            raise LlamaCppError(f"llama.cpp's multimodal library failed to encode the image with {mmproj}")
        n_embd = s.lc.llama_cpp.llama_model_n_embd(s.model._model.model)
        out = np.ctypeslib.as_array(s.mtmd.mtmd_get_output_embd(s.ctx), shape=(n_tokens * n_embd,))
        return out.reshape(n_tokens, n_embd).copy()


def mtmd_prompt_logits(text_gguf: str | os.PathLike, mmproj: str | os.PathLike, image: np.ndarray, before: str,
                       after: str, *, n_threads: int | None = None,
                       llama: LlamaCpp | None = None) -> tuple[list[int], int, list[int], np.ndarray]:
    """llama.cpp's next-token logits after ``before`` + image + ``after``, evaluated as libmtmd's helper does
    (text tokens, the image's embeddings at their M-RoPE positions, text tokens), KV cache in F32.

    Returns ``(tokens before the image, image tokens, tokens after it, logits [vocab])``; the text tokens are
    libmtmd's (with the projector's image start/end markers, parsed as special tokens)."""
    with _session(text_gguf, mmproj, image, before, after, n_threads, llama) as s:
        if len(s.parts) != 3:
            raise LlamaCppError(f"expected text, image, text chunks from libmtmd, got {s.parts}")
        ll = s.lc.llama_cpp
        new_n_past = ll.llama_pos(0)
        if s.mtmd.mtmd_helper_eval_chunks(s.ctx, s.model._ctx.ctx, s.chunks, 0, 0, 512, True,
                                          ctypes.byref(new_n_past)) != 0:
            raise LlamaCppError("llama.cpp failed to evaluate the prompt with its image")
        n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(s.model._model.model))
        logits = np.ctypeslib.as_array(ll.llama_get_logits_ith(s.model._ctx.ctx, -1), shape=(n_vocab,)).copy()
        return s.parts[0], s.parts[1], s.parts[2], logits
