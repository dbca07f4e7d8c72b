"""Training data for distillation: a seeded mixture of sources, tokenized with response masks.

``build_dataset(section, tokenizer)`` is the whole pipeline - load every source (failing fast on a
bad one before any tokenization), format each into ``input_ids`` / ``labels`` rows, then draw the
mixture by ratio. ``DistillCollator`` pads those rows into batches.

Modules: ``sources`` (loading, mixture, eval split), ``formatting`` (tokenization, masks,
packing, collator); the recipe's ``data`` section lives in ``edgerazor.recipe``. The heavy ones
(``datasets``, ``torch``) are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from edgerazor.errors import DataError
from edgerazor.recipe import DataSection, DataSource

if TYPE_CHECKING:
    import datasets

    from edgerazor.data.formatting import IGNORE_INDEX, DistillCollator, strip_think
    from edgerazor.data.sources import split_eval

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "DataSection",
    "DataSource",
    "DistillCollator",
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


def build_dataset(section: DataSection, tokenizer) -> datasets.Dataset:
    """The training mixture: a ``datasets.Dataset`` with ``input_ids`` and ``labels`` (-100: no loss)."""
    from edgerazor.data.formatting import format_source, require_chat_template
    from edgerazor.data.sources import cap_records, check_fields, load_source, mix

    if not section.sources:
        raise DataError("data.sources is empty: list at least one source (a local file, directory or hub id)")
    for i, source in enumerate(section.sources):
        if source.format == "chat":
            require_chat_template(tokenizer, source.describe(i))
    raws = []
    for i, source in enumerate(section.sources):  # every source is read and checked before any tokenizing
        raw = load_source(source, i)
        check_fields(raw, source, i)
        raws.append(cap_records(raw, source, section.seed))
    parts = [format_source(raw, src, section, tokenizer, i) for i, (raw, src) in enumerate(zip(raws, section.sources))]
    return mix(parts, section)


def build_datasets(section: DataSection, tokenizer) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """``(train, eval)``: the mixture split by ``section.eval_fraction`` (eval is None when it is 0)."""
    from edgerazor.data.sources import split_eval

    return split_eval(build_dataset(section, tokenizer), section.eval_fraction, section.seed)
