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
together, so it stays exact).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgerazor.errors import EdgeRazorError
from edgerazor.export.pack import pack_scales
from edgerazor.quant.grouping import dequantize
from edgerazor.quant.modules import WeightFakeQuant

REQUESTED_TYPES = ("auto", "tq1_0", "tq2_0", "q4_0")

#: Pre-tokenizer regexes of the byte-level BPE families llama.cpp implements (tokenizer.json text).
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gguf():
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise EdgeRazorError("GGUF export needs gguf-py: pip install 'edgerazor[export]' (or pip install gguf)") from exc
    return gguf


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


@dataclass
class GGUFTensor:
    name: str  # GGUF tensor name, e.g. "blk.0.attn_q.weight"
    source: str  # the model parameter it came from
    ggml_type: str  # "Q4_0", "TQ2_0", "TQ1_0", "Q8_0", "F32"
    shape: tuple[int, ...]  # PyTorch order ([d_out, d_in] for matrices)
    n_bytes: int
    bits_per_weight: float
    theoretical_bits: float | None = None  # our format: mean row bits + 16 / G (None if unquantized)
    fallback: bool = False  # lossless, but in a wider type than the tensor's own precision (see notes)


@dataclass
class GGUFReport:
    path: Path
    arch: str
    tokenizer_pre: str
    tensors: list[GGUFTensor] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    file_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data (the file adds metadata, vocabulary and alignment padding)."""
        return sum(t.n_bytes for t in self.tensors)

    @property
    def types(self) -> dict[str, str]:
        return {t.name: t.ggml_type for t in self.tensors}

    def bits_per_weight(self, matrices_only: bool = True) -> float:
        chosen = [t for t in self.tensors if not matrices_only or len(t.shape) == 2]
        n = sum(int(np.prod(t.shape)) for t in chosen)
        return 8.0 * sum(t.n_bytes for t in chosen) / max(n, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "arch": self.arch, "tokenizer_pre": self.tokenizer_pre,
            "total_bytes": self.total_bytes, "file_bytes": self.file_bytes, "notes": list(self.notes),
            "compression_vs_bf16": self.bf16_bytes / self.file_bytes if self.file_bytes else 0.0,
            # the same keys as the packed format's size report, so one table prints both
            "tensors": [asdict(t) | {"kind": t.ggml_type, "bytes": t.n_bytes} for t in self.tensors],
        }

    @property
    def bf16_bytes(self) -> int:
        """The same tensors in BF16 (2 bytes per weight)."""
        return sum(2 * math.prod(t.shape) for t in self.tensors)

    def table(self):
        from rich.table import Table

        table = Table(title=f"GGUF {self.path.name} ({self.arch}, pre={self.tokenizer_pre})")
        for col in ("tensor", "type", "shape", "bytes", "bits/w", "theory"):
            table.add_column(col)
        for t in self.tensors:
            theory = "-" if t.theoretical_bits is None else f"{t.theoretical_bits:.3f}"
            table.add_row(t.name, t.ggml_type, "x".join(map(str, t.shape)), str(t.n_bytes),
                          f"{t.bits_per_weight:.3f}", theory)
        return table


# ------------------------------------------------------------------------------------------------
# Pure encoders: integer codes + fp16 group scales -> ggml block bytes
# ------------------------------------------------------------------------------------------------

#: ggml type name -> (weights per block, bytes per block)
BLOCKS = {"Q4_0": (32, 18), "Q8_0": (32, 34), "TQ2_0": (256, 66), "TQ1_0": (256, 54)}


def _block_scales(scales: np.ndarray, group_size: int, n_cols: int, block: int, what: str) -> np.ndarray:
    """fp16 ``d`` per block ``[rows, n_cols // block]``: the scale of the group holding the block."""
    if group_size % block or n_cols % block:
        raise ValueError(f"{what}: group size {group_size} and row length {n_cols} must be multiples of {block}")
    half = pack_scales(np.asarray(scales, dtype=np.float32))  # raises unless every scale is an fp16 value
    starts = np.arange(n_cols // block) * block
    return half[:, starts // group_size]


def _codes(codes: np.ndarray, low: int, high: int, block: int, what: str) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] % block:
        raise ValueError(f"{what}: codes must be [rows, cols] with cols a multiple of {block}, got {codes.shape}")
    if codes.size and (codes.min() < low or codes.max() > high):
        raise ValueError(f"{what}: codes must lie in [{low}, {high}], found [{codes.min()}, {codes.max()}]")
    return codes.astype(np.int16)


def _with_d(d: np.ndarray, payload: np.ndarray, d_first: bool) -> np.ndarray:
    """Concatenate the fp16 ``d`` bytes before (Q4_0/Q8_0) or after (TQ*) each block payload."""
    d_bytes = np.ascontiguousarray(d.astype("<f2")).view(np.uint8).reshape(*d.shape, 2)
    parts = (d_bytes, payload) if d_first else (payload, d_bytes)
    out = np.concatenate(parts, axis=-1)
    return out.reshape(out.shape[0], -1)


def encode_q4_0(codes: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    """Q4_0 bytes ``[rows, cols / 32 * 18]``: value ``d * (nibble - 8)``, nibble = code + 8."""
    q = _codes(codes, -8, 7, 32, "encode_q4_0") + 8
    rows, cols = q.shape
    d = _block_scales(scales, group_size, cols, 32, "encode_q4_0")
    q = q.reshape(rows, cols // 32, 2, 16).astype(np.uint8)
    payload = q[:, :, 0, :] | (q[:, :, 1, :] << 4)  # byte j: element j (low), element j + 16 (high)
    return _with_d(d, payload, d_first=True)


def encode_q8_0(codes: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    """Q8_0 bytes ``[rows, cols / 32 * 34]``: value ``d * q`` with q the int8 code."""
    q = _codes(codes, -127, 127, 32, "encode_q8_0")
    rows, cols = q.shape
    d = _block_scales(scales, group_size, cols, 32, "encode_q8_0")
    payload = q.astype(np.int8).view(np.uint8).reshape(rows, cols // 32, 32)
    return _with_d(d, payload, d_first=True)


def encode_tq2_0(codes: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    """TQ2_0 bytes ``[rows, cols / 256 * 66]``: 2-bit ``q + 1`` then ``d``; value ``d * (t - 1)``."""
    q = (_codes(codes, -1, 1, 256, "encode_tq2_0") + 1).astype(np.uint8)
    rows, cols = q.shape
    d = _block_scales(scales, group_size, cols, 256, "encode_tq2_0")
    q = q.reshape(rows, cols // 256, 2, 4, 32)  # [.., chunk of 128, shift slot k, byte m]
    payload = q[..., 0, :] | (q[..., 1, :] << 2) | (q[..., 2, :] << 4) | (q[..., 3, :] << 6)
    return _with_d(d, payload.reshape(rows, cols // 256, 64), d_first=False)


def _trits_to_bytes(t: np.ndarray, weights: tuple[int, ...]) -> np.ndarray:
    """``t`` is ``[..., n_digits, width]`` in {0, 1, 2}: most significant digit first, then ggml's
    fixed-point scaling ``ceil(v * 256 / 243)`` so that ``(byte * 3**k * 3) >> 8`` reads digit k."""
    w = np.array(weights, dtype=np.uint16).reshape(len(weights), 1)
    v = (t.astype(np.uint16) * w).sum(axis=-2)
    return ((v * 256 + 242) // 243).astype(np.uint8)


def encode_tq1_0(codes: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    """TQ1_0 bytes ``[rows, cols / 256 * 54]``: 48 bytes of 5 trits, 4 bytes of 4 trits, then ``d``.

    Within a block of 256: byte ``m < 32`` holds elements ``m + 32n`` (n = 0..4), byte ``32 + m``
    (m < 16) holds ``160 + m + 16n``, and qh byte ``m < 4`` holds ``240 + m + 4n`` (n = 0..3);
    digit n has weight ``3**(4-n)`` (the first element is the most significant trit).
    """
    q = (_codes(codes, -1, 1, 256, "encode_tq1_0") + 1).astype(np.uint8)
    rows, cols = q.shape
    d = _block_scales(scales, group_size, cols, 256, "encode_tq1_0")
    q = q.reshape(rows, cols // 256, 256)
    qs0 = _trits_to_bytes(q[..., :160].reshape(rows, -1, 5, 32), (81, 27, 9, 3, 1))
    qs1 = _trits_to_bytes(q[..., 160:240].reshape(rows, -1, 5, 16), (81, 27, 9, 3, 1))
    qh = _trits_to_bytes(q[..., 240:].reshape(rows, -1, 4, 4), (81, 27, 9, 3))
    return _with_d(d, np.concatenate([qs0, qs1, qh], axis=-1), d_first=False)


ENCODERS = {"Q4_0": encode_q4_0, "Q8_0": encode_q8_0, "TQ2_0": encode_tq2_0, "TQ1_0": encode_tq1_0}
#: the code range each quantized type can hold
CODE_RANGE = {"Q4_0": (-8, 7), "Q8_0": (-127, 127), "TQ2_0": (-1, 1), "TQ1_0": (-1, 1)}


def encode(ggml_type: str, codes: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    """Encode ``codes [rows, cols]`` with fp16 ``scales [rows, cols / G]`` as ``ggml_type`` blocks."""
    return ENCODERS[ggml_type](codes, scales, group_size)


def bits_per_weight(ggml_type: str) -> float:
    if ggml_type == "F32":
        return 32.0
    n, nbytes = BLOCKS[ggml_type]
    return 8.0 * nbytes / n


# ------------------------------------------------------------------------------------------------
# Architecture
# ------------------------------------------------------------------------------------------------

ARCHS = {"qwen3": "qwen3", "llama": "llama", "mobilellm": "llama"}


def llama_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's HF -> GGUF rotary permutation of q/k rows (``convert_hf_to_gguf.py``,
    ``LlamaModel.permute``): HF's rotate-half pairs (i, i + d/2) become interleaved pairs (2i, 2i+1).
    Works on any per-row array (weights, codes, scales, biases)."""
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = (params.get("rope_type") if isinstance(params, dict) else None) or (
        scaling.get("rope_type") or scaling.get("type") if isinstance(scaling, dict) else None) or "default"
    if rope_type != "default":
        raise EdgeRazorError(
            f"GGUF export supports plain RoPE only; this model uses rope_type {rope_type!r} "
            "(llama3 / yarn / linear scaling need extra GGUF keys or a rope_freqs tensor that this writer "
            "does not produce) - refusing rather than writing a model that runs with the wrong positions"
        )
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    if theta is None:
        theta = getattr(config, "rope_theta", None)
    if theta is None:
        raise EdgeRazorError("model config has no rope_theta (nor rope_parameters['rope_theta'])")
    return float(theta)


def _write_hparams(writer, config, arch: str) -> None:
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(n_head))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or n_head))
    writer.add_key_length(int(head_dim))
    writer.add_value_length(int(head_dim))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    if arch == "qwen3" and getattr(config, "use_sliding_window", False):
        raise EdgeRazorError("Qwen3 with use_sliding_window=true is not supported by llama.cpp's qwen3 graph")


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "use_regex": use_regex}


#: llama.cpp ``tokenizer.ggml.pre`` name -> (pre-tokenizer steps, the BPE ``ignore_merges`` llama.cpp uses)
KNOWN_PRE_TOKENIZERS: dict[str, tuple[list[dict], bool]] = {
    "qwen2": ([_split(QWEN2_REGEX), _byte_level(False)], False),
    "llama-bpe": ([_split(LLAMA3_REGEX), _byte_level(False)], True),
    "gpt-2": ([_byte_level(True)], False),
}
_IGNORED_KEYS = {"trim_offsets"}  # affects offsets only, never the token ids


def _canonical(step: dict) -> dict:
    return {k: v for k, v in step.items() if k not in _IGNORED_KEYS}


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise EdgeRazorError(
            f"GGUF export needs a fast (tokenizers-backed) tokenizer; got {type(tokenizer).__name__}"
        )
    return json.loads(backend.to_str())


def detect_pre_tokenizer(tokenizer) -> str:
    """The llama.cpp ``tokenizer.ggml.pre`` name for ``tokenizer``; raises for anything unknown.

    The tokenizer.json pre-tokenizer is compared step by step with the ones llama.cpp re-implements
    (Qwen2's regex Split + ByteLevel -> "qwen2", Llama-3's -> "llama-bpe", plain GPT-2 ByteLevel ->
    "gpt-2"); the BPE model's ``ignore_merges`` must match what llama.cpp uses for that name.
    """
    spec = _tokenizer_json(tokenizer)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise EdgeRazorError(f"GGUF export supports byte-level BPE tokenizers only; this one is {model.get('type')!r}")
    if model.get("byte_fallback"):
        raise EdgeRazorError("BPE with byte_fallback is a SentencePiece-style vocabulary; GGUF 'gpt2' export refuses it")
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise EdgeRazorError(
            f"tokenizer normalizer {normalizer.get('type')!r} has no llama.cpp equivalent for byte-level BPE; "
            "refusing to write a GGUF that would tokenize differently"
        )
    pre = spec.get("pre_tokenizer")
    steps = (pre.get("pretokenizers") if pre and pre.get("type") == "Sequence" else [pre] if pre else [])
    steps = [_canonical(s) for s in steps]
    for name, (known, ignore_merges) in KNOWN_PRE_TOKENIZERS.items():
        if steps == [_canonical(k) for k in known]:
            if bool(model.get("ignore_merges", False)) != ignore_merges:
                raise EdgeRazorError(
                    f"tokenizer pre-tokenizer matches llama.cpp's {name!r}, but its BPE ignore_merges="
                    f"{bool(model.get('ignore_merges', False))} while llama.cpp uses ignore_merges={ignore_merges} "
                    "for that name: token ids would differ; refusing"
                )
            return name
    raise EdgeRazorError(
        "unknown pre-tokenizer: llama.cpp selects its pre-tokenizer by name (tokenizer.ggml.pre) and this "
        f"one matches none it implements ({', '.join(KNOWN_PRE_TOKENIZERS)}); refusing to guess. "
        f"Got: {json.dumps(pre)[:400]}"
    )


def normalizer_note(tokenizer) -> str | None:
    """A note when the tokenizer normalizes text (NFC, as Qwen2's does) and llama.cpp will not."""
    normalizer = _tokenizer_json(tokenizer).get("normalizer")
    if normalizer is None:
        return None
    return (f"the tokenizer applies {normalizer.get('type')} normalization and llama.cpp does not: text that is not "
            "already NFC (decomposed accents, e.g. from macOS file names) tokenizes differently there; normalize "
            "prompts with unicodedata.normalize('NFC', text) before llama.cpp sees them")


def _looks_special(token: str) -> bool:
    return token.startswith("<|") and token.endswith("|>")


def _merges(spec: dict) -> list[str]:
    merges = (spec.get("model") or {}).get("merges") or []
    out = []
    for m in merges:
        if isinstance(m, str):
            out.append(m)
        else:  # [left, right] (transformers >= 4.45); llama.cpp's text format encodes spaces as U+0120
            out.append(" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in m))
    return out


def _write_tokenizer(writer, tokenizer, n_vocab: int, pre: str) -> None:
    gguf = _gguf()
    vocab = tokenizer.get_vocab()
    if vocab and max(vocab.values()) >= n_vocab:
        raise EdgeRazorError(
            f"tokenizer has token id {max(vocab.values())} but the model's vocab_size is {n_vocab}"
        )
    added = {tok.content: tok for tok in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    reverse = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):  # the embedding may be padded past the tokenizer (as llama.cpp's converter does)
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            special = added[token].special or _looks_special(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    spec = _tokenizer_json(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = _merges(spec)
    if not merges:
        raise EdgeRazorError("tokenizer has no BPE merges; llama.cpp's gpt2 tokenizer needs them")
    writer.add_token_merges(merges)
    ids = {}
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < n_vocab:
            ids[kind] = tid
            getattr(writer, f"add_{kind}_token_id")(tid)
    # add_bos / add_eos: what the tokenizer actually does (its post-processor), measured, not parsed
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    writer.add_add_bos_token(bool("bos" in ids and len(full) > len(plain) and full[0] == ids["bos"]))
    writer.add_add_eos_token(bool("eos" in ids and len(full) > len(plain) and full[-1] == ids["eos"]))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = [{"name": k, "template": v} for k, v in template.items()]
    if template:
        writer.add_chat_template(template)


# ------------------------------------------------------------------------------------------------
# Tensor planning
# ------------------------------------------------------------------------------------------------


def _row_kinds(wq: WeightFakeQuant) -> tuple[list[int], float]:
    """(qmax of every quantizer used by some row, mean storage bits over rows)."""
    mask = wq.precision_mask.cpu()
    n_high = int(mask.sum())
    n_low = mask.numel() - n_high
    qmaxes, bits = [], 0.0
    if n_high or wq.low is None:
        qmaxes.append(int(wq.high.qmax))
        bits += n_high * float(wq.high.bits)
    if n_low and wq.low is not None:
        qmaxes.append(int(wq.low.qmax))
        bits += n_low * float(wq.low.bits)
    return qmaxes, bits / max(mask.numel(), 1)


def _fits(ggml_type: str, qmaxes: list[int], group: int, d_in: int) -> bool:
    lo, hi = CODE_RANGE[ggml_type]
    block = BLOCKS[ggml_type][0]
    return max(qmaxes) <= min(hi, -lo) and group % block == 0 and d_in % block == 0


def _choose_type(qmaxes: list[int], group: int, d_in: int, requested: str) -> tuple[str, str | None, str]:
    """(ggml type to write, reason it is a fallback or None, the ideal type)."""
    tq = "TQ1_0" if requested == "tq1_0" else "TQ2_0"
    if set(qmaxes) == {1}:
        ideal = "Q4_0" if requested == "q4_0" else tq
    elif len(set(qmaxes)) == 1 and qmaxes[0] <= 7:
        ideal = "Q4_0"
    elif len(set(qmaxes)) == 1 and qmaxes[0] <= 127:
        ideal = "Q8_0"
    else:
        ideal = None
    if ideal is not None and _fits(ideal, qmaxes, group, d_in):
        return ideal, None, ideal
    if ideal is None:
        kinds = " and ".join("ternary" if q == 1 else f"{q.bit_length() + 1}-bit" for q in sorted(qmaxes))
        reason = f"mixes precisions across rows ({kinds}), which no single ggml type stores at its own size"
    else:
        block = BLOCKS[ideal][0]
        reason = (f"is not exact in {ideal}: {ideal} needs the group size (G={group}) and row length "
                  f"({d_in}) to be multiples of {block}")
    for fallback in ("Q4_0", "Q8_0"):
        if _fits(fallback, qmaxes, group, d_in):
            return fallback, reason, ideal or "per-row"
    return "F32", reason, ideal or "per-row"


@dataclass
class _Planned:
    name: str
    source: str
    ggml_type: str
    data: np.ndarray  # bytes (quantized) or float32 values
    shape: tuple[int, ...]
    theoretical: float | None
    fallback: bool = False


def _quantized_tensor(
    gguf_name: str, source: str, weight: torch.Tensor, wq: WeightFakeQuant, requested: str,
    strict: bool, permute_heads: int | None, notes: list[str],
) -> _Planned:
    codes_t, scales_t = wq.codes_and_scales(weight)
    qmaxes, row_bits = _row_kinds(wq)
    theoretical = row_bits + 16.0 / wq.group_size
    ggml_type, reason, _ = _choose_type(qmaxes, wq.group_size, wq.d_in, requested)
    shape = (codes_t.shape[0], wq.d_in)
    if reason is not None:
        bpw = bits_per_weight(ggml_type)
        message = (
            f"{gguf_name} ({source}, {wq.names[0]}/{wq.names[1] or '-'}, G={wq.group_size}) {reason}; "
            f"written losslessly as {ggml_type} at {bpw:.3f} bits/weight vs {theoretical:.3f} theoretical "
            f"({bpw / theoretical:.2f}x the size)"
        )
        if strict:
            raise EdgeRazorError(f"strict GGUF export refuses tensor {gguf_name!r}: {message}")
        notes.append(message)
    if ggml_type == "F32":  # the dequantized weights themselves (float32 holds s * q exactly)
        values = dequantize(codes_t, scales_t, wq.group_size).cpu().numpy()[:, : wq.d_in]
        if permute_heads:
            values = llama_permute(values, permute_heads)
        return _Planned(gguf_name, source, "F32", np.ascontiguousarray(values, dtype=np.float32), shape,
                        theoretical, fallback=reason is not None)
    codes = codes_t.cpu().numpy()[:, : wq.d_in]
    scales = scales_t.cpu().numpy().astype(np.float32)
    if permute_heads:  # rows move with their codes and scales: still exact
        codes, scales = llama_permute(codes, permute_heads), llama_permute(scales, permute_heads)
    return _Planned(gguf_name, source, ggml_type, encode(ggml_type, codes, scales, wq.group_size), shape,
                    theoretical, fallback=reason is not None)


def _owner(model: nn.Module, param_name: str) -> tuple[str, nn.Module]:
    module_name = param_name.rpartition(".")[0]
    return module_name, model.get_submodule(module_name)


#: float types for weight matrices the recipe left unquantized (norms and other vectors stay F32)
FLOAT_TYPES = ("f32", "f16", "bf16")


def _float_tensor(values: np.ndarray, float_type: str) -> tuple[str, np.ndarray]:
    gguf = _gguf()
    if float_type == "f16":
        return "F16", values.astype(np.float16)
    if float_type == "bf16":
        return "BF16", gguf.quants.quantize(values, gguf.GGMLQuantizationType.BF16)
    return "F32", np.ascontiguousarray(values, dtype=np.float32)


def _plan_tensors(model: nn.Module, arch: str, requested: str, strict: bool, notes: list[str],
                  float_type: str = "f32") -> list[_Planned]:
    gguf = _gguf()
    config = model.config
    n_layers = int(config.num_hidden_layers)
    tmap = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), n_layers)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and embed is not None and head.weight is embed.weight
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    planned: list[_Planned] = []
    seen: set[int] = set()
    for param_name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue  # a tied lm_head: llama.cpp reuses token_embd when "output" is absent
        seen.add(id(param))
        gguf_name = tmap.get_name(param_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise EdgeRazorError(
                f"parameter {param_name!r} has no llama.cpp {arch} tensor name; refusing to drop it silently"
            )
        if tied and gguf_name.startswith("output."):
            continue
        module_name, module = _owner(model, param_name)
        permute = None
        if arch == "llama":
            if module_name.endswith("self_attn.q_proj"):
                permute = n_head
            elif module_name.endswith("self_attn.k_proj"):
                permute = n_kv
        wq = getattr(module, "weight_quant", None)
        if param_name.endswith(".weight") and isinstance(wq, WeightFakeQuant):
            planned.append(_quantized_tensor(gguf_name, param_name, param, wq, requested, strict, permute, notes))
            continue
        values = param.detach().float().cpu().numpy()
        if permute:
            values = llama_permute(values, permute)
        ggml_type, data = "F32", np.ascontiguousarray(values, dtype=np.float32)
        if values.ndim == 2:
            ggml_type, data = _float_tensor(values, float_type)
            notes.append(f"{gguf_name} ({param_name}) is not quantized by the recipe: written as {ggml_type}")
        planned.append(_Planned(gguf_name, param_name, ggml_type, data, tuple(values.shape), None))
    if not tied and head is not None and not any(p.name.startswith("output.") for p in planned):
        raise EdgeRazorError("untied lm_head was not exported (no 'output' tensor); refusing an incomplete GGUF")
    return planned


def _file_type(planned: list[_Planned]):
    gguf = _gguf()
    counts: dict[str, int] = {}
    for p in planned:
        if p.ggml_type != "F32":
            counts[p.ggml_type] = counts.get(p.ggml_type, 0) + int(np.prod(p.shape))
    if not counts:
        return gguf.LlamaFileType.ALL_F32
    main = max(counts, key=counts.get)
    return getattr(gguf.LlamaFileType, f"MOSTLY_{main}")


# ------------------------------------------------------------------------------------------------
# Writer
# ------------------------------------------------------------------------------------------------


def write_gguf(model: nn.Module, tokenizer, path: str | os.PathLike, type: str = "auto", strict: bool = False,
               quiet: bool = False, float_type: str = "f32") -> GGUFReport:
    """Write ``model`` (quantized by ``edgerazor.quantize``) and ``tokenizer`` as one GGUF file.

    ``type``: "auto" (all-ternary tensors with G % 256 == 0 -> TQ2_0, 4-bit -> Q4_0, mixed 4-bit /
    ternary -> Q4_0 losslessly with a note), "tq2_0" / "tq1_0" (that type for ternary tensors),
    "q4_0" (every 4-bit or ternary tensor in Q4_0). ``strict=True`` refuses any tensor that can
    only be written in a wider type than its own (a note otherwise). Weight matrices the recipe left
    unquantized are written as ``float_type`` (f32: exact; f16 / bf16: 16-bit baselines, e.g. an
    unquantized model for speed comparisons). The file is written to
    ``path + ".tmp"`` and moved into place, so ``path`` is either the old file or the whole new one.
    """
    gguf = _gguf()
    if type not in REQUESTED_TYPES:
        raise EdgeRazorError(f"GGUF type {type!r} is not one of {', '.join(REQUESTED_TYPES)}")
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise EdgeRazorError(
            f"GGUF export supports model_type {', '.join(sorted(ARCHS))}; got {model_type!r}"
        )
    if tokenizer is None:
        raise EdgeRazorError("GGUF export needs the tokenizer: llama.cpp reads the vocabulary from the file")
    arch = ARCHS[model_type]
    pre = detect_pre_tokenizer(tokenizer)
    notes: list[str] = [note] if (note := normalizer_note(tokenizer)) else []
    if float_type not in FLOAT_TYPES:
        raise EdgeRazorError(f"GGUF float type {float_type!r} is not one of {', '.join(FLOAT_TYPES)}")
    planned = _plan_tensors(model, arch, type, strict, notes, float_type)
    meta = getattr(config, "edgerazor", None) or {}
    q = (meta.get("recipe") or {}).get("quant") or {}
    if (q.get("kv_cache") or {}).get("bits") == 8 or (q.get("activation") or {}).get("bits") == 8:
        notes.append("the recipe trains with 8-bit activations / KV cache: run llama.cpp with "
                     "-ctk q8_0 -ctv q8_0 (KV) - weights-only formats cannot carry those settings")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.upper())])
    try:
        name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
        if name:
            writer.add_name(Path(str(name)).name)
        _write_hparams(writer, config, arch)
        writer.add_file_type(_file_type(planned))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _write_tokenizer(writer, tokenizer, int(config.vocab_size), pre)
        for p in planned:
            raw_dtype = None if p.ggml_type in ("F32", "F16") else getattr(gguf.GGMLQuantizationType, p.ggml_type)
            writer.add_tensor(p.name, p.data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    report = GGUFReport(path, arch, pre, notes=notes, file_bytes=path.stat().st_size)
    for p in planned:
        report.tensors.append(GGUFTensor(
            p.name, p.source, p.ggml_type, p.shape, int(p.data.nbytes),
            8.0 * p.data.nbytes / int(np.prod(p.shape)), p.theoretical, p.fallback,
        ))
    if not quiet:
        for note in notes:
            print(f"note: {note}")
    return report


def export_gguf(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, filename: str = "model.gguf",
                type: str = "auto", strict: bool = False) -> Path:
    """Exporter-registry form (``fn(model, out_dir, **options) -> Path``) of :func:`write_gguf`."""
    return write_gguf(model, tokenizer, Path(out_dir) / filename, type=type, strict=strict).path
