"""Token-weighted perplexity over a dataset of ``input_ids`` / ``labels`` rows.

``perplexity = exp(sum of next-token NLL / number of predicted tokens)``: position ``t``'s logits
predict ``labels[t + 1]`` and positions whose label is -100 are skipped, exactly as transformers'
causal-LM loss does. Every token counts equally, whatever batch it falls in (a mean of per-batch
means would over-weight short batches).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from edgerazor.data.formatting import DistillCollator

IGNORE_INDEX = -100


def _batches(dataset, batch_size: int) -> Iterable[list[Mapping]]:
    n = len(dataset)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        if hasattr(dataset, "select"):  # datasets.Dataset: one slice, then rows
            chunk = dataset[start:stop]
            keys = list(chunk)
            yield [{k: chunk[k][i] for k in keys} for i in range(stop - start)]
        else:
            yield [dataset[i] for i in range(start, stop)]


def _token_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask") if batch.get(k) is not None}


def nll_sum(model: nn.Module, batch: Mapping[str, torch.Tensor], model_inputs=None) -> tuple[float, int]:
    """(sum of next-token NLL in float64, number of predicted tokens) for one collated batch.

    ``model_inputs(batch)`` picks the forward's keyword arguments (an adapter's ``model_inputs``: a video
    family adds pixels and grids); by default ``input_ids`` and ``attention_mask``."""
    device = next(model.parameters()).device
    labels = batch["labels"].to(device)
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
              for k, v in (model_inputs or _token_inputs)(batch).items()}
    logits = model(use_cache=False, **kwargs).logits
    total, count = 0.0, 0
    for row in range(logits.shape[0]):  # one row at a time: float32 logits of a big vocabulary are large
        target = labels[row, 1:]
        keep = target != IGNORE_INDEX
        if not bool(keep.any()):
            continue
        row_logits = logits[row, :-1][keep].float()
        total += float(F.cross_entropy(row_logits, target[keep], reduction="sum").double())
        count += int(keep.sum())
    return total, count


def perplexity(model: nn.Module, dataset, batch_size: int = 8, progress: bool = True, collate=None,
               model_inputs=None) -> float:
    """Token-weighted ``exp(mean NLL)`` of ``model`` over ``dataset`` rows (``input_ids``, ``labels``).

    Runs in eval mode under ``no_grad`` and restores the model's training mode afterwards.
    Rows may differ in length (they are right-padded and masked); a row without ``labels``
    is scored on all of its tokens. Raises if no row has a token to predict. ``collate`` (rows -> batch)
    and ``model_inputs`` (batch -> forward kwargs) are the adapter's for rows beyond tokens (video clips);
    by default rows are right-padded with the model's pad id and the forward sees tokens and mask.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if collate is None:
        config = getattr(model, "config", None)
        pad_id = getattr(config, "pad_token_id", None) if config is not None else None
        pad_id = pad_id if isinstance(pad_id, int) else 0
        collate = DistillCollator(None, pad_token_id=pad_id)  # right padding, labels -100, attention mask
    was_training = model.training
    total, count = 0.0, 0
    batches = _batches(dataset, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=math.ceil(len(dataset) / batch_size), desc="perplexity", unit="batch",
                       leave=False)
    try:
        model.eval()
        with torch.no_grad():
            for rows in batches:
                s, c = nll_sum(model, collate(rows), model_inputs)
                total += s
                count += c
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("perplexity: the dataset has no token to predict (every label is -100 or rows are too short)")
    return math.exp(total / count)
