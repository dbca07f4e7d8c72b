"""GGUF export for llama.cpp, written from the integer codes (never by re-quantizing floats).

METHOD.md "GGUF exactness from codes": a ggml block stores one fp16 ``d`` and small integers
``q``; written with ``d`` = our fp16 group scale and ``q`` = our code (plus the format's offset),
the file dequantizes to exactly the weights training used:

============  =======  ===========================================  ====================================
ggml type     block    bytes per block (layout, as gguf-py's         exact for
                       ``gguf.quants`` reference reads it)
============  =======  ===========================================  ====================================
Q4_0          32       ``d`` fp16, then 16 bytes: byte ``j`` holds   codes in [-8, 7] (int4 and ternary
                       ``q[j] + 8`` (low nibble) and ``q[j+16] + 8``  rows), ``G % 32 == 0``
                       (high nibble)
Q8_0          32       ``d`` fp16, then 32 int8 codes                int8 codes, ``G % 32 == 0``
TQ2_0         256      64 bytes of 2-bit ``q + 1``, then ``d``:       all-ternary tensors, ``G % 256 == 0``
                       byte ``32c + m`` holds element ``128c + 32k
                       + m`` at bits ``2k``
TQ1_0         256      48 + 4 bytes of base-3 trits (5 resp. 4 per   all-ternary tensors, ``G % 256 == 0``
                       byte, scaled by 256/243 rounding up), then
                       ``d``
============  =======  ===========================================  ====================================

Tensors llama.cpp can only hold exactly in a wider type (a 1.88-bit layer mixing 4-bit and
ternary rows, a ternary tensor whose G is not a multiple of 256) are written losslessly in the
narrowest exact type with a note of the size cost, or refused when ``strict=True``. Norms and
any weight the recipe left unquantized are F32 (exact). Architectures: Qwen3 (``qwen3``, no
rotary permutation) and Llama / MobileLLM (``llama``: q/k rows get the HF -> GGUF rotary
permutation of llama.cpp's ``convert_hf_to_gguf.py``; a row permutation moves codes and scales
together, so it stays exact) and Qwen2.5-Omni's thinker (``qwen2vl`` with M-RoPE sections for the text
decoder; its vision encoder as an mmproj file, ``mmproj.py``).
"""

from edgerazor.export.gguf.architecture import PERMUTED_ARCHS, llama_permute
from edgerazor.export.gguf.blocks import BLOCKS, CODE_RANGE, ENCODERS, bits_per_weight, encode
from edgerazor.export.gguf.report import GGUFReport, GGUFTensor
from edgerazor.export.gguf.vocabulary import LLAMA3_REGEX, QWEN2_REGEX, detect_pre_tokenizer, normalizer_note
from edgerazor.export.gguf.exporter import export_gguf
from edgerazor.export.gguf.mmproj import MmprojSpec, MmprojTensor, default_mmproj_path, write_mmproj
from edgerazor.export.gguf.writer import FLOAT_TYPES, REQUESTED_TYPES, write_gguf

__all__ = [
    "BLOCKS", "CODE_RANGE", "ENCODERS", "FLOAT_TYPES", "GGUFReport", "GGUFTensor", "LLAMA3_REGEX", "MmprojSpec",
    "MmprojTensor", "PERMUTED_ARCHS", "QWEN2_REGEX", "REQUESTED_TYPES", "bits_per_weight", "default_mmproj_path",
    "detect_pre_tokenizer", "encode", "export_gguf", "llama_permute", "normalizer_note", "write_gguf", "write_mmproj",
]
