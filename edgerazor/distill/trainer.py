"""``DistillationTrainer``: a transformers Trainer whose loss is EdgeRazor's objective, and ``distill``,
which builds one from a recipe (``training_arguments`` maps the train section) and runs it.

The teacher is frozen, in eval mode, runs under ``no_grad`` and is never given labels; where it
lives (whole, or ZeRO-3-sharded with every rank running its forward) is ``placement``'s decision. Every
logging step reports each loss term, the KL mixer's weight (lambda) and the layers LAFD chose.
Checkpoints carry the recipe (``recipe.yaml``) and the allocation (mask buffers in the weights)
and are committed by a marker file written last, so a run killed while saving leaves the
previous checkpoint as the one ``--resume`` picks.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from edgerazor.distill.console import use_log_lines
from edgerazor.distill.features import record_residual_stream
from edgerazor.distill.fused import fused_unsupported
from edgerazor.distill.placement import gathered, is_sharded, read_deepspeed_config, student_config
from edgerazor.adapters import ModelAdapter, adapter_for_model
from edgerazor.errors import EdgeRazorError
from edgerazor.file_modes import apply_umask
from edgerazor.progress import library_bars_off
from edgerazor.ranks import world_size
from edgerazor.eval.perplexity import perplexity
from edgerazor.distill.objective import ModelOutputs, check_vocabularies, distillation_loss
from edgerazor.recipe import Recipe, dump_recipe

COMPLETE_MARKER = "edgerazor_checkpoint_complete"
logger = logging.getLogger(__name__)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


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

    def __init__(self, *args, teacher: nn.Module, recipe: Recipe, adapter: str | ModelAdapter | None = None, **kwargs):
        self.recipe = recipe
        # LAFD reads the residual stream from the decoder layer list the model family's adapter names
        self.adapter = adapter_for_model(kwargs["model"], adapter)
        # We checkpoint-rotate ourselves, after the completion marker is written.
        self._keep = kwargs["args"].save_total_limit
        kwargs["args"].save_total_limit = None
        super().__init__(*args, **kwargs)
        use_log_lines(self)  # log lines show numbers, not transformers' quoted strings
        self.model_accepts_loss_kwargs = True  # so the Trainer counts num_items_in_batch for us
        check_vocabularies(self.model.config.get_text_config().vocab_size, teacher.config.get_text_config().vocab_size)
        self.teacher = teacher.eval().requires_grad_(False)
        if not is_sharded(teacher):  # a ZeRO-3 teacher stays where its engine put it (placement.place_teacher)
            self.teacher.to(self.args.device)
        self._sums: dict[str, float] = defaultdict(float)
        self._count = 0
        self._layer_counts: Counter[int] = Counter()
        self.fused_logits = self._use_fused(recipe)

    def _use_fused(self, recipe: Recipe) -> bool:
        if not recipe.distill.fused_logits:
            return False
        zero3 = self.args.hf_deepspeed_config.is_zero3() if self.args.deepspeed else False
        why = ("distill.extra_losses read logits" if recipe.distill.extra_losses
               else "under ZeRO-3 the student's lm_head weight is a partition outside its forward, and the fused "
                    "loss's weight gradient would bypass ZeRO-3's gradient partitioning" if zero3
               else fused_unsupported(self.model) or fused_unsupported(self.teacher))
        if why:
            logger.warning("distill.fused_logits: %s; using the unfused logit loss", why)
        return why is None

    def _forward(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> ModelOutputs:
        model_inputs = self.adapter.model_inputs(inputs)  # tokens, and e.g. a video family's pixels and grids
        inner = model.module if hasattr(model, "module") else model
        if not self.fused_logits:
            with record_residual_stream(self.adapter.decoder_layers(inner)) as states:
                logits = model(**model_inputs, use_cache=False).logits
            return ModelOutputs(logits, states)
        # The fused loss projects the lm_head's input itself: record it and hand the head an empty
        # slice, so the model computes no logits at all.
        head = inner.get_output_embeddings()
        seen: list[torch.Tensor] = []

        def take_input(module, args):
            seen.append(args[0])
            return (args[0][..., :0, :],)

        handle = head.register_forward_pre_hook(take_input)
        try:
            with record_residual_stream(self.adapter.decoder_layers(inner)) as states:
                model(**model_inputs, use_cache=False)
        finally:
            handle.remove()
        if len(seen) != 1:
            raise EdgeRazorError(f"fused logit loss: the lm_head ran {len(seen)} times in one forward (expected "
                                 "once); set distill.fused_logits: false for this model")
        if is_sharded(head):  # a ZeRO-3 teacher: the fused loss reads the head's weight after the forward
            head = _whole_copy(head)
        return ModelOutputs(None, states, head_input=seen[0], head=head)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with torch.no_grad():
            teacher_out = self._forward(self.teacher, inputs)
        student_out = self._forward(model, inputs)
        result = distillation_loss(student_out, teacher_out, inputs, self.recipe.distill, num_items_in_batch)
        # num_items_in_batch counts every rank's response tokens while DDP / ZeRO average gradients over the
        # ranks: scale by the rank count, as the Trainer's own compute_loss does, so any world size equals one
        # process with the whole batch (1 in a single process)
        ranks = self.accelerator.num_processes if (
            self.args.average_tokens_across_devices and num_items_in_batch is not None) else 1
        if ranks != 1:
            result.total = result.total * ranks
            result.terms = {name: value * ranks for name, value in result.terms.items()}
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

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Held-out perplexity of the student (what a run reports), not the distillation loss.

        The Trainer calls this every ``train.eval_steps`` steps and at the last step; the metrics
        (``eval_perplexity``) go into ``state.log_history`` beside the training losses.
        """
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        start = time.perf_counter()
        ppl = perplexity(self.model, dataset, self.args.per_device_eval_batch_size, progress=False,
                         collate=self.data_collator, model_inputs=self.adapter.model_inputs)
        metrics = {f"{metric_key_prefix}_perplexity": ppl, f"{metric_key_prefix}_seconds": time.perf_counter() - start}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _save(self, *args, **kwargs):
        with library_bars_off():  # no "Writing model shards" bar at every checkpoint
            return super()._save(*args, **kwargs)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()  # every rank's DeepSpeed shards are written before the commit marker
        checkpoint = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save and checkpoint.is_dir():
            (checkpoint / "recipe.yaml").write_text(dump_recipe(self.recipe))
            marker = checkpoint / (COMPLETE_MARKER + ".tmp")
            marker.write_text(f"{self.state.global_step}\n")
            apply_umask(checkpoint)  # safetensors and torch.save write 0600 whatever the umask
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


def _whole_copy(head: nn.Module) -> nn.Linear:
    """A frozen nn.Linear holding the gathered weights of a ZeRO-3 partitioned (teacher) lm_head."""
    with gathered(list(head.parameters())):
        weight = head.weight.detach().clone()
        bias = head.bias.detach().clone() if getattr(head, "bias", None) is not None else None
    whole = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    whole.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        whole.bias = nn.Parameter(bias, requires_grad=False)
    return whole


def training_arguments(recipe: Recipe, output_dir: str | Path, **overrides) -> TrainingArguments:
    """Map the recipe's train section onto ``TrainingArguments`` (AdamW, Table 1 schedules)."""
    t = recipe.train
    kwargs = dict(
        output_dir=str(output_dir),
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a fraction of the total steps
        max_steps=t.max_steps,
        num_train_epochs=t.num_epochs,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim="adamw_torch",
        activation_checkpointing=t.gradient_checkpointing,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        bf16=t.bf16,
        dataloader_num_workers=t.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        report_to="none",
    )
    if t.deepspeed:
        kwargs["deepspeed"] = deepspeed_config(t.deepspeed)
    if (t.deepspeed or world_size() > 1) and not torch.cuda.is_available():
        # CPU ranks (DS_ACCELERATOR=cpu under DeepSpeed): without use_cpu the Trainer joins no process group
        # and every rank would train alone as world size 1 (DeepSpeed or plain DDP); gloo is the CPU backend
        kwargs.update(use_cpu=True, ddp_backend="gloo")
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def deepspeed_config(path: str | Path) -> dict:
    """The student's DeepSpeed config read from ``path`` (its ``"teacher"`` section, if any, is the
    teacher's: ``placement``); ``"auto"`` values are filled by the Trainer from the recipe (micro-batch,
    accumulation, clipping, bf16). Missing, unreadable or not a JSON object: one line."""
    return student_config(read_deepspeed_config(path))


def distill(
    teacher: nn.Module,
    student: nn.Module,
    train_dataset,
    recipe: Recipe,
    output_dir: str | Path,
    data_collator,
    resume: bool | str | Path = False,
    adapter: str | ModelAdapter | None = None,
    callbacks=None,
    eval_dataset=None,
    **argument_overrides,
):
    """Distil ``teacher`` into the (already quantized) ``student``; returns the trainer after training.

    With ``train.eval_steps`` set, the student's perplexity on ``eval_dataset`` is measured every
    that many steps and at the end (``eval_perplexity`` entries of ``trainer.state.log_history``).
    """
    if recipe.train.eval_steps and eval_dataset is None:
        raise EdgeRazorError("train.eval_steps is set but there is no eval dataset: pass eval_dataset or unset it")
    args = training_arguments(recipe, output_dir, **argument_overrides)
    trainer = DistillationTrainer(
        model=student, teacher=teacher, recipe=recipe, adapter=adapter, args=args,
        train_dataset=train_dataset, eval_dataset=eval_dataset if recipe.train.eval_steps else None,
        data_collator=data_collator, callbacks=callbacks,
    )
    checkpoint = None
    if resume:
        checkpoint = Path(resume) if not isinstance(resume, bool) else latest_checkpoint(output_dir)
        if checkpoint is None:
            raise EdgeRazorError(f"--resume: no complete checkpoint under {output_dir}")
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    return trainer
