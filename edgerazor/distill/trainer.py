"""``DistillationTrainer``: a transformers Trainer whose loss is EdgeRazor's objective.

The teacher is frozen, in eval mode, runs under ``no_grad`` and is never given labels. Every
logging step reports each loss term, the KL mixer's weight (lambda) and the layers LAFD chose.
Checkpoints carry the recipe (``recipe.yaml``) and the allocation (mask buffers in the weights)
and are committed by a marker file written last, so a run killed while saving leaves the
previous checkpoint as the one ``--resume`` picks.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer

from edgerazor.distill.features import record_residual_stream
from edgerazor.distill.objective import ModelOutputs, check_vocabularies, distillation_loss
from edgerazor.recipe import Recipe, dump_recipe

COMPLETE_MARKER = "edgerazor_checkpoint_complete"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def decoder_layers(model: nn.Module, path: str) -> nn.ModuleList:
    layers = model.get_submodule(path)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{path!r} of {type(model).__name__} is not the decoder's layer list")
    return layers


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints whose save finished, oldest first."""
    root = Path(output_dir)
    found = []
    for child in root.iterdir() if root.is_dir() else []:
        match = _CHECKPOINT.match(child.name)
        if match and (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


class DistillationTrainer(Trainer):
    # compute_loss divides by the global response-token count, so the Trainer must not rescale.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, teacher: nn.Module, recipe: Recipe, layers_path: str = "model.layers", **kwargs):
        self.recipe = recipe
        self.layers_path = layers_path
        # We checkpoint-rotate ourselves, after the completion marker is written.
        self._keep = kwargs["args"].save_total_limit
        kwargs["args"].save_total_limit = None
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = True  # so the Trainer counts num_items_in_batch for us
        check_vocabularies(self.model.config.get_text_config().vocab_size, teacher.config.get_text_config().vocab_size)
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher.to(self.args.device)
        self._sums: dict[str, float] = defaultdict(float)
        self._count = 0
        self._layer_counts: Counter[int] = Counter()

    def _forward(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> ModelOutputs:
        model_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        inner = model.module if hasattr(model, "module") else model
        with record_residual_stream(decoder_layers(inner, self.layers_path)) as states:
            logits = model(**model_inputs, use_cache=False).logits
        return ModelOutputs(logits, states)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with torch.no_grad():
            teacher_out = self._forward(self.teacher, inputs)
        student_out = self._forward(model, inputs)
        result = distillation_loss(student_out, teacher_out, inputs, self.recipe.distill, num_items_in_batch)
        if model.training:
            for name, value in result.terms.items():
                self._sums[name] += float(value.detach())
            self._sums["kl_forward_weight"] += result.kl_weight
            self._layer_counts.update(result.layers)
            self._count += 1
        return (result.total, student_out) if return_outputs else result.total

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._count and "loss" in logs:
            for name, value in self._sums.items():
                logs[name] = value / self._count
            logs["lafd_layers"] = ",".join(str(l) for l, _ in sorted(self._layer_counts.items()))
            for layer, count in sorted(self._layer_counts.items()):
                logs[f"lafd_layer_{layer}"] = count / self._count
            self._sums.clear()
            self._layer_counts.clear()
            self._count = 0
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        checkpoint = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save and checkpoint.is_dir():
            (checkpoint / "recipe.yaml").write_text(dump_recipe(self.recipe))
            marker = checkpoint / (COMPLETE_MARKER + ".tmp")
            marker.write_text(f"{self.state.global_step}\n")
            marker.replace(checkpoint / COMPLETE_MARKER)  # the commit point
            self._rotate()

    def _rotate(self) -> None:
        if not self._keep:
            return
        root = Path(self.args.output_dir)
        done = complete_checkpoints(root)
        for old in done[: -self._keep]:
            shutil.rmtree(old, ignore_errors=True)
        latest = int(done[-1].name.split("-")[1]) if done else 0
        for child in root.glob("checkpoint-*"):  # leftovers of interrupted saves
            match = _CHECKPOINT.match(child.name)
            if match and int(match.group(1)) < latest and not (child / COMPLETE_MARKER).is_file():
                shutil.rmtree(child, ignore_errors=True)
