"""What happened to the rows: counts per source from reading to the mixture, and the eval split.

A run that silently drops half of a dataset (empty responses, prompts longer than ``max_length``)
trains on something other than what its recipe names; these counts make that visible in the
``edgerazor run`` summary and in ``results.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SourceStats:
    """One source's rows. ``text`` sources count documents in and packed blocks out."""

    source: str  # how the recipe names it: data.sources[0] ('train.jsonl')
    format: str
    records: int = 0  # records (documents, for text) read from the source
    capped: int = 0  # records left out by max_samples (text sources cap blocks instead: 0)
    empty: int = 0  # dropped: no text / an empty response (after strip_think) / no assistant turn
    no_response: int = 0  # dropped: no response token within max_length (video: prompt and placeholders fill it)
    bad_video: int = 0  # dropped: missing or unreadable clip (video sources with on_bad_video: skip)
    truncated: int = 0  # kept, but cut at max_length
    kept: int = 0  # training rows made (packed blocks, for text)
    drawn: int = 0  # rows the mixture took (repeats included)

    @property
    def dropped(self) -> int:
        return self.empty + self.no_response + self.bad_video


@dataclass
class DataStats:
    """The whole data section: every source, then the mixture split into train and eval."""

    sources: list[SourceStats] = field(default_factory=list)
    max_length: int = 0
    train: int = 0
    eval: int = 0

    @property
    def mixture(self) -> int:
        return self.train + self.eval

    def to_dict(self) -> dict[str, Any]:
        return {
            "sources": [dataclasses.asdict(s) | {"dropped": s.dropped} for s in self.sources],
            "max_length": self.max_length,
            "mixture": self.mixture,
            "train": self.train,
            "eval": self.eval,
        }
