"""llama.cpp as a reference runtime: building it (``build``), its Python bindings (``bindings``), its
multimodal library on mmproj files (``multimodal``) and the comparisons against our packed runtime
(``agreement``: logits, and image embeddings). No product path imports this
package; tests and ``tools/`` use it to prove the GGUF exports in stock llama.cpp."""

from edgerazor.llama_cpp.bindings import (
    import_llama_cpp, llama_cpp_logits, llama_cpp_python_available, llama_cpp_tokenize, llama_cpp_version_info,
)
from edgerazor.llama_cpp.build import (
    DEFAULT_TARGETS, LLAMA_CPP_PYTHON_VERSION, LlamaCpp, LlamaCppError, cache_root, download_sdist,
    ensure_llama_cpp, find_llama_cpp, install_llama_cpp_python,
)
from edgerazor.llama_cpp.multimodal import import_mtmd, mtmd_image_embeddings

__all__ = [
    "DEFAULT_TARGETS", "LLAMA_CPP_PYTHON_VERSION", "LlamaCpp", "LlamaCppError", "cache_root", "download_sdist",
    "ensure_llama_cpp", "find_llama_cpp", "import_llama_cpp", "install_llama_cpp_python", "llama_cpp_logits",
    "import_mtmd", "llama_cpp_python_available", "llama_cpp_tokenize", "llama_cpp_version_info", "mtmd_image_embeddings",
]
