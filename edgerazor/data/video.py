"""Video rows for Qwen2.5-Omni-style models: PyAV decoding, fps sampling, and the processor's patch layout.

The vision tower only sees what the processor would have given it, so this module reproduces
transformers' ``Qwen2VLVideoProcessor`` (as used by ``Qwen2_5OmniProcessor``) step by step without
needing torchvision: frame indices from ``sample_frames`` with ``fps``, the ``smart_resize`` frame
size (multiples of patch*merge = 28 within ``min_pixels``/``max_pixels``), a bicubic antialiased
resize of the uint8 frames (what torchvision does on CPU), CLIP mean/std normalization and the
flattened ``[grid_t*grid_h*grid_w, C*2*14*14]`` patches in the 2x2 merge order; and the Omni
processor's ``video_second_per_grid = temporal_patch_size / fps``.

Rows are jsonl ``{"video": path, "prompt": ..., "response": ...}`` (paths relative to the file). At
build time each clip is only probed (demuxed, not decoded) to size its placeholder run; the pixels are
decoded lazily, one item at a time, by ``VideoDataset`` inside the dataloader workers. ``av`` is
imported on first use, so ``edgerazor.data`` imports without it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgerazor.errors import DataError
from edgerazor.recipe import DataSection, DataSource

#: The processor's normalization (OpenAI CLIP), per RGB channel.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IGNORE_INDEX = -100
#: Qwen2.5-Omni's video placeholder when the tokenizer does not name one (``tokenizer.video_token``).
VIDEO_TOKEN = "<|VIDEO|>"


class VideoError(DataError):
    """A video cannot be read or used; the message names the file and the row."""


def require_av():
    """``av`` (PyAV), or a one-line error saying how to install it."""
    try:
        import av
    except ImportError:
        raise VideoError("video data needs PyAV: pip install 'edgerazor[video]'") from None
    return av


@dataclass(frozen=True)
class VideoSpec:
    """How clips become pixels: the recipe's sampling rate and pixel bounds plus the vision tower's patching.

    Defaults are Qwen2.5-Omni's processor: 2 fps, 128..768 merged tokens' worth of pixels per frame.
    """

    fps: float = 2.0
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    min_frames: int = 4
    max_frames: int = 768
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2

    @classmethod
    def from_source(cls, source: DataSource) -> VideoSpec:
        return cls(fps=source.fps, min_pixels=source.min_pixels, max_pixels=source.max_pixels)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def second_per_grid(self) -> float:
        """Seconds one temporal grid step spans, as the Omni processor states it (from the requested fps)."""
        return self.temporal_patch_size / self.fps


@dataclass(frozen=True)
class VideoInfo:
    """What probing a clip gives without decoding it: frame count, frame rate and frame size."""

    frames: int
    fps: float
    height: int
    width: int


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) rounded to multiples of ``factor`` with the pixel count inside [min_pixels, max_pixels],
    aspect ratio kept as closely as that allows (Qwen2-VL's rule, so token counts match the processor)."""
    if max(height, width) > 200 * min(height, width):
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} is above 200")
    h = factor * round(height / factor)
    w = factor * round(width / factor)
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, factor * math.floor(height / scale / factor))
        w = max(factor, factor * math.floor(width / scale / factor))
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = factor * math.ceil(height * scale / factor)
        w = factor * math.ceil(width * scale / factor)
    return h, w


def sample_indices(total: int, video_fps: float, spec: VideoSpec) -> torch.Tensor:
    """Frame indices the processor samples at ``spec.fps``: a count clamped to [min_frames, max_frames] and the
    clip's length, floored to a multiple of the temporal patch, spread evenly from frame 0.

    The spacing is a float32 ``arange`` truncated to ints, as in transformers. For some lengths (17 frames,
    14 wanted) that arange's rounding adds one index equal to the frame count, out of range - the processor
    fails on such clips; here it is dropped, so the count stays the multiple of the temporal patch asked for.
    """
    tp = spec.temporal_patch_size
    if total < tp:
        raise ValueError(f"has {total} frame(s); at least {tp} are needed")
    cap = (min(spec.max_frames, total) // tp) * tp
    wanted = total / video_fps * spec.fps
    count = int(min(max(wanted, spec.min_frames), cap, total) // tp) * tp
    return torch.arange(0, total, total / count, dtype=torch.float32).to(torch.int32).to(torch.int64)[:count]


def grid_thw(n_frames: int, height: int, width: int, spec: VideoSpec) -> tuple[int, int, int]:
    """(grid_t, grid_h, grid_w) for ``n_frames`` sampled frames of ``height`` x ``width`` before resizing."""
    h, w = smart_resize(height, width, spec.factor, spec.min_pixels, spec.max_pixels)
    t = -(-n_frames // spec.temporal_patch_size)
    return t, h // spec.patch_size, w // spec.patch_size


def video_tokens(grid: Sequence[int], spec: VideoSpec) -> int:
    """Placeholder tokens the LLM sees for one clip: its patches after the merge_size x merge_size merge."""
    t, h, w = grid
    return t * h * w // spec.merge_size**2


# ------------------------------------------------------------------------------------------ decoding


def probe(path: str | Path) -> VideoInfo:
    """Frame count (packets demuxed, nothing decoded), rate and size of a clip's first video stream."""
    av = require_av()
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("has no video stream")
        stream = container.streams.video[0]
        frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
        rate = stream.average_rate or stream.guessed_rate
        if rate:
            fps = float(rate)
        elif stream.duration and stream.time_base:
            fps = frames / float(stream.duration * stream.time_base)
        else:
            raise ValueError("has no frame rate")
        height, width = stream.codec_context.height, stream.codec_context.width
    if frames == 0 or not height or not width:
        raise ValueError("has no frames")
    return VideoInfo(frames, fps, height, width)


def decode(path: str | Path, indices: Sequence[int]) -> torch.Tensor:
    """The frames at ``indices`` (repeats allowed) as uint8 ``[T, 3, H, W]`` RGB; only those frames are kept."""
    av = require_av()
    wanted = set(int(i) for i in indices)
    kept: dict[int, torch.Tensor] = {}
    last = max(wanted)
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                kept[i] = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
            if i >= last:
                break
    missing = sorted(i for i in wanted if i not in kept)
    if missing:
        raise ValueError(f"decoded only {len(kept)} of the frames needed (frame {missing[0]} is missing)")
    return torch.stack([kept[int(i)] for i in indices])


def frame_stack(frames: torch.Tensor, spec: VideoSpec) -> torch.Tensor:
    """Pad a ``[T, C, H, W]`` stack to a multiple of the temporal patch by repeating its last frame."""
    pad = -frames.shape[0] % spec.temporal_patch_size
    if pad:
        frames = torch.cat([frames, frames[-1:].expand(pad, *frames.shape[1:])])
    return frames


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic antialiased resize of uint8 frames, done on uint8 as torchvision does on CPU (same rounding)."""
    if tuple(frames.shape[-2:]) == (height, width):
        return frames
    return torch.nn.functional.interpolate(
        frames, size=(height, width), mode="bicubic", align_corners=False, antialias=True
    )


def normalize(frames: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 ``(x - 255*mean) / (255*std)``: the processor's fused rescale-and-normalize."""
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32) * 255.0
    std = torch.tensor(CLIP_STD, dtype=torch.float32) * 255.0
    return (frames.to(torch.float32) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)


def patchify(frames: torch.Tensor, spec: VideoSpec) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``[T, C, H, W]`` (T a multiple of the temporal patch, H and W of patch*merge) -> flattened patches.

    Rows run over (t, h-block, w-block, h-in-block, w-in-block), so each merge_size^2 consecutive rows are
    one merged token; each row is (channel, frame-in-patch, y, x) - the vision tower's Conv3d input order.
    """
    T, C, H, W = frames.shape
    p, m, tp = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    gt, gh, gw = T // tp, H // p, W // p
    x = frames.reshape(gt, tp, C, gh // m, m, p, gw // m, m, p)
    # axes: 0 t, 1 tp, 2 C, 3 hb, 4 hm, 5 py, 6 wb, 7 wm, 8 px
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, C * tp * p * p), (gt, gh, gw)


def process_frames(frames: torch.Tensor, spec: VideoSpec) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Sampled uint8 frames ``[T, 3, H, W]`` -> (pixel_values_videos, grid_thw), as the processor computes them."""
    h, w = smart_resize(frames.shape[-2], frames.shape[-1], spec.factor, spec.min_pixels, spec.max_pixels)
    return patchify(normalize(frame_stack(resize_frames(frames, h, w), spec)), spec)


def load_video(path: str | Path, spec: VideoSpec = VideoSpec()) -> dict[str, torch.Tensor]:
    """One clip as the model's inputs: ``pixel_values_videos``, ``video_grid_thw`` [1, 3], ``video_second_per_grid`` [1]."""
    info = probe(path)
    frames = decode(path, sample_indices(info.frames, info.fps, spec))
    pixels, grid = process_frames(frames, spec)
    return {
        "pixel_values_videos": pixels,
        "video_grid_thw": torch.tensor([grid], dtype=torch.long),
        "video_second_per_grid": torch.tensor([spec.second_per_grid], dtype=torch.float32),
    }


# ---------------------------------------------------------------------------------------------- rows


@dataclass
class VideoStats:
    """What happened to a video source's records: kept, truncated, and dropped (and why)."""

    source: str
    records: int = 0
    bad_video: int = 0  # skipped: missing or unreadable clip (on_bad_video: skip)
    empty: int = 0  # dropped: empty response
    too_long: int = 0  # dropped: prompt and all video tokens leave no response token within max_length
    truncated: int = 0  # kept, response cut at max_length
    kept: int = 0


def video_token(tokenizer) -> str:
    return getattr(tokenizer, "video_token", None) or VIDEO_TOKEN


def _messages(prompt: str, response: str | None) -> list[dict]:
    user = {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}
    if response is None:
        return [user]
    return [user, {"role": "assistant", "content": [{"type": "text", "text": response}]}]


def encode_video_row(
    prompt: str, response: str, n_video_tokens: int, tokenizer, max_length: int
) -> tuple[list[int], list[int], bool] | None:
    """(input_ids, labels, truncated) for one clip's conversation, or None when no response token fits.

    The chat template's single video placeholder becomes exactly ``n_video_tokens`` of them; labels cover the
    response and the end-of-turn token after it. Only the response is ever cut, so the placeholder run always
    matches the pixels.
    """
    from edgerazor.data.formatting import end_of_turn_tokens

    token = video_token(tokenizer)
    head = tokenizer.apply_chat_template(_messages(prompt, None), tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(_messages(prompt, response), tokenize=False)
    if head.count(token) != 1:
        raise DataError(f"the chat template renders {head.count(token)} video placeholders {token!r}, not 1")
    if not full.startswith(head):
        raise DataError("the chat template renders the prompt differently once a response follows: cannot mask it")
    tail = full[len(head):]
    start = tail.find(response)
    if start < 0:
        raise DataError("the chat template does not render the response verbatim: cannot mask it")
    end = start + len(response)
    end += next((len(t) for t in end_of_turn_tokens(tokenizer) if tail.startswith(t, end)), 0)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    head_ids = ids(head.replace(token, token * n_video_tokens))
    token_id = tokenizer.convert_tokens_to_ids(token)
    if head_ids.count(token_id) != n_video_tokens:
        raise DataError(f"the tokenizer does not keep {token!r} as one token; add it as a special token")
    lead, body, rest = ids(tail[:start]), ids(tail[start:end]), ids(tail[end:])
    input_ids = head_ids + lead + body + rest
    labels = [IGNORE_INDEX] * (len(head_ids) + len(lead)) + body + [IGNORE_INDEX] * len(rest)
    if len(head_ids) + len(lead) >= max_length:
        return None
    return input_ids[:max_length], labels[:max_length], len(input_ids) > max_length


def _base_dir(source: DataSource) -> Path:
    path = Path(source.path).expanduser()
    return path if path.is_dir() else path.parent


def build_video_rows(source: DataSource, section: DataSection, tokenizer, index: int | None = None):
    """(rows, stats): one ``datasets.Dataset`` row per usable record - ``input_ids``, ``labels``, the clip's
    absolute ``video`` path, its record number ``row`` and ``video_grid_thw`` - with the clips only probed.

    A missing or unreadable clip is a ``VideoError`` naming file and row, or (``on_bad_video: skip``) counted in
    ``stats.bad_video``; it is never replaced by another sample.
    """
    import datasets
    from tqdm.auto import tqdm

    from edgerazor.data.sources import load_source

    where = source.describe(index)
    spec = VideoSpec.from_source(source)
    raw = load_source(source, index)
    for key in ("video_field", "prompt_field", "response_field"):
        if getattr(source, key) not in raw.column_names:
            raise DataError(f"{where}: {key}={getattr(source, key)!r} is not a column; the rows have: "
                            f"{', '.join(raw.column_names)}")
    base, stats = _base_dir(source), VideoStats(where, records=len(raw))
    out: dict[str, list] = {"input_ids": [], "labels": [], "video": [], "row": [], "video_grid_thw": []}
    for row, record in enumerate(tqdm(raw, desc=f"probing videos of {source.path}", unit="clip")):
        path = base / str(record[source.video_field])
        try:
            if not path.is_file():
                raise ValueError("does not exist")
            info = probe(path)
            grid = grid_thw(len(sample_indices(info.frames, info.fps, spec)), info.height, info.width, spec)
        except Exception as exc:  # av's errors, and ours above
            if source.on_bad_video == "skip":
                stats.bad_video += 1
                continue
            raise VideoError(f"{where}: row {row}: video {path} {_reason(exc)}") from None
        response = record[source.response_field] or ""
        if not response.strip():
            stats.empty += 1
            continue
        try:
            encoded = encode_video_row(record[source.prompt_field] or "", response, video_tokens(grid, spec),
                                       tokenizer, section.max_length)
        except DataError as exc:
            raise DataError(f"{where}: row {row}: {exc}") from None
        if encoded is None:
            stats.too_long += 1
            continue
        ids, labels, cut = encoded
        stats.truncated += cut
        for key, value in zip(out, (ids, labels, str(path.resolve()), row, list(grid))):
            out[key].append(value)
    stats.kept = len(out["row"])
    if not stats.kept:
        raise DataError(f"{where}: no usable rows of {stats.records}: {stats.bad_video} bad videos, {stats.empty} "
                        f"empty responses, {stats.too_long} with no response token within max_length={section.max_length}")
    return datasets.Dataset.from_dict(out), stats


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if text.startswith(("does not", "has ", "decoded", "aspect")) else f"cannot be read: {text}"


def build_video_datasets(section: DataSection, tokenizer):
    """``BuiltData`` (train, eval, stats) for a data section of video sources: each source's rows from
    ``build_video_rows``, capped by ``max_samples``, mixed by ratio, split by ``eval_fraction``, and wrapped in
    ``VideoDataset`` so clips are decoded per item in the dataloader workers, never here.

    Every source must be ``format: video`` with the same sampling (``fps``, ``min_pixels``, ``max_pixels``): one
    batch's clips are decoded with one spec.
    """
    from edgerazor.data import BuiltData, DataStats, SourceStats
    from edgerazor.data.sources import mix, quotas, split_eval

    if not section.sources:
        raise DataError("data.sources is empty: list at least one source (a jsonl file of video rows)")
    for i, source in enumerate(section.sources):
        if source.format != "video":
            raise DataError(f"{source.describe(i)} has format {source.format!r}; this adapter's video data needs "
                            "every source to be format: video (text and video rows are not mixed)")
    spec = VideoSpec.from_source(section.sources[0])
    for i, source in enumerate(section.sources[1:], 1):
        if VideoSpec.from_source(source) != spec:
            raise DataError(f"{source.describe(i)}: fps, min_pixels and max_pixels must match data.sources[0]'s "
                            "(one batch is decoded with one sampling spec)")
    parts, stats = [], DataStats(max_length=section.max_length)
    for i, source in enumerate(section.sources):
        rows, counts = build_video_rows(source, section, tokenizer, i)
        capped = 0
        if source.max_samples is not None and len(rows) > source.max_samples:
            capped = len(rows) - source.max_samples
            rows = rows.shuffle(seed=section.seed).select(range(source.max_samples)).flatten_indices()
        stats.sources.append(SourceStats(counts.source, "video", counts.records, capped, empty=counts.empty,
                                         no_response=counts.too_long, bad_video=counts.bad_video,
                                         truncated=counts.truncated, kept=len(rows)))
        parts.append(rows.add_column("source", [counts.source] * len(rows)))
    for source_stats, count in zip(stats.sources, quotas([len(p) for p in parts],
                                                         [s.ratio for s in section.sources], section.num_samples)):
        source_stats.drawn = count
    train, evaluation = split_eval(mix(parts, section), section.eval_fraction, section.seed)
    stats.train, stats.eval = len(train), 0 if evaluation is None else len(evaluation)
    wrap = lambda rows: None if rows is None else VideoDataset(rows, spec)  # noqa: E731
    return BuiltData(wrap(train), wrap(evaluation), stats)


class VideoDataset(torch.utils.data.Dataset):
    """Rows from ``build_video_rows`` whose clips are decoded on access, so each dataloader worker decodes its
    own items and no clip outlives its batch."""

    def __init__(self, rows, spec: VideoSpec = VideoSpec(), where: str = "video data"):
        self.rows, self.spec, self.where = rows, spec, where

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[int(i)]
        where = row.get("source") or self.where  # rows mixed from several sources name their own
        try:
            info = probe(row["video"])
            frames = decode(row["video"], sample_indices(info.frames, info.fps, self.spec))
            pixels, grid = process_frames(frames, self.spec)
        except Exception as exc:
            raise VideoError(f"{where}: row {row['row']}: video {row['video']} {_reason(exc)}") from None
        if list(grid) != list(row["video_grid_thw"]):
            raise VideoError(f"{where}: row {row['row']}: video {row['video']} changed since the rows were "
                             f"built (grid {list(grid)}, rows expect {list(row['video_grid_thw'])})")
        return {"input_ids": row["input_ids"], "labels": row["labels"], "pixel_values_videos": pixels,
                "video_grid_thw": grid, "video_second_per_grid": self.spec.second_per_grid}


@dataclass
class VideoCollator:
    """Pads token rows like ``DistillCollator`` and concatenates the clips' patches in batch order.

    Video inputs are per clip, as the model takes them: rows without a clip (text rows) add only tokens, and a
    batch without any clip is a plain text batch. A clip's seconds per grid come with its item when the dataset
    gives them (``VideoDataset`` does), else from ``spec``.
    """

    tokenizer: Any
    spec: VideoSpec = VideoSpec()

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from edgerazor.data.formatting import DistillCollator

        batch = DistillCollator(self.tokenizer)([{"input_ids": x["input_ids"], "labels": x["labels"]} for x in items])
        clips = [x for x in items if x.get("pixel_values_videos") is not None]
        if not clips:
            return batch
        batch["pixel_values_videos"] = torch.cat([x["pixel_values_videos"] for x in clips])
        batch["video_grid_thw"] = torch.tensor([list(x["video_grid_thw"]) for x in clips], dtype=torch.long)
        batch["video_second_per_grid"] = torch.tensor(
            [float(x.get("video_second_per_grid", self.spec.second_per_grid)) for x in clips], dtype=torch.float32)
        return batch


def video_loader(dataset: VideoDataset, collator: VideoCollator, batch_size: int = 1, num_workers: int = 2,
                 shuffle: bool = False, progress: bool = True):
    """A ``DataLoader`` decoding in ``num_workers`` processes, wrapped in a progress bar over its batches."""
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                                         collate_fn=collator)
    return tqdm(loader, desc="decoding videos", unit="batch", disable=not progress)
