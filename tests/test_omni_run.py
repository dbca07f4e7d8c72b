"""``edgerazor run --adapter qwen2_5_omni`` on jsonl video rows: data, collator, forward inputs, perplexity, reload.

A tiny random-weight thinker from a real ``Qwen2_5OmniThinkerConfig`` whose special-token ids are those of an
in-process tokenizer with the Omni chat template's video placeholder, and a few PyAV-encoded 56x56 clips.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

import edgerazor
from edgerazor.adapters import resolve_adapter
from edgerazor.cli import main
from edgerazor.data import DataError
from edgerazor.eval.perplexity import perplexity
from edgerazor.quant.kv import KVFakeQuant
from edgerazor.quant.modules import QuantConv3d
from edgerazor.recipe import recipe_from_dict
from tests.test_omni import AUDIO, TEXT, VISION
from tests.tokenizer_utils import train_tiny_tokenizer

av = pytest.importorskip("av")

#: What Qwen2.5-Omni's chat template renders for a user turn holding one video and a text.
VIDEO_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'video' %}<|vision_bos|><|VIDEO|><|vision_eos|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
OMNI_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|VIDEO|>", "<|vision_bos|>", "<|vision_eos|>", "<|IMAGE|>",
                 "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "white": (240, 240, 240)}
DIRECTIONS = {"left": (0, -6), "right": (0, 6), "up": (-6, 0), "down": (6, 0)}
SOURCE = dict(format="video", fps=2.0, min_pixels=28 * 28, max_pixels=28 * 28 * 4)  # 56x56 frames: 8 tokens a clip


def clip(path: Path, colour: str, direction: str, frames: int = 8, fps: int = 4) -> None:
    """A square of ``colour`` moving in ``direction`` over a grey 56x56 background (mpeg4)."""
    (dy, dx), rgb = DIRECTIONS[direction], COLOURS[colour]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 56, 56, "yuv420p"
        for t in range(frames):
            img = np.full((56, 56, 3), 90, dtype=np.uint8)
            y, x = 20 + dy * (t - frames // 2) // 2, 20 + dx * (t - frames // 2) // 2
            img[max(0, y):y + 16, max(0, x):x + 16] = rgb
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def write_rows(root: Path, rows: list[dict], name: str = "rows.jsonl") -> Path:
    path = root / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def video_thinker(texts: list[str], vocab_size: int):
    """(tokenizer, config): a BPE trained on ``texts`` with Qwen2.5-Omni's special tokens and video chat
    template, and a tiny thinker config whose token ids are that tokenizer's."""
    tok = train_tiny_tokenizer(texts, vocab_size=vocab_size)
    tok.add_special_tokens({"additional_special_tokens": OMNI_SPECIALS})
    tok.chat_template = VIDEO_TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in OMNI_SPECIALS}
    config = Qwen2_5OmniThinkerConfig(
        text_config=dict(TEXT, vocab_size=len(tok)), vision_config=VISION, audio_config=AUDIO,
        video_token_index=ids["<|VIDEO|>"], image_token_index=ids["<|IMAGE|>"], audio_token_index=ids["<|AUDIO|>"],
        vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"],
        audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    return tok, config


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    """(teacher dir, data dir): a saved tiny thinker with its tokenizer, and 8 clips with caption rows."""
    captions = [f"a {c} square moves {d}" for c in COLOURS for d in DIRECTIONS]
    tok, config = video_thinker(captions * 5 + ["what moves where?"] * 5, vocab_size=400)
    torch.manual_seed(0)
    teacher = tmp_path_factory.mktemp("omni_teacher")
    Qwen2_5OmniThinkerForConditionalGeneration(config).save_pretrained(teacher)
    tok.save_pretrained(teacher)
    data = tmp_path_factory.mktemp("omni_data")
    (data / "clips").mkdir()
    rows = []
    for i, (colour, direction) in enumerate(zip(["red", "blue", "green", "white"] * 2,
                                                ["left", "right", "up", "down", "up", "down", "left", "right"])):
        clip(data / "clips" / f"{i}.mp4", colour, direction)
        rows.append({"video": f"clips/{i}.mp4", "prompt": "what moves where?",
                     "response": f"a {colour} square moves {direction}"})
    write_rows(data, rows)
    return teacher, data


def video_recipe(data: Path, source: dict | None = None, **train) -> dict:
    return {
        "name": "omni-video",
        "quant": {"scheme": "4-8-8"},
        "data": {"sources": [{"path": str(data / "rows.jsonl"), **SOURCE, **(source or {})}], "max_length": 64,
                 "eval_fraction": 0.25},
        "train": {"max_steps": 2, "per_device_batch_size": 2, "learning_rate": 1e-3, "logging_steps": 1,
                  "save_steps": 100, "eval_steps": 1, "dataloader_num_workers": 1, **train},
        "distill": {"alpha_task": 0.5, "alpha_feature": 1.0, "alpha_logit": 1.0},
    }


def test_video_datasets_batches_and_forward_inputs(omni):
    """Rows come out lazily decoded with expanded placeholders and response-only labels, the adapter's
    collator and model_inputs carry the clips into the forward, and the pixels change the logits."""
    teacher_dir, data = omni
    adapter = resolve_adapter("qwen2_5_omni_thinker", "qwen2_5_omni")
    tok = adapter.load_tokenizer(str(teacher_dir))
    section = recipe_from_dict(video_recipe(data)).data
    built = adapter.build_datasets(section, tok)
    train, evaluation = built
    assert (len(train), len(evaluation)) == (6, 2)
    s = built.stats.sources[0]
    assert (s.format, s.records, s.kept, s.drawn, s.bad_video, s.no_response) == ("video", 8, 8, 8, 0, 0)
    row = train.rows[0]
    vid = tok.convert_tokens_to_ids("<|VIDEO|>")
    assert row["input_ids"].count(vid) == 8 and list(row["video_grid_thw"]) == [2, 4, 4]
    labelled = tok.decode([t for t in row["labels"] if t != -100])
    assert labelled.startswith("a ") and "moves" in labelled and "what" not in labelled
    batch = adapter.collator(tok)([train[0], train[1]])
    inputs = adapter.model_inputs(batch)
    assert sorted(inputs) == ["attention_mask", "input_ids", "pixel_values_videos", "video_grid_thw",
                              "video_second_per_grid"]
    assert inputs["pixel_values_videos"].shape == (2 * 32, 1176)
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 4]] * 2 and inputs["video_second_per_grid"].tolist() == [1.0] * 2
    model = adapter.load_teacher(str(teacher_dir))
    with torch.no_grad():
        logits = model(**inputs).logits
        blank = model(**dict(inputs, pixel_values_videos=torch.zeros_like(inputs["pixel_values_videos"]))).logits
    keep = batch["labels"] != -100
    assert not torch.allclose(logits[keep], blank[keep])  # the clips reach the response tokens
    scored = dict(collate=adapter.collator(tok), model_inputs=adapter.model_inputs, progress=False)
    with_video = perplexity(model, evaluation, 2, **scored)
    tokens_only = perplexity(model, evaluation, 2, collate=adapter.collator(tok), progress=False)
    assert math.isfinite(with_video) and with_video != tokens_only


def test_generic_data_path_refuses_video_sources(omni):
    teacher_dir, data = omni
    tok = resolve_adapter("qwen2_5_omni_thinker").load_tokenizer(str(teacher_dir))
    section = recipe_from_dict(video_recipe(data)).data
    with pytest.raises(DataError, match=r"data\.sources\[0\] \(.*rows\.jsonl'\) has format 'video'.*video-capable"):
        resolve_adapter("qwen3").build_datasets(section, tok)


def test_bad_clip_errors_naming_file_and_row_or_is_skipped_and_counted(omni, tmp_path, capsys):
    teacher_dir, data = omni
    rows = [json.loads(line) for line in (data / "rows.jsonl").read_text().splitlines()]
    rows[3]["video"] = "clips/missing.mp4"
    (tmp_path / "clips").symlink_to(data / "clips")
    write_rows(tmp_path, rows)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(video_recipe(tmp_path)))
    assert main(["run", "--adapter", "qwen2_5_omni", "--teacher", str(teacher_dir), "--recipe", str(recipe),
                 "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "row 3" in err and "missing.mp4" in err and "does not exist" in err
    adapter = resolve_adapter("qwen2_5_omni_thinker")
    section = recipe_from_dict(video_recipe(tmp_path, {"on_bad_video": "skip"})).data
    built = adapter.build_datasets(section, adapter.load_tokenizer(str(teacher_dir)))
    s = built.stats.sources[0]
    assert (s.records, s.bad_video, s.kept, s.dropped) == (8, 1, 7, 1)
    assert len(built.train) + len(built.eval) == 7 and built.stats.to_dict()["sources"][0]["bad_video"] == 1


def test_saved_student_reproduces_in_memory_logits_on_a_video_row(omni, tmp_path):
    from edgerazor.run import save_atomically

    teacher_dir, data = omni
    adapter = resolve_adapter("qwen2_5_omni_thinker")
    tok = adapter.load_tokenizer(str(teacher_dir))
    student = adapter.load_student(str(teacher_dir))
    edgerazor.quantize(student, recipe_from_dict(video_recipe(data)), adapter=adapter)
    student.eval()
    save_atomically(student, tok, tmp_path / "student")
    loaded, _ = edgerazor.load(tmp_path / "student")
    train, _ = adapter.build_datasets(recipe_from_dict(video_recipe(data)).data, tok)
    inputs = adapter.model_inputs(adapter.collator(tok)([train[0]]))
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, student(**inputs).logits)


@pytest.mark.slow
def test_run_distils_the_thinker_on_video_rows(omni, tmp_path, capsys):
    teacher_dir, data = omni
    recipe = tmp_path / "omni.yaml"
    recipe.write_text(yaml.safe_dump(video_recipe(data)))
    out = tmp_path / "out"
    assert main(["run", "--adapter", "qwen2_5_omni", "--teacher", str(teacher_dir), "--recipe", str(recipe),
                 "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["adapter"] == "qwen2_5_omni" and results["w_a_kv"] == "4-8-8" and results["train_steps"] == 2
    for key in ("teacher_ppl", "rtn_ppl", "student_ppl"):
        assert math.isfinite(results[key]) and results[key] > 1
    assert [p["step"] for p in results["eval_perplexity"]] == [1, 2]
    source = results["data"]["sources"][0]
    assert (source["format"], source["kept"], source["bad_video"]) == ("video", 8, 0)
    assert (results["data"]["train"], results["data"]["eval"]) == (6, 2)
    assert "bad video" in capsys.readouterr().err  # the data summary shows the video column

    adapter = resolve_adapter("qwen2_5_omni_thinker")
    loaded, tok = edgerazor.load(out / "student")
    assert isinstance(loaded.model.visual.patch_embed.proj, QuantConv3d)
    assert sum(isinstance(m, KVFakeQuant) for m in loaded.modules()) == TEXT["num_hidden_layers"]
    teacher = adapter.load_teacher(str(teacher_dir))
    # the clips' gradients reached the vision tower (text-only batches would leave it as the teacher's)
    assert not torch.equal(loaded.model.visual.blocks[0].attn.q.weight, teacher.model.visual.blocks[0].attn.q.weight)
    # the saved student reproduces the perplexity the in-memory student reported, on the same video rows
    _, evaluation = adapter.build_datasets(recipe_from_dict(video_recipe(data)).data, tok)
    scored = dict(collate=adapter.collator(tok), model_inputs=adapter.model_inputs, progress=False)
    assert perplexity(loaded, evaluation, 2, **scored) == results["student_ppl"]
