"""Progress bars of the libraries underneath (transformers' "Loading weights" / "Writing model shards",
datasets' "Saving the dataset") switched off where EdgeRazor loads or saves, so the console shows one
bar per stage of ours."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def library_bars_off() -> Iterator[None]:
    """Inside: no transformers or datasets progress bar; the Hub's download bars stay as they were (a
    download is a stage of its own). On exit every switch returns to its previous state.
    """
    import datasets
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    transformers_on = hf_logging.is_progress_bar_enabled()
    datasets_on = datasets.is_progress_bar_enabled()
    hub_off = are_progress_bars_disabled()
    if transformers_on:
        hf_logging.disable_progress_bar()  # this switches the Hub's bars off too: put them back
        if not hub_off:
            enable_progress_bars()
    if datasets_on:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if datasets_on:
            datasets.enable_progress_bars()
        if transformers_on:
            hf_logging.enable_progress_bar()
            if hub_off:
                disable_progress_bars()
