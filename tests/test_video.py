"""Video rows: PyAV decoding, Qwen2-VL frame sampling and patch layout, placeholder expansion, bad clips."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgerazor.data.video import (
    VideoCollator,
    VideoDataset,
    VideoError,
    VideoSpec,
    build_video_rows,
    decode,
    encode_video_row,
    grid_thw,
    load_video,
    patchify,
    probe,
    process_frames,
    sample_indices,
    smart_resize,
    video_loader,
    video_tokens,
)
from edgerazor.errors import DataError, EdgeRazorError
from edgerazor.recipe import DataSection, DataSource

from tests.video_reference import ref_indices, ref_process, synthetic_frames
from tests.tokenizer_utils import train_tiny_tokenizer

av = pytest.importorskip("av")
FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "video_expected.json").read_text())
SMALL = dict(min_pixels=28 * 28, max_pixels=28 * 28 * 4)  # frames of at most 56x56: fast tests


def encode(path: Path, frames: np.ndarray, fps: int, codec: str) -> Path:
    """Write uint8 [T, H, W, 3] frames with PyAV: mp4 (h264/mpeg4), webm (vp8/vp9) or GIF."""
    pix = {"gif": "rgb8"}.get(codec, "yuv420p")
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def marked_frames(t: int, h: int = 48, w: int = 64) -> np.ndarray:
    """Frame i is flat grey level 6*i, so a decoded frame tells which index it was."""
    return np.stack([np.full((h, w, 3), 6 * i, dtype=np.uint8) for i in range(t)])


CODECS = [("mp4", "libx264"), ("mp4", "mpeg4"), ("webm", "libvpx"), ("webm", "libvpx-vp9"), ("gif", "gif")]


@pytest.mark.parametrize("ext,codec", CODECS)
def test_decode_counts_and_samples_every_container(tmp_path, ext, codec):
    if codec not in av.codecs_available:
        pytest.skip(f"{codec} not in this PyAV build")
    path = encode(tmp_path / f"clip.{ext}", marked_frames(20), fps=10, codec=codec)
    info = probe(path)
    assert (info.frames, info.height, info.width) == (20, 48, 64)
    assert info.fps == pytest.approx(10.0)
    spec = VideoSpec(**SMALL)
    idx = sample_indices(info.frames, info.fps, spec)  # 2 s at 2 fps -> 4 frames, spaced by 5
    assert idx.tolist() == [0, 5, 10, 15]
    frames = decode(path, idx)
    assert frames.shape == (4, 3, 48, 64) and frames.dtype == torch.uint8
    grey = frames.float().mean(dim=(1, 2, 3))
    assert torch.allclose(grey, torch.tensor([0.0, 30.0, 60.0, 90.0]), atol=4)  # the right frames came back
    out = load_video(path, spec)
    assert out["video_grid_thw"].tolist() == [[2, 4, 4]]  # 48x64 -> 56x56 (<= 4*784 pixels)
    assert out["pixel_values_videos"].shape == (2 * 4 * 4, 3 * 2 * 14 * 14)
    assert out["video_second_per_grid"].tolist() == [1.0]  # temporal patch 2 / 2 fps


@pytest.mark.parametrize("total,video_fps,fps", [(20, 10.0, 2.0), (300, 30.0, 2.0), (7, 25.0, 2.0), (3, 30.0, 2.0),
                                                 (17, 17.0, 14.0), (1000, 1.0, 2.0), (41, 3.0, 1.0)])
def test_sampling_matches_reference(total, video_fps, fps):
    idx = sample_indices(total, video_fps, VideoSpec(fps=fps))
    assert idx.tolist() == ref_indices(total, video_fps, fps)
    assert len(idx) % 2 == 0 and int(idx.max()) < total and len(idx) <= 768
    assert len(sample_indices(300, 30.0, VideoSpec())) == 20  # 10 s at 2 fps
    assert len(sample_indices(7, 25.0, VideoSpec())) == 4  # raised to min_frames, floored to even


def test_one_frame_clip_is_refused():
    with pytest.raises(ValueError, match="1 frame"):
        sample_indices(1, 10.0, VideoSpec())


def test_fixture_derived_from_transformers_algorithm():
    for case in FIXTURE["cases"]:
        t, h, w = case["frames"]
        spec = VideoSpec(fps=case["fps"], min_pixels=case["min_pixels"], max_pixels=case["max_pixels"])
        idx = sample_indices(t, case["video_fps"], spec)
        assert idx.tolist() == case["indices"], case["name"]
        frames = torch.from_numpy(synthetic_frames(t, h, w)).permute(0, 3, 1, 2)[idx]
        pixels, grid = process_frames(frames, spec)
        assert list(grid) == case["video_grid_thw"] and list(pixels.shape) == case["shape"], case["name"]
        assert spec.second_per_grid == case["video_second_per_grid"]
        assert pixels[0, :6].tolist() == pytest.approx(case["first"], abs=1e-6)
        assert pixels.sum(1)[:4].tolist() == pytest.approx(case["row_sums"], rel=1e-5, abs=1e-3)
        assert hashlib.sha256(pixels.contiguous().numpy().tobytes()).hexdigest() == case["sha256"], case["name"]
    spec = VideoSpec()
    for h, w, rh, rw in FIXTURE["omni_smart_resize"]:
        assert smart_resize(h, w, 28, spec.min_pixels, spec.max_pixels) == (rh, rw)


def test_layout_matches_independent_loops():
    frames = synthetic_frames(4, 61, 118)  # resized to 56x112: grid (2, 4, 8), two merge blocks high
    spec = VideoSpec(**SMALL | {"max_pixels": 28 * 28 * 8})
    pixels, grid = process_frames(torch.from_numpy(frames).permute(0, 3, 1, 2), spec)
    expected, ref_grid = ref_process(frames, spec.min_pixels, spec.max_pixels)
    assert tuple(grid) == ref_grid == (2, 4, 8)
    assert torch.equal(pixels, torch.from_numpy(expected))


def test_patchify_merge_order_on_labelled_pixels():
    """Each pixel holds its own coordinates, so the row/column of every value is checked exactly."""
    spec = VideoSpec(patch_size=2, merge_size=2, temporal_patch_size=2)
    T, C, H, W = 4, 3, 8, 4
    t, c, y, x = torch.meshgrid(*(torch.arange(n) for n in (T, C, H, W)), indexing="ij")
    code = (t * 1000 + c * 100 + y * 10 + x).float()
    patches, grid = patchify(code, spec)
    assert grid == (2, 4, 2) and patches.shape == (16, 3 * 2 * 2 * 2)
    # row 0..3: the first merged token = patches (py, px) in (0,0), (0,1), (1,0), (1,1) of block (0, 0)
    first_of = [int(r[0]) for r in patches[:8]]
    assert first_of == [0, 2, 20, 22, 40, 42, 60, 62]
    assert patches[8, 0] == 1000 * 2  # the second temporal step starts at frame 2
    row = patches[3].tolist()  # patch (1, 1): y 2..3, x 2..3; order channel, frame, y, x
    assert row[:8] == [22, 23, 32, 33, 1022, 1023, 1032, 1033]
    assert row[8] == 122  # channel 1 follows all of channel 0


def test_process_pads_odd_frame_count_with_last_frame():
    frames = torch.from_numpy(synthetic_frames(3, 56, 56)).permute(0, 3, 1, 2)
    pixels, grid = process_frames(frames, VideoSpec(**SMALL))
    assert grid == (2, 4, 4)
    per_t = pixels.view(2, 16, 3, 2, 14, 14)
    assert torch.equal(per_t[1, :, :, 0], per_t[1, :, :, 1])  # frame 3 repeats frame 2
    assert not torch.equal(per_t[0, :, :, 0], per_t[0, :, :, 1])


def test_against_transformers_processor():
    pytest.importorskip("torchvision")
    from transformers import Qwen2VLVideoProcessor

    frames = synthetic_frames(12, 90, 120)
    proc = Qwen2VLVideoProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    out = proc(videos=[frames], do_sample_frames=True, fps=2.0, return_tensors="pt", cap_pixels_per_frame=False,
               video_metadata=[{"total_num_frames": 12, "fps": 6.0, "duration": 2.0}])
    spec = VideoSpec(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    idx = sample_indices(12, 6.0, spec)
    pixels, grid = process_frames(torch.from_numpy(frames).permute(0, 3, 1, 2)[idx], spec)
    assert out["video_grid_thw"].tolist() == [list(grid)]
    assert torch.allclose(out["pixel_values_videos"], pixels, atol=1e-5)


# ------------------------------------------------------------------------------------------- rows

VIDEO_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'video' %}<|vision_bos|><|VIDEO|><|vision_eos|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_tiny_tokenizer(["a red square moves left", "a blue circle moves up", "what moves where?"] * 20)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|VIDEO|>",
                                                         "<|vision_bos|>", "<|vision_eos|>"]})
    tok.chat_template = VIDEO_TEMPLATE
    return tok


def _jsonl(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _clips(tmp_path: Path) -> None:
    (tmp_path / "clips").mkdir()
    encode(tmp_path / "clips" / "a.mp4", marked_frames(20), 10, "mpeg4")  # grid (2, 4, 4) -> 8 tokens
    encode(tmp_path / "clips" / "b.gif", marked_frames(40, 100, 100), 10, "gif")  # 8 frames of 56x56 -> 16


def test_placeholder_expands_to_grid_tokens(tokenizer):
    vid = tokenizer.convert_tokens_to_ids("<|VIDEO|>")
    for grid in [(2, 4, 4), (3, 2, 6), (1, 8, 8)]:
        n = video_tokens(grid, VideoSpec())
        ids, labels, cut = encode_video_row("what moves where?", "a red square moves left", n, tokenizer, 512)
        assert ids.count(vid) == n == grid[0] * grid[1] * grid[2] // 4 and not cut
        labelled = tokenizer.decode([t for t in labels if t != -100])
        assert labelled == "a red square moves left<|im_end|>"
        assert all(lab == -100 for lab, t in zip(labels, ids) if t == vid)


def test_rows_from_jsonl_and_lazy_dataset(tmp_path, tokenizer):
    _clips(tmp_path)
    path = _jsonl(tmp_path, [{"video": "clips/a.mp4", "prompt": "what moves where?", "response": "a red square moves left"},
                             {"video": "clips/b.gif", "prompt": "what moves?", "response": "a blue circle moves up"}])
    source = DataSource(path=str(path), **SMALL)
    rows, stats = build_video_rows(source, DataSection(max_length=256), tokenizer, 0)
    assert (stats.records, stats.kept, stats.bad_video) == (2, 2, 0)
    assert rows["video_grid_thw"] == [[2, 4, 4], [4, 4, 4]]
    vid = tokenizer.convert_tokens_to_ids("<|VIDEO|>")
    assert [r.count(vid) for r in rows["input_ids"]] == [8, 16]
    dataset = VideoDataset(rows, VideoSpec.from_source(source))
    batch = VideoCollator(tokenizer, VideoSpec.from_source(source))([dataset[0], dataset[1]])
    assert batch["pixel_values_videos"].shape == (32 + 64, 1176)
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4], [4, 4, 4]]
    assert batch["video_second_per_grid"].tolist() == [1.0, 1.0]
    assert (batch["input_ids"] == vid).sum().item() == 24  # tokens in step with the pixel rows / 4
    loader = video_loader(dataset, VideoCollator(tokenizer, VideoSpec.from_source(source)), batch_size=1,
                          num_workers=1, progress=False)
    grids = [b["video_grid_thw"].tolist() for b in loader]  # decoded in a worker process
    assert grids == [[[2, 4, 4]], [[4, 4, 4]]]


def test_truncation_drops_rows_whose_placeholders_do_not_fit(tmp_path, tokenizer):
    _clips(tmp_path)
    path = _jsonl(tmp_path, [{"video": "clips/a.mp4", "prompt": "what?", "response": "a red square moves left " * 5},
                             {"video": "clips/b.gif", "prompt": "what?", "response": "a blue circle moves up"}])
    source = DataSource(path=str(path), **SMALL)
    head = len(encode_video_row("what?", "x", 8, tokenizer, 10_000)[0]) - 3  # prompt part of row 0, roughly
    rows, stats = build_video_rows(source, DataSection(max_length=head + 4), tokenizer)
    # row 0 (8 video tokens) keeps a cut response; row 1 (16 video tokens) cannot fit its prompt: dropped
    assert (stats.kept, stats.truncated, stats.too_long) == (1, 1, 1)
    assert rows["row"] == [0] and len(rows["input_ids"][0]) == head + 4
    assert rows["input_ids"][0].count(tokenizer.convert_tokens_to_ids("<|VIDEO|>")) == 8
    assert encode_video_row("what?", "x", 16, tokenizer, 20) is None


def test_bad_videos_error_or_skip(tmp_path, tokenizer):
    _clips(tmp_path)
    (tmp_path / "clips" / "broken.mp4").write_bytes(b"\x00\x01 not a video" * 50)
    rows = [{"video": "clips/a.mp4", "prompt": "p", "response": "a red square"},
            {"video": "clips/missing.mp4", "prompt": "p", "response": "r"},
            {"video": "clips/broken.mp4", "prompt": "p", "response": "r"}]
    path = _jsonl(tmp_path, rows)
    with pytest.raises(VideoError, match=r"row 1: video .*missing\.mp4 does not exist") as err:
        build_video_rows(DataSource(path=str(path), **SMALL), DataSection(), tokenizer, 0)
    assert isinstance(err.value, EdgeRazorError) and "\n" not in str(err.value)
    assert "data.sources[0]" in str(err.value)
    path = _jsonl(tmp_path, [rows[0], rows[2]])
    with pytest.raises(VideoError, match=r"row 1: video .*broken\.mp4 cannot be read"):
        build_video_rows(DataSource(path=str(path), **SMALL), DataSection(), tokenizer)
    path = _jsonl(tmp_path, rows)
    kept, stats = build_video_rows(DataSource(path=str(path), on_bad_video="skip", **SMALL), DataSection(), tokenizer)
    assert (stats.kept, stats.bad_video) == (1, 2) and kept["row"] == [0]


def test_clip_broken_after_rows_were_built_names_file_and_row(tmp_path, tokenizer):
    _clips(tmp_path)
    path = _jsonl(tmp_path, [{"video": "clips/a.mp4", "prompt": "p", "response": "r"}])
    rows, _ = build_video_rows(DataSource(path=str(path), **SMALL), DataSection(), tokenizer)
    (tmp_path / "clips" / "a.mp4").write_bytes(b"garbage")
    with pytest.raises(VideoError, match=r"row 0: video .*a\.mp4"):
        VideoDataset(rows, VideoSpec(**SMALL))[0]


def test_template_without_video_placeholder_is_refused(tmp_path, tokenizer):
    _clips(tmp_path)
    path = _jsonl(tmp_path, [{"video": "clips/a.mp4", "prompt": "p", "response": "r"}])
    plain = train_tiny_tokenizer(["x"] * 5)
    with pytest.raises(DataError, match="row 0: the chat template renders 0 video placeholders"):
        build_video_rows(DataSource(path=str(path), **SMALL), DataSection(), plain)


def test_grid_thw_and_missing_av_message(monkeypatch):
    assert grid_thw(20, 480, 640, VideoSpec()) == (10, 34, 46)  # 476x644 frames
    import builtins

    real = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError("no av")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    with pytest.raises(VideoError, match=r"pip install 'edgerazor\[video\]'"):
        probe("x.mp4")
