"""The ``data`` recipe section: which sources feed the mixture and how rows are tokenized.

Kept apart from the loading code so that ``edgerazor.recipe`` can import it without pulling in
``datasets`` or ``transformers``. Like every recipe section the models are frozen and forbid
unknown keys, so a typo in a source is an error rather than a silently ignored setting.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from edgerazor.errors import EdgeRazorError
from edgerazor.sections import Section


class DataError(EdgeRazorError):
    """A data source cannot be turned into training rows; the message names the source and field."""


class DataSource(Section):
    """One dataset in the mixture: a local file or directory, or a Hugging Face hub dataset id."""

    path: str = Field(description="a .json/.jsonl/.parquet/.txt file or a directory of them, or a hub dataset id")
    name: str | None = Field(None, description="hub dataset config name")
    split: str = Field("train", description="hub split (slicing allowed, e.g. 'train[:10%]'); local files are 'train'")
    format: Literal["text", "prompt_response", "chat"] = "text"
    ratio: float = Field(1.0, gt=0.0, description="relative weight of this source in the mixture")
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    prompt_separator: str = Field(
        "", description="prompt_response: text placed between prompt and response (part of the prompt, no loss)"
    )
    max_samples: int | None = Field(
        None, gt=0, description="cap on rows taken from this source: records, or packed blocks for 'text'"
    )

    def describe(self, index: int | None = None) -> str:
        """``data.sources[1] ('gsm8k/train.jsonl')``: how error messages name this source."""
        where = f"data.sources[{index}]" if index is not None else "data source"
        config = f", name={self.name!r}" if self.name else ""
        return f"{where} ({self.path!r}{config})"


class DataSection(Section):
    """Training data: a seeded mixture of sources, tokenized with response-only loss masks."""

    sources: list[DataSource] = Field(default_factory=list)
    max_length: int = Field(1024, gt=1, description="tokens per row: truncation, and the block size for text")
    strip_think: bool = Field(False, description="drop <think>...</think> blocks from responses / assistant turns")
    response_only: bool = Field(True, description="loss only on responses / assistant turns (text is all response)")
    num_samples: int | None = Field(
        None, gt=0, description="rows in the mixture; default: as many as the ratios allow without repeating"
    )
    seed: int = 0
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of rows held out for evaluation")
