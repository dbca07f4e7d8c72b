"""Turning records into training rows: token ids plus labels that carry the loss mask.

Labels follow the Hugging Face convention - aligned with ``input_ids``, ``-100`` where there is no
loss - and are shifted for next-token prediction by the trainer, not here. The response mask is
the point of this module: distillation on instruction data must not train the student to produce
the user's prompt, so prompt tokens, chat-template scaffolding and non-assistant turns get -100.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch

from edgerazor.data.stats import SourceStats
from edgerazor.errors import DataError
from edgerazor.recipe import DataSection, DataSource

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
#: Rows tokenized per tokenizer call: big enough for the Rust batch path, small enough for memory.
BATCH = 1000
#: Qwen3's reasoning-block delimiters, the default; a model adapter names its family's (``think_tags``)
THINK_TAGS = ("<think>", "</think>")
FEATURES = datasets.Features(
    {"input_ids": datasets.List(datasets.Value("int32")), "labels": datasets.List(datasets.Value("int32"))}
)


def strip_think(text: str, tags: tuple[str, str] = THINK_TAGS) -> str:
    """Remove every ``<think>...</think>`` block (empty ones too) and the whitespace after it.

    Qwen3 is distilled in non-reasoning mode, so chain-of-thought in distilled responses must go.
    """
    start, end = (re.escape(t) for t in tags)
    return re.sub(rf"{start}.*?{end}\s*", "", text, flags=re.DOTALL)


def _batches(items: Sequence, size: int = BATCH) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def bos_prefix(tokenizer) -> list[int]:
    """``[bos]`` when the tokenizer itself prepends a BOS to plain text (Llama), else ``[]`` (Qwen)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    return [bos] if tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos] else []


def eos_suffix(tokenizer) -> list[int]:
    """``[eos]`` ends documents and responses so the student learns where to stop."""
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def _encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    out: list[list[int]] = []
    for chunk in _batches(texts):
        out.extend(tokenizer(list(chunk), add_special_tokens=False)["input_ids"])
    return out


def _rows(ids: list[list[int]], labels: list[list[int]]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels}, features=FEATURES)


# --------------------------------------------------------------------------------------- plain text


def pack_text(texts: Sequence[str | None], tokenizer, block: int, max_blocks: int | None = None) -> list[list[int]]:
    """Tokenize documents (each ``bos? + doc + eos``), concatenate, cut into full blocks of ``block``.

    The tail shorter than a block is dropped, as in standard causal-LM training; with
    ``max_blocks`` tokenization stops as soon as enough tokens are in hand.
    """
    docs = [t for t in texts if t and t.strip()]
    head, tail = bos_prefix(tokenizer), eos_suffix(tokenizer)
    stream: list[int] = []
    need = None if max_blocks is None else max_blocks * block
    for chunk in _batches(docs):
        for ids in _encode(tokenizer, chunk):
            stream.extend(head + ids + tail)
        if need is not None and len(stream) >= need:
            break
    n_blocks = len(stream) // block
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    return [stream[i * block : (i + 1) * block] for i in range(n_blocks)]


# ---------------------------------------------------------------------------------- prompt/response


def encode_prompt_responses(
    prompts: Sequence[str], responses: Sequence[str], tokenizer, response_only: bool = True, separator: str = ""
) -> tuple[list[list[int]], list[list[int]]]:
    """Rows ``bos? + prompt + separator`` then ``response + eos``; prompt tokens get -100 when response_only.

    The two halves are tokenized separately (as TRL does for prompt-completion data) so the mask
    boundary is exact even where a joint tokenization would merge across it.
    """
    head, tail = bos_prefix(tokenizer), eos_suffix(tokenizer)
    p_all = _encode(tokenizer, [p + separator for p in prompts])
    r_all = _encode(tokenizer, list(responses))
    ids, labels = [], []
    for p_ids, r_ids in zip(p_all, r_all):
        p_ids, r_ids = head + p_ids, r_ids + tail
        ids.append(p_ids + r_ids)
        labels.append(([IGNORE_INDEX] * len(p_ids) if response_only else list(p_ids)) + r_ids)
    return ids, labels


# --------------------------------------------------------------------------------------------- chat


def require_chat_template(tokenizer, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{where} has format 'chat' but the tokenizer ({type(tokenizer).__name__}, "
            f"{getattr(tokenizer, 'name_or_path', '') or 'unnamed'}) has no chat template; use an instruct "
            "tokenizer, set tokenizer.chat_template, or use format 'prompt_response'"
        )


def end_of_turn_tokens(tokenizer) -> list[str]:
    """Special-token strings, longest first: the one right after an assistant turn gets a label."""
    specials = set(tokenizer.all_special_tokens)
    specials |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    return sorted((s for s in specials if s), key=len, reverse=True)


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(messages: list[dict], text: str, tokenizer, end_tokens: Sequence[str]) -> list[tuple[int, int]]:
    """Character spans of ``text`` (the rendered conversation) that carry loss: each assistant turn's
    content plus the end-of-turn special token right after it (so the student learns to stop).

    A turn's content is searched for after the longest common prefix of ``text`` with the rendering
    of the conversation up to that turn plus the generation prompt (the role header). The common
    prefix, rather than a strict prefix, keeps this right for templates that render a turn
    differently when it is last (Qwen3 inserts an empty think block there), and the search (with a
    ``strip()`` fallback for templates that trim) survives templates that add text around content.
    """
    spans: list[tuple[int, int]] = []
    cursor = done = 0  # end of the last labelled span; index of the message after it
    for i, message in enumerate(messages):
        content = message.get("content") or ""
        if message.get("role") != "assistant" or not content.strip():
            continue
        try:
            head = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
            lower = max(cursor, len(os.path.commonprefix([head, text])))
        except Exception:  # a template that rejects the prefix (e.g. one that must end with assistant)
            lower = _after_messages(messages[done:i], text, cursor)
        start = text.find(content, lower)
        if start < 0:
            content = content.strip()
            start = text.find(content, lower)
        if start < 0:
            raise ValueError(f"the chat template does not render assistant turn {i} verbatim: cannot mask it")
        end = start + len(content)
        for token in end_tokens:
            if text.startswith(token, end):
                end += len(token)
                break
        spans.append((start, end))
        cursor, done = end, i + 1
    return spans


def _after_messages(messages: list[dict], text: str, cursor: int) -> int:
    """Fallback lower bound: skip, in order, past each of ``messages`` whose content is rendered verbatim."""
    for message in messages:
        content = message.get("content") or ""
        pos = text.find(content, cursor) if content else -1
        if pos >= 0:
            cursor = pos + len(content)
    return cursor


def span_labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """``ids`` inside ``spans`` (by character overlap; zero-width tokens by position), else -100."""
    labels = [IGNORE_INDEX] * len(ids)
    for k, (tok_id, (a, b)) in enumerate(zip(ids, offsets)):
        for s, e in spans:
            if (a < e and b > s) or (a == b and s <= a < e):
                labels[k] = tok_id
                break
    return labels


#: ShareGPT speaker names -> chat-template roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _messages(value: Any, where: str, row: int, strip: bool, tags: tuple[str, str] = THINK_TAGS) -> list[dict]:
    """Validated copy of one conversation: None-valued keys dropped (Arrow fills missing keys with
    None, and templates test ``'key' in message``), think blocks stripped from assistant turns."""
    if not isinstance(value, list):
        raise DataError(f"{where}: row {row}: messages_field must hold a list of messages, got {type(value).__name__}")
    out = []
    for j, m in enumerate(value):
        if isinstance(m, dict) and "role" not in m and "from" in m:  # ShareGPT (e.g. Infinity-Instruct)
            m = {"role": SHAREGPT_ROLES.get(m["from"], m["from"]), "content": m.get("value")}
        if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content") or "", str):
            raise DataError(
                f"{where}: row {row}, message {j}: every message needs a 'role' and a string 'content', got {m!r}"
            )
        m = {k: v for k, v in m.items() if v is not None}
        if strip and m["role"] == "assistant" and m.get("content"):
            m["content"] = strip_think(m["content"], tags)
        out.append(m)
    return out


# -------------------------------------------------------------------------------------- per source


def format_source(
    raw: datasets.Dataset, source: DataSource, section: DataSection, tokenizer, index: int | None = None,
    stats: SourceStats | None = None, think_tags: tuple[str, str] = THINK_TAGS,
) -> datasets.Dataset:
    """Tokenize one source's records into ``input_ids`` / ``labels`` rows of at most ``max_length``.

    ``stats``, when given, receives how many rows were dropped (and why), truncated and kept.
    """
    where = source.describe(index)
    L = section.max_length
    stats = stats if stats is not None else SourceStats(where, source.format)
    if source.format == "text":
        texts = raw[source.text_field]
        bad = next((row for row, t in enumerate(texts) if t is not None and not isinstance(t, str)), None)
        if bad is not None:
            kind = type(texts[bad]).__name__
            raise DataError(f"{where}: row {bad}: text_field={source.text_field!r} holds {kind}, not text")
        blocks = pack_text(texts, tokenizer, L, source.max_samples)
        stats.empty = sum(1 for t in texts if not (t and t.strip()))
        stats.kept = len(blocks)
        if not blocks:
            raise DataError(
                f"{where}: empty after packing: {len(raw)} documents in text_field={source.text_field!r} give fewer "
                f"than max_length={L} tokens (one block)"
            )
        return _rows(blocks, [list(b) for b in blocks])

    ids_all: list[list[int]] = []
    labels_all: list[list[int]] = []
    empty = 0
    if source.format == "prompt_response":
        prompts, responses = [], []
        for row, (prompt, response) in enumerate(zip(raw[source.prompt_field], raw[source.response_field])):
            for key, value in (("prompt_field", prompt), ("response_field", response)):
                if value is not None and not isinstance(value, str):
                    raise DataError(
                        f"{where}: row {row}: {key}={getattr(source, key)!r} holds {type(value).__name__}, not text"
                    )
            response = strip_think(response or "", think_tags) if section.strip_think else (response or "")
            if not response.strip():
                empty += 1
                continue
            prompts.append(prompt or "")
            responses.append(response)
        ids_all, labels_all = encode_prompt_responses(
            prompts, responses, tokenizer, section.response_only, source.prompt_separator
        )
    else:
        require_chat_template(tokenizer, where)
        end_tokens = end_of_turn_tokens(tokenizer)
        convs, texts = [], []
        for row, value in enumerate(raw[source.messages_field]):
            messages = _messages(value, where, row, section.strip_think, think_tags)
            if section.response_only and not any(
                m["role"] == "assistant" and (m.get("content") or "").strip() for m in messages
            ):
                empty += 1
                continue
            convs.append(messages)
            texts.append(_render(tokenizer, messages))
        for c0, chunk in zip(range(0, len(texts), BATCH), _batches(texts)):
            enc = tokenizer(list(chunk), add_special_tokens=False, return_offsets_mapping=section.response_only)
            for k, ids in enumerate(enc["input_ids"]):
                if not section.response_only:
                    ids_all.append(ids)
                    labels_all.append(list(ids))
                    continue
                try:
                    spans = assistant_spans(convs[c0 + k], chunk[k], tokenizer, end_tokens)
                except ValueError as exc:
                    raise DataError(f"{where}: conversation {c0 + k}: {exc}") from None
                ids_all.append(ids)
                labels_all.append(span_labels(ids, enc["offset_mapping"][k], spans))

    kept_ids, kept_labels, truncated, cut = [], [], 0, 0
    for ids, labels in zip(ids_all, labels_all):
        long = len(ids) > L
        ids, labels = ids[:L], labels[:L]
        if all(x == IGNORE_INDEX for x in labels):
            truncated += 1
            continue
        cut += long
        kept_ids.append(ids)
        kept_labels.append(labels)
    stats.empty, stats.no_response, stats.truncated, stats.kept = empty, truncated, cut, len(kept_ids)
    if not kept_ids:
        what = "response" if source.format == "prompt_response" else "assistant turn"
        raise DataError(
            f"{where}: empty after filtering: of {len(raw)} records, {empty} have an empty {what}"
            f"{' after strip_think' if section.strip_think else ''} and {truncated} have no "
            f"{what} tokens within max_length={L}"
        )
    if empty or truncated:
        log.info("%s: dropped %d empty and %d fully truncated rows of %d", where, empty, truncated, len(raw))
    return _rows(kept_ids, kept_labels)


# ----------------------------------------------------------------------------------------- batches


@dataclass
class DistillCollator:
    """Right-pads a list of rows into a batch of ``input_ids``, ``attention_mask``, ``labels`` tensors.

    Pads ``input_ids`` with the tokenizer's pad id (its eos when it has none: those positions are
    masked out anyway) and ``labels`` with -100; rows without ``labels`` train on every token.
    """

    tokenizer: Any
    pad_to_multiple_of: int | None = None
    label_pad_id: int = IGNORE_INDEX
    pad_token_id: int | None = None  # overrides the tokenizer's (then ``tokenizer`` may be None)

    def pad_id(self) -> int:
        if self.pad_token_id is not None:
            return self.pad_token_id
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        if pad is None:
            raise DataError("DistillCollator: the tokenizer has neither a pad nor an eos token to pad with")
        return int(pad)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise DataError("DistillCollator: cannot collate an empty batch")
        ids = [[int(x) for x in row["input_ids"]] for row in rows]
        labels = [[int(x) for x in row["labels"]] if "labels" in row else list(seq) for row, seq in zip(rows, ids)]
        width = max(len(seq) for seq in ids)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad = self.pad_id()
        batch = {
            "input_ids": [seq + [pad] * (width - len(seq)) for seq in ids],
            "attention_mask": [[1] * len(seq) + [0] * (width - len(seq)) for seq in ids],
            "labels": [lab + [self.label_pad_id] * (width - len(lab)) for lab in labels],
        }
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
