"""Where rows come from and how many of each: loading sources and drawing the seeded mixture.

Local files go through the ``datasets`` packaged builders (json / parquet / text) so that local and
hub sources come back as the same ``datasets.Dataset``; hub ids take the real
``datasets.load_dataset(path, name, split=...)`` path. Every failure is a ``DataError`` naming the
source, because a mixture of five datasets that fails with a bare ``KeyError`` is undebuggable.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import datasets
import numpy as np

from edgerazor.errors import DataError
from edgerazor.recipe import DataSection, DataSource

log = logging.getLogger(__name__)

#: File extension -> ``datasets`` packaged builder. ``.gz`` / ``.bz2`` / ... wrappers are also read.
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
#: Suffixes that mark a path as a (local) data file even when it does not exist, so that a typo in
#: a file name is "file not found" rather than an attempt to download a hub dataset of that name.
_FILE_LIKE = set(BUILDERS) | set(COMPRESSIONS) | {".csv", ".tsv", ".arrow", ".xml", ".zip", ".tar", ".md", ".yaml"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def file_kind(path: Path) -> str | None:
    """The builder for ``path`` ('json', 'parquet', 'text'), looking through a compression suffix."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def is_local(path: str) -> bool:
    """True when ``path`` names a local file or directory (existing or not), False for a hub id."""
    p = Path(path).expanduser()
    if p.exists() or path.startswith(("/", ".", "~")) or not _HUB_ID.match(path):
        return True
    return p.suffix.lower() in _FILE_LIKE


def _local_files(source: DataSource, where: str) -> tuple[str, list[str]]:
    """(builder, files) for a local file or directory source."""
    supported = ", ".join(BUILDERS)
    path = Path(source.path).expanduser()
    if not path.exists():
        raise DataError(f"{where}: path does not exist: {path}")
    if path.is_file():
        kind = file_kind(path)
        if kind is None:
            ext = "".join(path.suffixes) or "(none)"
            raise DataError(f"{where}: unknown file extension {ext!r}; supported: {supported}")
        return kind, [str(path)]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.parts))
    kinds = {p: file_kind(p) for p in files}
    found = sorted({k for k in kinds.values() if k})
    if not found:
        raise DataError(f"{where}: directory {path} holds no data files; supported extensions: {supported}")
    if len(found) > 1:
        raise DataError(f"{where}: directory {path} mixes file kinds ({', '.join(found)}); use one source per kind")
    ignored = [p.name for p, k in kinds.items() if k is None]
    if ignored:
        log.info("%s: ignoring %d non-data files (%s)", where, len(ignored), ", ".join(ignored[:5]))
    return found[0], [str(p) for p, k in kinds.items() if k]


def load_source(source: DataSource, index: int | None = None) -> datasets.Dataset:
    """The raw records of ``source`` (columns as stored); ``.txt`` files give one ``text`` row per file."""
    where = source.describe(index)
    saved = Path(source.path).expanduser()
    if (saved / "state.json").is_file() or (saved / "dataset_dict.json").is_file():
        return _load_saved(saved, source, where)
    if is_local(source.path):
        kind, files = _local_files(source, where)
        if kind == "text" and source.format != "text":
            raise DataError(f"{where}: .txt files hold plain text, so format must be 'text', not {source.format!r}")
        if not source.split.startswith("train"):
            raise DataError(f"{where}: local files form a single 'train' split; got split={source.split!r}")
        extra = {"sample_by": "document"} if kind == "text" else {}
        try:
            return datasets.load_dataset(kind, data_files=files, split=source.split, **extra)
        except Exception as exc:  # malformed JSON, unreadable parquet, ...
            raise DataError(f"{where}: cannot read {kind} data: {type(exc).__name__}: {exc}") from exc
    try:
        return datasets.load_dataset(source.path, source.name, split=source.split)
    except Exception as exc:  # not found, offline, gated, bad config or split
        raise DataError(f"{where}: cannot load hub dataset: {type(exc).__name__}: {exc}") from exc


def _load_saved(path: Path, source: DataSource, where: str) -> datasets.Dataset:
    """A directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (not re-parsed as JSON)."""
    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{where}: cannot read the saved dataset: {type(exc).__name__}: {exc}") from exc
    if isinstance(saved, datasets.DatasetDict):
        if source.split not in saved:
            raise DataError(f"{where}: split={source.split!r} is not in the saved dataset; it has: {', '.join(saved)}")
        saved = saved[source.split]
    return saved


def required_fields(source: DataSource) -> list[tuple[str, str]]:
    """[(recipe key, column name)] that ``source.format`` reads."""
    if source.format == "text":
        return [("text_field", source.text_field)]
    if source.format == "prompt_response":
        return [("prompt_field", source.prompt_field), ("response_field", source.response_field)]
    return [("messages_field", source.messages_field)]


def check_fields(raw: datasets.Dataset, source: DataSource, index: int | None = None) -> None:
    """Fail, listing the columns the rows actually have, when a field the format needs is absent."""
    columns = list(raw.column_names)
    for key, column in required_fields(source):
        if column not in columns:
            raise DataError(
                f"{source.describe(index)}: {key}={column!r} is not a column of this source "
                f"(format {source.format!r}); the rows have: {', '.join(columns) or '(no columns)'}"
            )


def cap_records(raw: datasets.Dataset, source: DataSource, seed: int) -> datasets.Dataset:
    """A seeded random ``max_samples`` subset of a record source (text sources are capped after packing)."""
    if source.format == "text" or source.max_samples is None or len(raw) <= source.max_samples:
        return raw
    return raw.shuffle(seed=seed).select(range(source.max_samples))


def quotas(sizes: list[int], ratios: list[float], num_samples: int | None) -> list[int]:
    """Rows to draw from each source so that counts follow the ratios as closely as integers allow.

    Without ``num_samples`` the total is the largest one no source has to repeat for; with it a
    source smaller than its share is repeated (upsampled). Rounding is largest-remainder, so the
    counts always sum to the total.
    """
    weights = np.asarray(ratios, dtype=float) / float(sum(ratios))
    if num_samples is None:
        num_samples = int(min(n / w for n, w in zip(sizes, weights)) + 1e-9)
    exact = np.round(weights * num_samples, 9)  # 300.0000001 must not round up past a source's size
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: num_samples - int(counts.sum())]:
        counts[i] += 1
    return [int(c) for c in counts]


def draw(n_rows: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` row indices out of ``n_rows``: whole shuffled passes, then a shuffled partial one."""
    full, rest = divmod(count, n_rows)
    parts = [rng.permutation(n_rows) for _ in range(full)] + [rng.permutation(n_rows)[:rest]]
    return np.concatenate(parts).astype(np.int64)


def mix(parts: list[datasets.Dataset], section: DataSection) -> datasets.Dataset:
    """Draw each source's quota (seeded per source) and shuffle the union (seeded)."""
    ratios = [s.ratio for s in section.sources]
    counts = quotas([len(p) for p in parts], ratios, section.num_samples)
    picked = []
    for i, (part, count) in enumerate(zip(parts, counts)):
        if count > len(part):
            log.info("%s: repeating %d rows to fill its share of %d", section.sources[i].describe(i), len(part), count)
        log.info("%s: %d of %d rows", section.sources[i].describe(i), count, len(part))
        picked.append(part.select(draw(len(part), count, np.random.default_rng([section.seed, i]))))
    mixed = datasets.concatenate_datasets(picked) if len(picked) > 1 else picked[0]
    return mixed.shuffle(seed=section.seed).flatten_indices()


def split_eval(
    dataset: datasets.Dataset, fraction: float, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train, eval) with ``fraction`` of the rows (at least one) held out; (dataset, None) for 0."""
    if fraction <= 0:
        return dataset, None
    if not 0 < fraction < 1:
        raise DataError(f"data.eval_fraction must be in [0, 1), got {fraction}")
    if len(dataset) < 2:
        raise DataError(f"data.eval_fraction={fraction} needs at least 2 rows, the dataset has {len(dataset)}")
    n_eval = min(max(1, round(len(dataset) * fraction)), len(dataset) - 1)
    split = dataset.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return split["train"], split["test"]
