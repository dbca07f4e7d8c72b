"""From a recipe to a running ``DistillationTrainer``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import TrainingArguments

from edgerazor.errors import EdgeRazorError
from edgerazor.recipe import Recipe


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
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def distill(
    teacher: nn.Module,
    student: nn.Module,
    train_dataset,
    recipe: Recipe,
    output_dir: str | Path,
    data_collator,
    resume: bool | str | Path = False,
    layers_path: str = "model.layers",
    callbacks=None,
    **argument_overrides,
):
    """Distil ``teacher`` into the (already quantized) ``student``; returns the trainer after training."""
    from edgerazor.distill.trainer import DistillationTrainer, latest_checkpoint

    args = training_arguments(recipe, output_dir, **argument_overrides)
    trainer = DistillationTrainer(
        model=student, teacher=teacher, recipe=recipe, layers_path=layers_path, args=args,
        train_dataset=train_dataset, data_collator=data_collator, callbacks=callbacks,
    )
    checkpoint = None
    if resume:
        checkpoint = Path(resume) if not isinstance(resume, bool) else latest_checkpoint(output_dir)
        if checkpoint is None:
            raise EdgeRazorError(f"--resume: no complete checkpoint under {output_dir}")
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    return trainer
