"""The tokenizer in GGUF: pre-tokenizer detection, vocabulary, merges, special tokens and chat template."""

from __future__ import annotations

import json

from edgerazor.errors import EdgeRazorError
from edgerazor.export.gguf.report import gguf_module

#: Pre-tokenizer regexes of the byte-level BPE families llama.cpp implements (tokenizer.json text).
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


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


def write_tokenizer(writer, tokenizer, n_vocab: int, pre: str) -> None:
    gguf = gguf_module()
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
