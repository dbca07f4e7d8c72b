"""The offline video demo: synthetic clips, a tiny Qwen2.5-Omni thinker that captions them, and caption accuracy.

``prepare_video_demo(settings)`` renders short clips with PyAV - a red, green, blue or yellow square or
ring moving left, right, up or down on a dark grey, captioned ``"a red square moving left"`` (32 captions) -
in a training split and a held-out split whose clips are new renderings of the same 32 captions (other
start positions and speeds), written as mp4 files with jsonl rows ``{"video", "prompt", "response"}``.
It trains a byte-level BPE on the captions and prompt (with Qwen2.5-Omni's vision and video special
tokens and a chat template that renders one ``<|VIDEO|>`` placeholder, which ``edgerazor.data.video``
expands to the clip's grid) and a real ``Qwen2_5OmniThinkerForConditionalGeneration`` teacher trained
to caption the clips. Like ``edgerazor.demo``, everything is cached under ``<cache>/<hash of the
settings>``, built under a temporary name and renamed into place.

``caption_accuracy`` scores a model on held-out rows by ranking all 32 captions by the model's
log-likelihood of each given the clip (exact argmax over the closed caption set: no decoding choices,
and one batched forward per clip), reporting colour, shape, direction and exact-caption accuracy.

``edgerazor run --recipe configs/demo-video.yaml`` (a recipe with a ``demo_video:`` section and no teacher)
builds or reuses these assets, distils through the ``qwen2_5_omni`` adapter's video rows (``demo_datasets``)
and reports caption accuracy for teacher, round-to-nearest and student beside perplexity.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from edgerazor.recipe import DemoVideoSection

#: Bump when the cache layout or the way assets are built changes: old caches are then ignored.
CACHE_FORMAT = 3

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("square", "ring")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUND = (32, 32, 32)
PROMPT = "Describe the video."
CAPTIONS = tuple(f"a {c} {s} moving {d}" for c in COLOURS for s in SHAPES for d in DIRECTIONS)

EOS, PAD = "<|endoftext|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
#: Qwen2.5-Omni's multimodal markers: ``get_rope_index`` finds a clip by the token after ``<|vision_bos|>``.
VISION_BOS, VISION_EOS, VIDEO, IMAGE = "<|vision_bos|>", "<|vision_eos|>", "<|VIDEO|>", "<|IMAGE|>"
AUDIO, AUDIO_BOS, AUDIO_EOS = "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"
SPECIAL_TOKENS = (EOS, PAD, IM_START, IM_END, VISION_BOS, VISION_EOS, VIDEO, IMAGE, AUDIO, AUDIO_BOS, AUDIO_EOS)

#: ChatML with multimodal content parts, as Qwen2.5-Omni renders them: a video part is
#: ``<|vision_bos|><|VIDEO|><|vision_eos|>``, a text part its text.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'video' %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def parse_caption(caption: str) -> tuple[str, str, str]:
    """``"a red square moving left"`` -> ``("red", "square", "left")``."""
    words = caption.split()
    if len(words) != 5 or words[0] != "a" or words[3] != "moving":
        raise ValueError(f"not a demo caption: {caption!r}")
    return words[1], words[2], words[4]


# --------------------------------------------------------------------------------------------- clips


@dataclass(frozen=True)
class Rendering:
    """One clip: what is drawn (the caption) and where (start corner and pixels per frame)."""

    colour: str
    shape: str
    direction: str
    x0: int
    y0: int
    speed: int

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction}"


def background(size: int) -> np.ndarray:
    """uint8 ``[size, size, 3]`` flat dark grey: every colour is brighter than it, so an object's edges and its
    motion between the two frames of a temporal patch have the same sign in every clip."""
    return np.broadcast_to(np.asarray(BACKGROUND, dtype=np.uint8), (size, size, 3)).copy()


def shape_mask(shape: str, x: int, y: int, object_size: int, size: int) -> np.ndarray:
    """Boolean ``[size, size]``: a filled square, or a ring (a disc with its inner half of the radius cut out,
    about 59% of the square's area: the two shapes differ in outline and in how much colour they hold)."""
    yy, xx = np.mgrid[0:size, 0:size]
    if shape == "square":
        return (xx >= x) & (xx < x + object_size) & (yy >= y) & (yy < y + object_size)
    c = (object_size - 1) / 2
    r2 = (xx - x - c) ** 2 + (yy - y - c) ** 2
    return (r2 <= (object_size / 2) ** 2) & (r2 > (object_size / 4) ** 2)


def render_frames(r: Rendering, size: int, frames: int, object_size: int) -> np.ndarray:
    """uint8 ``[frames, size, size, 3]``: the object drawn at its position in each frame on the background."""
    dx, dy = DIRECTIONS[r.direction]
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    out[:] = background(size)
    for t in range(frames):
        x, y = r.x0 + dx * r.speed * t, r.y0 + dy * r.speed * t
        out[t][shape_mask(r.shape, x, y, object_size, size)] = COLOURS[r.colour]
    return out


def speeds(settings: DemoVideoSection) -> list[int]:
    """Pixels per frame an object may move (the recipe's, each keeping it inside the frame)."""
    return sorted(set(settings.clips.speeds))


def plan_renderings(settings: DemoVideoSection) -> dict[str, list[Rendering]]:
    """``{"train": [...], "eval": [...]}``: every caption ``train_per_caption`` / ``eval_per_caption`` times, at
    seeded random start positions and speeds; no held-out rendering repeats a training one."""
    c = settings.clips
    rng = random.Random(f"demo-video-{settings.seed}")
    seen: set[Rendering] = set()
    split: dict[str, list[Rendering]] = {"train": [], "eval": []}
    for name, per in (("train", c.train_per_caption), ("eval", c.eval_per_caption)):
        for caption in CAPTIONS:
            colour, shape, direction = parse_caption(caption)
            dx, dy = DIRECTIONS[direction]
            for _ in range(per):
                for _attempt in range(1000):
                    speed = rng.choice(speeds(settings))
                    travel = speed * (c.frames - 1)
                    span = c.size - c.object_size - (travel if dx or dy else 0)
                    along = rng.randint(0, span)
                    across = rng.randint(0, c.size - c.object_size)
                    start = along + travel if (dx < 0 or dy < 0) else along  # moving left/up starts further on
                    x0, y0 = (start, across) if dx else (across, start)
                    r = Rendering(colour, shape, direction, x0, y0, speed)
                    if r not in seen:
                        break
                else:
                    raise ValueError("demo_video.clips: too many renderings asked for the frame size")
                seen.add(r)
                split[name].append(r)
    return split


def yuv420p(frame: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 3]`` RGB -> the ``[H * 3 // 2, W]`` yuv420p planes (BT.601 limited range, chroma averaged
    over 2x2 pixels), computed here in float64 so the planes the encoder gets depend on nothing but the frame."""
    rgb = frame.astype(np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    cb = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    cr = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    h, w = y.shape
    half = [c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)).reshape(h // 4, w) for c in (cb, cr)]
    return np.clip(np.round(np.concatenate([y] + half)), 0, 255).astype(np.uint8)


def write_clip(path: Path, frames: np.ndarray, fps: int) -> None:
    """Encode uint8 ``[T, H, W, 3]`` frames (even H and W) as lossless H.264 (qp 0) mp4 of ``yuv420p`` planes.

    Lossless, because a lossy encoding (crf 8) of the same frames came out different from one process to the
    next, and with it the teacher trained on the decoded pixels; qp 0 decodes to exactly these planes."""
    import av

    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps, options={"qp": "0", "preset": "medium", "threads": "1"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.thread_count = 1
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(yuv420p(f), format="yuv420p")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def write_clips(out: Path, settings: DemoVideoSection) -> dict[str, Path]:
    """Render and encode both splits under ``out/clips/<split>/``; returns the jsonl file of each split."""
    c = settings.clips
    files = {}
    for name, renderings in plan_renderings(settings).items():
        folder = out / "clips" / name
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for i, r in enumerate(renderings):
            rel = Path("clips") / name / f"{i:04d}.mp4"
            write_clip(out / rel, render_frames(r, c.size, c.frames, c.object_size), c.fps)
            rows.append({"video": rel.as_posix(), "prompt": PROMPT, "response": r.caption})
        files[name] = out / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return files


def video_spec(settings: DemoVideoSection):
    """Sampling that keeps every frame at its own size: grid (frames/2, size/14, size/14)."""
    from edgerazor.data.video import VideoSpec

    c = settings.clips
    pixels = c.size * c.size
    return VideoSpec(fps=float(c.fps), min_pixels=pixels, max_pixels=pixels)  # as VideoSpec.from_source(demo_source(...))


# --------------------------------------------------------------------------------- tokenizer, teacher


def train_tokenizer(vocab_size: int):
    """A byte-level BPE trained on the captions and prompt, with Qwen2.5-Omni's special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(CAPTIONS) * 4 + [PROMPT, "user", "assistant"] * 8, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, additional_special_tokens=list(SPECIAL_TOKENS[2:]),
        chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False,
    )


def teacher_config(settings: DemoVideoSection, tokenizer):
    """A real ``Qwen2_5OmniThinkerConfig`` of the recipe's tiny shape, its special-token ids set to the tokenizer's."""
    from transformers import Qwen2_5OmniThinkerConfig

    t = settings.teacher
    head_dim = t.hidden_size // t.num_heads
    half = head_dim // 2
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]  # temporal, height, width (Qwen: 16/24/24 of 64)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    text = dict(vocab_size=len(tokenizer), hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                tie_word_embeddings=False, max_position_embeddings=512,
                rope_scaling={"type": "default", "mrope_section": mrope})
    vision = dict(depth=t.vision_depth, hidden_size=t.vision_hidden_size, intermediate_size=t.vision_intermediate_size,
                  num_heads=t.vision_heads, out_hidden_size=t.hidden_size, patch_size=14, temporal_patch_size=2,
                  spatial_merge_size=2, in_channels=3, fullatt_block_indexes=[t.vision_depth - 1], window_size=56)
    audio = dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, output_dim=t.hidden_size,
                 num_mel_bins=16, max_source_positions=50, n_window=10)
    config = Qwen2_5OmniThinkerConfig(
        text_config=text, vision_config=vision, audio_config=audio,
        video_token_index=ids[VIDEO], image_token_index=ids[IMAGE], audio_token_index=ids[AUDIO],
        vision_start_token_id=ids[VISION_BOS], vision_end_token_id=ids[VISION_EOS],
        audio_start_token_id=ids[AUDIO_BOS], audio_end_token_id=ids[AUDIO_EOS],
        pad_token_id=tokenizer.pad_token_id,
    )
    config.architectures = ["Qwen2_5OmniThinkerForConditionalGeneration"]
    return config


def encode_rows(jsonl: Path, tokenizer, settings: DemoVideoSection) -> list[dict[str, Any]]:
    """Each row of ``jsonl`` as model inputs: the clip's pixels and grid, and the conversation's ids and labels
    (``edgerazor.data.video``'s placeholder expansion and response-only labels)."""
    from edgerazor.data.video import encode_video_row, load_video, video_tokens

    spec = video_spec(settings)
    rows = []
    for line in jsonl.read_text().splitlines():
        record = json.loads(line)
        path = jsonl.parent / record["video"]
        clip = load_video(path, spec)
        grid = clip["video_grid_thw"][0].tolist()
        ids, labels, _ = encode_video_row(record["prompt"], record["response"], video_tokens(grid, spec),
                                          tokenizer, max_length=1024)
        rows.append({"input_ids": ids, "labels": labels, "pixel_values_videos": clip["pixel_values_videos"],
                     "video_grid_thw": grid, "video": str(path), "prompt": record["prompt"],
                     "response": record["response"]})
    return rows


def collate(rows: Sequence[dict[str, Any]], pad_id: int, second_per_grid: float) -> dict[str, torch.Tensor]:
    """Right-padded ids/labels/attention mask and the clips' patches concatenated in batch order."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "pixel_values_videos": torch.cat([r["pixel_values_videos"] for r in rows]),
            "video_grid_thw": torch.tensor([list(r["video_grid_thw"]) for r in rows], dtype=torch.long),
            "video_second_per_grid": torch.full((len(rows),), second_per_grid, dtype=torch.float32)}


def response_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the response tokens (labels != -100), next-token shifted."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                             batch["labels"][:, 1:].reshape(-1), ignore_index=-100)


def train_teacher(model, rows: list[dict[str, Any]], settings: DemoVideoSection, pad_id: int,
                  progress: bool = True) -> list[float]:
    """Caption training: AdamW on the response tokens' cross-entropy, warmup then cosine; returns the losses."""
    from tqdm.auto import tqdm

    from edgerazor.demo import _lr_factor, pretraining_optimizer

    pretrain = settings.pretrain
    spg = video_spec(settings).second_per_grid
    optimizer = pretraining_optimizer(model, pretrain.learning_rate, pretrain.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, pretrain))
    generator = torch.Generator().manual_seed(settings.seed)
    order, cursor, losses = torch.randperm(len(rows), generator=generator), 0, []
    model.train()
    bar = tqdm(range(pretrain.steps), desc="video teacher training", unit="step", disable=not progress)
    for _ in bar:
        if cursor + pretrain.batch_size > len(order):
            order, cursor = torch.randperm(len(rows), generator=generator), 0
        batch = collate([rows[int(i)] for i in order[cursor: cursor + pretrain.batch_size]], pad_id, spg)
        cursor += pretrain.batch_size
        loss = response_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    return losses


# ------------------------------------------------------------------------------------------ accuracy


Scorer = Callable[[dict[str, Any], Sequence[str]], Sequence[float]]


def accuracy_of(predictions: Sequence[str], truths: Sequence[str]) -> dict[str, float]:
    """Colour, shape, direction and exact-caption accuracy of predicted captions."""
    if not truths or len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} rows")
    pairs = [(parse_caption(p), parse_caption(t)) for p, t in zip(predictions, truths)]
    n = len(pairs)
    return {
        "colour": sum(p[0] == t[0] for p, t in pairs) / n,
        "shape": sum(p[1] == t[1] for p, t in pairs) / n,
        "direction": sum(p[2] == t[2] for p, t in pairs) / n,
        "exact": sum(p == t for p, t in pairs) / n,
        "clips": n,
    }


def score_accuracy(scorer: Scorer, rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Accuracy when each row's caption is the highest-scoring of the 32 (ties: the first in ``CAPTIONS``)."""
    predictions = []
    for row in rows:
        scores = list(scorer(row, CAPTIONS))
        predictions.append(CAPTIONS[max(range(len(CAPTIONS)), key=lambda i: (scores[i], -i))])
    return accuracy_of(predictions, [r["response"] for r in rows])


def likelihood_scorer(model, tokenizer, settings: DemoVideoSection) -> Scorer:
    """Sum of the model's log-probabilities of each candidate caption (and its end-of-turn token) given the clip."""
    from edgerazor.data.video import encode_video_row, video_tokens

    from transformers.modeling_outputs import BaseModelOutputWithPooling

    spec = video_spec(settings)
    pad = tokenizer.pad_token_id
    encoded: dict[tuple, tuple] = {}  # the token rows depend on the clip only through its placeholder count

    @torch.no_grad()
    def score(row: dict[str, Any], candidates: Sequence[str]) -> list[float]:
        n = video_tokens(row["video_grid_thw"], spec)
        items = []
        for caption in candidates:
            key = (row["prompt"], caption, n)
            if key not in encoded:
                encoded[key] = encode_video_row(row["prompt"], caption, n, tokenizer, max_length=1024)[:2]
            ids, labels = encoded[key]
            items.append({**row, "input_ids": ids, "labels": labels})
        batch = collate(items, pad, spec.second_per_grid)
        labels = batch.pop("labels")
        pixels = batch.pop("pixel_values_videos")[: len(row["pixel_values_videos"])]
        # the vision tower runs once; every candidate reuses its output (the same tensor, hence the same logits)
        clip = model.get_video_features(pixels, batch["video_grid_thw"][:1], return_dict=True).pooler_output[0]
        video = BaseModelOutputWithPooling(pooler_output=(clip,) * len(items))
        logits = model(**batch, mm_encoder_outputs={"video": video}, use_cache=False).logits[:, :-1].float()
        target = labels[:, 1:]
        logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (logp * (target != -100)).sum(-1).tolist()

    return score


def caption_accuracy(model, tokenizer, rows: Sequence[dict[str, Any]],
                     settings: DemoVideoSection = DemoVideoSection()) -> dict[str, float]:
    """Held-out caption accuracy of ``model`` (rows from ``encode_rows``): the caption it finds most likely of
    the 32, exactly (all scored), in one batched forward per clip."""
    was_training = model.training
    model.eval()
    try:
        return score_accuracy(likelihood_scorer(model, tokenizer, settings), rows)
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------- cache


@dataclass
class VideoDemoAssets:
    teacher_dir: Path  # model + tokenizer (save_pretrained)
    train_jsonl: Path
    eval_jsonl: Path
    clip_dir: Path
    settings: DemoVideoSection
    cache_dir: Path
    from_cache: bool
    meta: dict[str, Any]


def cache_key(settings: DemoVideoSection) -> str:
    import av
    import tokenizers
    import transformers

    payload = {"format": CACHE_FORMAT, "settings": settings.model_dump(mode="json"),
               "versions": {"transformers": transformers.__version__.split(".")[0],
                            "tokenizers": tokenizers.__version__, "av": av.__version__}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[edgerazor demo-video] {message}", file=sys.stderr, flush=True)


def _assets(final: Path, settings: DemoVideoSection, from_cache: bool) -> VideoDemoAssets:
    meta = json.loads((final / "meta.json").read_text())
    return VideoDemoAssets(final / "teacher", final / "train.jsonl", final / "eval.jsonl", final / "clips",
                           settings, final, from_cache, meta)


def _build(out: Path, settings: DemoVideoSection, progress: bool) -> None:
    """Write clips/, train.jsonl, eval.jsonl, teacher/ and meta.json (last) into ``out``."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    start = time.perf_counter()
    files = write_clips(out, settings)
    clip_seconds = time.perf_counter() - start
    tokenizer = train_tokenizer(settings.teacher.vocab_size)
    train_rows, eval_rows = encode_rows(files["train"], tokenizer, settings), encode_rows(files["eval"], tokenizer, settings)
    _log(progress, f"clips: {len(train_rows)} training, {len(eval_rows)} held-out ({clip_seconds:.1f} s); "
                   f"tokenizer: {len(tokenizer)} tokens")
    torch.manual_seed(settings.seed)
    model = Qwen2_5OmniThinkerForConditionalGeneration(teacher_config(settings, tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    _log(progress, f"teacher: Qwen2.5-Omni thinker, {n_params / 1e6:.2f}M parameters; "
                   f"{settings.pretrain.steps} steps of batch {settings.pretrain.batch_size}")
    t = time.perf_counter()
    losses = train_teacher(model, train_rows, settings, tokenizer.pad_token_id, progress)
    train_seconds = time.perf_counter() - t
    t = time.perf_counter()
    accuracy = caption_accuracy(model, tokenizer, eval_rows, settings)
    _log(progress, f"teacher: held-out caption accuracy {accuracy} after {train_seconds:.0f} s of training")
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(IM_END)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out / "teacher")
    tokenizer.save_pretrained(out / "teacher")
    meta = {"format": CACHE_FORMAT, "settings": settings.model_dump(mode="json"), "teacher_accuracy": accuracy,
            "teacher_train_seconds": train_seconds, "accuracy_seconds": time.perf_counter() - t,
            "clip_seconds": clip_seconds, "build_seconds": time.perf_counter() - start,
            "teacher_parameters": n_params, "teacher_final_loss": sum(losses[-20:]) / max(len(losses[-20:]), 1),
            "train_clips": len(train_rows), "eval_clips": len(eval_rows), "threads": torch.get_num_threads()}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: the build is complete


def prepare_video_demo(settings: DemoVideoSection = DemoVideoSection(), cache_dir: str | Path | None = None,
                       progress: bool = True) -> VideoDemoAssets:
    """Build (or reuse from the cache) the clips, jsonl rows and captioning teacher of ``settings``.

    ``cache_dir`` is the cache root (default ``default_cache_root("demo-video")``); a complete entry is never
    rebuilt, and a build goes to a temporary sibling renamed into place when complete."""
    from edgerazor.demo import build_cache_entry, default_cache_root, use_all_cores

    use_all_cores()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root("demo-video")
    final = root / cache_key(settings)
    if (final / "meta.json").is_file():
        _log(progress, f"using the cached video teacher in {final}")
        return _assets(final, settings, from_cache=True)
    _log(progress, f"building the video demo (cached afterwards in {final})")
    build_cache_entry(final, lambda tmp: _build(tmp, settings, progress))
    return _assets(final, settings, from_cache=False)


# ------------------------------------------------------------------------------------ run inputs


def demo_source(path: Path, settings: DemoVideoSection):
    """A ``format: video`` data source for one of the demo's jsonl files, sampling every frame at its own size."""
    from edgerazor.recipe import DataSource

    c = settings.clips
    return DataSource(path=str(path), format="video", fps=float(c.fps), min_pixels=c.size * c.size,
                      max_pixels=c.size * c.size)


def demo_datasets(assets: VideoDemoAssets, tokenizer, adapter):
    """(train, eval, stats) through the adapter's video data path: training clips to distil on and the held-out
    clips to evaluate on, each a data section of its own (no eval_fraction split: the held-out clips are new)."""
    from edgerazor.recipe import DataSection

    parts = [adapter.build_datasets(DataSection(sources=[demo_source(path, assets.settings)], max_length=128), tokenizer)
             for path in (assets.train_jsonl, assets.eval_jsonl)]
    stats = parts[0].stats
    stats.sources += parts[1].stats.sources
    stats.eval = parts[1].stats.train
    return parts[0].train, parts[1].train, stats


def print_accuracies(results: dict[str, Any], key: str = "caption_accuracy") -> None:
    """Teacher, round-to-nearest and student caption accuracy, one row each."""
    from rich.console import Console
    from rich.table import Table

    accuracy = results[key]
    table = Table(title=f"video demo {results['w_a_kv']}: held-out caption accuracy "
                        f"({accuracy['teacher']['clips']} clips, best of the 32 captions by likelihood)")
    table.add_column("model")
    for col in ("colour", "shape", "direction", "exact"):
        table.add_column(col, justify="right")
    for label, name in (("teacher (16-bit)", "teacher"), (f"round-to-nearest {results['w_a_kv']}", "rtn"),
                        (f"EdgeRazor {results['w_a_kv']}", "student")):
        table.add_row(label, *(f"{accuracy[name][c]:.1%}" for c in ("colour", "shape", "direction", "exact")))
    console = Console()
    console.print(table)
    fields = caption_closure_fields(accuracy)
    closure = fields["caption_gap_closure"]
    closed = f"{closure:.1%}" if closure is not None else fields["caption_gap_closure_note"]
    console.print(f"exact-caption accuracy gap closed: {closed} (teacher {accuracy['teacher']['exact']:.1%}, "
                  f"round-to-nearest {accuracy['rtn']['exact']:.1%}, EdgeRazor {accuracy['student']['exact']:.1%})")


def accuracy_gap_closure(accuracy: dict[str, dict[str, float]]) -> float | None:
    """Share of the teacher-minus-RTN exact-caption accuracy the student wins back (None when there is no gap)."""
    gap = accuracy["teacher"]["exact"] - accuracy["rtn"]["exact"]
    return (accuracy["student"]["exact"] - accuracy["rtn"]["exact"]) / gap if gap > 0 else None


def caption_closure_fields(accuracy: dict[str, dict[str, float]]) -> dict[str, Any]:
    """``caption_gap_closure`` for results.json, like the perplexity ``gap_closure``: null with the reason when
    round-to-nearest is no worse than the teacher."""
    closure = accuracy_gap_closure(accuracy)
    if closure is not None:
        return {"caption_gap_closure": closure}
    return {"caption_gap_closure": None, "caption_gap_closure_note":
            f"undefined: round-to-nearest exact-caption accuracy ({accuracy['rtn']['exact']:.1%}) is not below "
            f"the teacher's ({accuracy['teacher']['exact']:.1%}), so there is no gap to close"}


__all__ = ["CAPTIONS", "Rendering", "VideoDemoAssets", "accuracy_of", "caption_accuracy", "demo_datasets",
           "encode_rows", "plan_renderings", "prepare_video_demo", "render_frames", "score_accuracy"]
