"""Training data for distillation: a seeded mixture of sources, tokenized with response masks.

``build_dataset(section, tokenizer)`` is the whole pipeline - load every source (failing fast on a
bad one before any tokenization), format each into ``input_ids`` / ``labels`` rows, then draw the
mixture by ratio. ``build_datasets`` also splits off the eval rows and counts what happened to the
rows of every source (``DataStats``). ``DistillCollator`` pads those rows into batches.

Modules: ``sources`` (loading, mixture, eval split), ``formatting`` (tokenization, masks,
packing, collator), ``stats`` (row counts); the recipe's ``data`` section lives in
``edgerazor.recipe``. The heavy ones (``datasets``, ``torch``) are imported on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgerazor.data.stats import DataStats, SourceStats
from edgerazor.errors import DataError
from edgerazor.recipe import DataSection, DataSource

if TYPE_CHECKING:
    import datasets

    from edgerazor.data.formatting import IGNORE_INDEX, DistillCollator, strip_think
    from edgerazor.data.sources import split_eval

__all__ = [
    "IGNORE_INDEX",
    "BuiltData",
    "DataError",
    "DataSection",
    "DataSource",
    "DataStats",
    "DistillCollator",
    "SourceStats",
    "build_dataset",
    "build_datasets",
    "split_eval",
    "strip_think",
]

_LAZY = {
    "IGNORE_INDEX": "edgerazor.data.formatting",
    "DistillCollator": "edgerazor.data.formatting",
    "strip_think": "edgerazor.data.formatting",
    "split_eval": "edgerazor.data.sources",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class BuiltData:
    """``build_datasets``' result: unpacks as ``(train, eval)``, and carries the row counts."""

    train: datasets.Dataset
    eval: datasets.Dataset | None  # None when data.eval_fraction is 0
    stats: DataStats

    def __iter__(self):
        return iter((self.train, self.eval))


def _mixture(section: DataSection, tokenizer, think_tags: tuple[str, str] | None = None) -> tuple[datasets.Dataset, DataStats]:
    from edgerazor.data.formatting import THINK_TAGS, format_source, require_chat_template
    from edgerazor.data.sources import cap_records, check_fields, load_source, mix, quotas

    if not section.sources:
        raise DataError("data.sources is empty: list at least one source (a local file, directory or hub id)")
    for i, source in enumerate(section.sources):
        if source.format == "video":
            raise DataError(f"{source.describe(i)} has format 'video': video rows need a video-capable model adapter "
                            "(e.g. --adapter qwen2_5_omni); this one builds text rows only")
    for i, source in enumerate(section.sources):
        if source.format == "chat":
            require_chat_template(tokenizer, source.describe(i))
    raws, stats = [], DataStats(max_length=section.max_length)
    for i, source in enumerate(section.sources):  # every source is read and checked before any tokenizing
        raw = load_source(source, i)
        check_fields(raw, source, i)
        capped = cap_records(raw, source, section.seed)
        stats.sources.append(SourceStats(source.describe(i), source.format, len(raw), len(raw) - len(capped)))
        raws.append(capped)
    parts = [
        format_source(raw, src, section, tokenizer, i, stats.sources[i], think_tags or THINK_TAGS)
        for i, (raw, src) in enumerate(zip(raws, section.sources))
    ]
    counts = quotas([len(p) for p in parts], [s.ratio for s in section.sources], section.num_samples)
    for source_stats, count in zip(stats.sources, counts):
        source_stats.drawn = count
    return mix(parts, section), stats


def build_dataset(section: DataSection, tokenizer, think_tags: tuple[str, str] | None = None) -> datasets.Dataset:
    """The training mixture: a ``datasets.Dataset`` with ``input_ids`` and ``labels`` (-100: no loss)."""
    return _mixture(section, tokenizer, think_tags)[0]


def build_datasets(section: DataSection, tokenizer, think_tags: tuple[str, str] | None = None) -> BuiltData:
    """``(train, eval)``: the mixture split by ``section.eval_fraction`` (eval is None when it is 0),
    with ``.stats``: rows per source read, dropped (and why), truncated, kept, drawn; train and eval rows.
    ``think_tags``: the model family's reasoning-block delimiters for ``data.strip_think`` (Qwen3's by default)."""
    from edgerazor.data.sources import split_eval

    mixture, stats = _mixture(section, tokenizer, think_tags)
    train, evaluation = split_eval(mixture, section.eval_fraction, section.seed)
    stats.train, stats.eval = len(train), 0 if evaluation is None else len(evaluation)
    return BuiltData(train, evaluation, stats)
