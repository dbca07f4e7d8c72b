"""Distillation: chunked divergences, LAFD features, the objective and the Trainer."""

from edgerazor.distill.trainer import DistillationTrainer, distill, latest_checkpoint, training_arguments

__all__ = ["DistillationTrainer", "distill", "latest_checkpoint", "training_arguments"]
