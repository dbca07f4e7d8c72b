"""EdgeRazor's Qwen2.5-Omni student as an lmms-eval model: ``EdgeRazorVideoLMM``, registered as ``edgerazor_video``.

It runs in-process (``simple_evaluate(model=instance)``) on the model exactly as it was trained: a student loads
with fake quantization (weights, A8 and KV8) active, a packed export computes from its codes. Each request's clip
goes through ``edgerazor.data.video`` - the same PyAV decoding, fps sampling and patch layout as training - and
its prompt through the tokenizer's chat template with the video placeholder expanded to the clip's tokens.

``loglikelihood`` returns the summed log-probability of the continuation after the prompt (one forward per
request; the vision tower runs once per clip); ``generate_until`` decodes with ``generate`` and cuts the reply at
the task's stop strings. This module imports lmms-eval, so only ``edgerazor.evaluation.video`` imports it, and
only when a video evaluation runs.
"""

from __future__ import annotations

import gc
from collections import OrderedDict
from typing import Any

import torch
from lmms_eval.api.model import lmms
from lmms_eval.api.registry import register_model
from tqdm.auto import tqdm

from edgerazor.data.video import VideoError, VideoSpec, load_video, video_token, video_tokens
from edgerazor.errors import EdgeRazorError

MODEL_NAME = "edgerazor_video"
#: clips kept decoded with their vision features: requests arrive grouped by question
CLIP_CACHE = 4


class VideoModelError(EdgeRazorError):
    """The model, its tokenizer or a request cannot be evaluated as asked; the message says what and where."""


def video_spec_for(model, fps: float | None = None, min_pixels: int | None = None,
                   max_pixels: int | None = None) -> VideoSpec:
    """Sampling for evaluation: what is given, else the student's training video source (fps and pixel bounds
    from its recipe), else Qwen2.5-Omni's processor defaults."""
    trained: dict[str, Any] = {}
    recipe = (getattr(model.config, "edgerazor", None) or {}).get("recipe") or {}
    for source in (recipe.get("data") or {}).get("sources") or []:
        if isinstance(source, dict) and source.get("format") == "video":
            trained = {k: source[k] for k in ("fps", "min_pixels", "max_pixels") if source.get(k) is not None}
            break
    given = {"fps": fps, "min_pixels": min_pixels, "max_pixels": max_pixels}
    return VideoSpec(**{**trained, **{k: v for k, v in given.items() if v is not None}})


@register_model(MODEL_NAME)
class EdgeRazorVideoLMM(lmms):
    """A video model for lmms-eval: ``EdgeRazorVideoLMM(model, tokenizer, spec)`` around a loaded model, or
    ``EdgeRazorVideoLMM(pretrained=PATH)`` (a run folder, student, packed export or 16-bit Omni thinker, loaded as
    ``edgerazor eval`` loads it), which is also how ``simple_evaluate(model="edgerazor_video",
    model_args="pretrained=PATH")`` builds it."""

    is_simple = True

    def __init__(self, model=None, tokenizer=None, spec: VideoSpec | None = None, *, pretrained: str | None = None,
                 dense: bool = False, keep_dtype: bool = False, fps: float | None = None,
                 min_pixels: int | None = None, max_pixels: int | None = None, progress: bool = True,
                 batch_size: int | str | None = 1, max_batch_size: int | None = None, device: str | None = None,
                 **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise VideoModelError(f"model {MODEL_NAME!r}: unknown argument(s) {', '.join(sorted(unknown))}")
        if batch_size not in (None, 1, "1"):
            raise VideoModelError(f"model {MODEL_NAME!r} scores one request at a time: batch_size must be 1, "
                                 f"got {batch_size!r}")
        if pretrained is not None:
            if model is not None:
                raise VideoModelError(f"model {MODEL_NAME!r}: give a loaded model or pretrained=PATH, not both")
            from edgerazor.evaluation.models import load_for_eval

            loaded = load_for_eval(str(pretrained), keep_dtype=keep_dtype, dense=dense, device=device)
            model, tokenizer = loaded.model, loaded.tokenizer
        if model is None or tokenizer is None:
            raise VideoModelError(f"model {MODEL_NAME!r} needs a model and its tokenizer (or pretrained=PATH)")
        if not getattr(tokenizer, "chat_template", None):
            raise VideoModelError(f"the tokenizer of {getattr(tokenizer, 'name_or_path', '') or 'the model'} has no "
                                 "chat template: video prompts are rendered through it")
        if not hasattr(model, "get_video_features"):
            raise VideoModelError(f"{type(model).__name__} takes no video input (no get_video_features): video "
                                 "evaluation serves Qwen2.5-Omni thinkers")
        self._model = model.eval()
        self.tokenizer = tokenizer
        self.spec = spec or video_spec_for(model, fps, min_pixels, max_pixels)
        self.progress = progress
        self._clips: OrderedDict[str, dict[str, Any]] = OrderedDict()

    @property
    def model(self):
        return self._model

    @property
    def device(self) -> torch.device:
        return next(self._model.parameters()).device

    def clean(self) -> None:
        """lmms-eval calls this after generating to free GPU memory by deleting the model's modules; the model
        belongs to the caller and stays usable, so only the decoded clips go."""
        self._clips.clear()
        gc.collect()

    # ------------------------------------------------------------------------------------------ inputs

    def clip(self, path: str) -> dict[str, Any]:
        """A clip's model inputs (``load_video``) and, once computed, its vision features; a few kept."""
        if path in self._clips:
            self._clips.move_to_end(path)
            return self._clips[path]
        try:
            inputs = load_video(path, self.spec)
        except EdgeRazorError:
            raise
        except Exception as exc:  # av's errors and the pipeline's ValueErrors
            raise VideoError(f"video {path} cannot be used: {str(exc).strip() or type(exc).__name__}") from None
        entry = {"inputs": {k: v.to(self.device) for k, v in inputs.items()}, "features": None}
        self._clips[path] = entry
        while len(self._clips) > CLIP_CACHE:
            self._clips.popitem(last=False)
        return entry

    def _visual(self, doc_to_visual, doc_id: int, task: str, split: str) -> str:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        paths = [v for v in (visuals or []) if isinstance(v, str)]
        if len(paths) != 1 or len(visuals) != 1:
            raise VideoModelError(f"task {task!r}, document {doc_id}: expected one video path, got {visuals!r}")
        return paths[0]

    def prompt_ids(self, context: str, n_video_tokens: int) -> list[int]:
        """The user turn ``[video, context]`` through the chat template with the assistant's turn opened, its one
        video placeholder expanded to ``n_video_tokens``."""
        token = video_token(self.tokenizer)
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": context}]}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if text.count(token) != 1:
            raise VideoModelError(f"the chat template renders {text.count(token)} video placeholders {token!r}, not 1")
        ids = self.tokenizer(text.replace(token, token * n_video_tokens), add_special_tokens=False)["input_ids"]
        if ids.count(self.tokenizer.convert_tokens_to_ids(token)) != n_video_tokens:
            raise VideoModelError(f"the tokenizer does not keep {token!r} as one token")
        return ids

    def _video_inputs(self, entry: dict[str, Any]) -> dict[str, torch.Tensor]:
        inputs = entry["inputs"]
        return {"video_grid_thw": inputs["video_grid_thw"], "video_second_per_grid": inputs["video_second_per_grid"]}

    @torch.no_grad()
    def logits(self, ids: list[int], entry: dict[str, Any]) -> torch.Tensor:
        """Logits ``[len(ids), V]`` of one token row holding the clip's placeholders; the vision tower's output is
        computed on the clip's first use and reused (the same tensor, so the same logits)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if entry["features"] is None:
            inputs = entry["inputs"]
            entry["features"] = self._model.get_video_features(
                inputs["pixel_values_videos"], inputs["video_grid_thw"], return_dict=True).pooler_output
        row = torch.tensor([ids], dtype=torch.long, device=self.device)
        video = BaseModelOutputWithPooling(pooler_output=tuple(entry["features"]))
        out = self._model(input_ids=row, attention_mask=torch.ones_like(row), mm_encoder_outputs={"video": video},
                          use_cache=False, **self._video_inputs(entry))
        return out.logits[0]

    # -------------------------------------------------------------------------------------- lmms API

    def _ordered(self, requests) -> list[int]:
        """Request indices grouped by clip (task, split, document), so each clip is decoded once."""
        def key(i: int):
            args = requests[i].args
            return args[4], args[5], args[3], i
        return sorted(range(len(requests)), key=key)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | video, context), whether greedy decoding gives exactly the continuation)."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(self._ordered(requests), desc="video loglikelihood", unit="request", disable=not self.progress)
        for i in bar:
            context, continuation, doc_to_visual, doc_id, task, split = requests[i].args
            entry = self.clip(self._visual(doc_to_visual, doc_id, task, split))
            prompt = self.prompt_ids(context, video_tokens(entry["inputs"]["video_grid_thw"][0].tolist(), self.spec))
            target = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            if not target:
                raise VideoModelError(f"task {task!r}, document {doc_id}: empty continuation {continuation!r}")
            logits = self.logits(prompt + target, entry)[len(prompt) - 1: -1].float()
            logp = torch.log_softmax(logits, dim=-1)
            wanted = torch.tensor(target, device=logp.device)
            total = logp.gather(-1, wanted[:, None]).sum()
            results[i] = (float(total), bool((logp.argmax(-1) == wanted).all()))
        return results

    def _stop_ids(self) -> list[int]:
        """End of sequence and end of turn: a chat reply stops at either."""
        from edgerazor.data.formatting import end_of_turn_tokens

        ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        for token in end_of_turn_tokens(self.tokenizer):
            if token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"):
                ids.add(self.tokenizer.convert_tokens_to_ids(token))
        return sorted(ids)

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        """Each reply decoded with ``generate`` (greedy unless the task samples), cut at the first stop string."""
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(self._ordered(requests), desc="video generation", unit="request", disable=not self.progress)
        for i in bar:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = requests[i].args
            entry = self.clip(self._visual(doc_to_visual, doc_id, task, split))
            prompt = self.prompt_ids(context, video_tokens(entry["inputs"]["video_grid_thw"][0].tolist(), self.spec))
            reply = self.generate(prompt, entry, dict(gen_kwargs or {}))
            results[i] = reply
        return results

    def generate(self, prompt: list[int], entry: dict[str, Any], gen_kwargs: dict[str, Any]) -> str:
        """The decoded reply to ``prompt`` (ids holding the clip's placeholders), cut at ``until``."""
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.pop("temperature", 0) or 0)
        sample = bool(gen_kwargs.pop("do_sample", temperature > 0)) and temperature > 0
        options = {"max_new_tokens": int(gen_kwargs.pop("max_new_tokens", 128)),
                   "num_beams": int(gen_kwargs.pop("num_beams", 1) or 1), "do_sample": sample}
        top_p, top_k = gen_kwargs.pop("top_p", None), gen_kwargs.pop("top_k", None)
        if gen_kwargs:
            raise VideoModelError(f"generation setting(s) {', '.join(sorted(gen_kwargs))} are not understood; "
                                  "use max_new_tokens, temperature, do_sample, top_p, top_k, num_beams, until")
        if sample:
            options["temperature"] = temperature
            if top_p is not None:
                options["top_p"] = float(top_p)
            if top_k is not None:
                options["top_k"] = int(top_k)
        row = torch.tensor([prompt], dtype=torch.long, device=self.device)
        stop = self._stop_ids()
        out = self._model.generate(input_ids=row, attention_mask=torch.ones_like(row), use_cache=True,
                                   pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                                   else stop[0], eos_token_id=stop, **entry["inputs"], **options)
        text = self.tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)
        for marker in until:
            if marker:
                text = text.split(marker)[0]
        return text

    def generate_until_multi_round(self, requests) -> list[str]:
        raise VideoModelError(f"model {MODEL_NAME!r} answers single-turn video questions; multi-round tasks are "
                             "not supported")


def _register_manifest() -> None:
    """lmms-eval 0.7 resolves model names through its manifest registry; ``register_model`` fills the older one."""
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.models.registry_v2 import ModelManifest

    MODEL_REGISTRY_V2.register_manifest(
        ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.{EdgeRazorVideoLMM.__name__}"),
        overwrite=True)


_register_manifest()
