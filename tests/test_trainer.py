"""DistillationTrainer: logging, KV8 under checkpointing, resume equivalence, atomic checkpoints."""

from __future__ import annotations

import copy

import datasets
import pytest
import torch
from transformers import Qwen3ForCausalLM, TrainerCallback

import edgerazor
from edgerazor.distill import distill, latest_checkpoint
from edgerazor.distill.trainer import COMPLETE_MARKER, DistillationTrainer
from edgerazor.hookspecs import hookimpl
from edgerazor.plugin_manager import get_plugins
from edgerazor.quant.kv import KVFakeQuant
from edgerazor.recipe import recipe_from_dict
from tests.helpers import tiny_qwen3_config


def collate(rows):
    return {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "labels")}


def make_dataset(n=24, length=16, vocab=512):
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        labels = [-100] * 4 + ids[4:]  # a prompt without loss
        rows.append({"input_ids": ids, "labels": labels})
    return datasets.Dataset.from_list(rows)


def make_models(**quant):
    torch.manual_seed(0)
    teacher = Qwen3ForCausalLM(tiny_qwen3_config(num_hidden_layers=3))
    student = copy.deepcopy(teacher)
    return teacher, student


def make_recipe(**train):
    settings = {"max_steps": 6, "logging_steps": 1, "save_steps": 2, "per_device_batch_size": 4,
                "learning_rate": 1e-3, "save_total_limit": 5}
    settings.update(train)
    return recipe_from_dict({"quant": {"weight": {"group_size": 64}}, "train": settings,
                             "distill": {"alpha_task": 0.5, "alpha_feature": 1.0, "alpha_logit": 2.0}})


class LossLog(TrainerCallback):
    """The losses logged by this run (a resumed run's log_history also holds the restored ones)."""

    def __init__(self):
        self.losses = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]


def run(tmp_path, name, recipe=None, resume=False, callbacks=None):
    recipe = recipe or make_recipe()
    teacher, student = make_models()
    edgerazor.quantize(student, recipe)
    log = LossLog()
    trainer = distill(teacher, student, make_dataset(), recipe, tmp_path / name, collate, resume=resume,
                      callbacks=[log, *(callbacks or [])], disable_tqdm=True)
    return log.losses, trainer


class StopAt(TrainerCallback):
    """Simulates a kill: raise right after the checkpoint of ``step`` was saved."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_logs_every_term_lambda_and_layers(tmp_path):
    losses, trainer = run(tmp_path, "a", make_recipe(max_steps=2, save_steps=100))
    entry = next(h for h in trainer.state.log_history if "loss" in h)
    for key in ("loss_task", "loss_feature", "loss_logit", "loss_fkl", "loss_rkl", "kl_forward_weight", "lafd_layers"):
        assert key in entry
    assert len(entry["lafd_layers"].split(",")) == 3
    recomputed = 0.5 * entry["loss_task"] + 1.0 * entry["loss_feature"] + 2.0 * entry["loss_logit"]
    assert entry["loss"] == pytest.approx(recomputed, rel=1e-5)
    assert 0 <= entry["kl_forward_weight"] <= 1
    assert entry["loss_fkl"] + entry["loss_rkl"] == pytest.approx(entry["loss_logit"], rel=1e-6)


def test_teacher_is_frozen_and_never_sees_labels(tmp_path):
    teacher, student = make_models()
    recipe = make_recipe(max_steps=1, save_steps=100)
    edgerazor.quantize(student, recipe)
    seen = []
    teacher.register_forward_pre_hook(lambda m, a, kw: seen.append(set(kw)), with_kwargs=True)
    before = [p.clone() for p in teacher.parameters()]
    trainer = distill(teacher, student, make_dataset(), recipe, tmp_path / "t", collate, disable_tqdm=True)
    assert seen and all("labels" not in kw for kw in seen)
    assert not trainer.teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    full, _ = run(tmp_path, "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "killed", callbacks=[StopAt(4)])
    assert latest_checkpoint(tmp_path / "killed").name == "checkpoint-4"
    resumed, _ = run(tmp_path, "killed", resume=True)
    assert sorted(resumed) == [5, 6]
    for step in (5, 6):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7)


def test_kill_during_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    full, _ = run(tmp_path, "full")
    original = DistillationTrainer._save_optimizer_and_scheduler

    def crash_at_4(self, output_dir):
        if self.state.global_step == 4:
            raise KeyboardInterrupt  # killed after the weights, before optimizer state and marker
        return original(self, output_dir)

    monkeypatch.setattr(DistillationTrainer, "_save_optimizer_and_scheduler", crash_at_4)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "crash")
    monkeypatch.undo()
    half = tmp_path / "crash" / "checkpoint-4"
    assert half.is_dir() and not (half / COMPLETE_MARKER).exists()
    assert latest_checkpoint(tmp_path / "crash").name == "checkpoint-2"
    assert (tmp_path / "crash" / "checkpoint-2" / "recipe.yaml").is_file()
    resumed, _ = run(tmp_path, "crash", resume=True)
    assert resumed[6] == pytest.approx(full[6], rel=1e-6, abs=1e-7)
    # the checkpoint carries the allocation: reload it as a quantized model with its masks
    model, _ = edgerazor.load(tmp_path / "crash" / "checkpoint-6")
    assert model.model.layers[0].mlp.up_proj.weight_quant.precision_mask.float().mean() == pytest.approx(1 / 8)


def test_kv8_stays_on_with_gradient_checkpointing(tmp_path):
    calls = []
    orig = KVFakeQuant.forward

    def counting(self, x):
        calls.append(self.enabled)
        return orig(self, x)

    KVFakeQuant.forward = counting
    try:
        plain, _ = run(tmp_path, "plain", make_recipe(max_steps=1, save_steps=100))
        n_plain = len(calls)
        ckpt, trainer = run(tmp_path, "ckpt", make_recipe(max_steps=1, save_steps=100, gradient_checkpointing=True))
    finally:
        KVFakeQuant.forward = orig
    assert trainer.model.is_activation_checkpointing
    assert n_plain > 0 and len(calls) > 2 * n_plain - n_plain  # KV quantizers ran in the checkpointed run too
    assert all(calls)
    assert ckpt[1] == pytest.approx(plain[1], rel=1e-6)


def test_extra_loss_plugin_and_vocab_mismatch(tmp_path):
    class Extra:
        @hookimpl
        def register_losses(self, register):
            register("mean_logit", lambda s, t, batch: s.logits.float().mean() ** 2)

    system = get_plugins()
    system.pm.register(Extra(), name="extra-test")
    system.registries = system._collect()
    try:
        recipe = recipe_from_dict({"quant": {"weight": {"group_size": 64}},
                                   "train": {"max_steps": 1, "save_steps": 100, "logging_steps": 1,
                                             "per_device_batch_size": 4},
                                   "distill": {"extra_losses": {"mean_logit": 3.0}}})
        _, trainer = run(tmp_path, "x", recipe)
        entry = next(h for h in trainer.state.log_history if "loss" in h)
        assert "loss_mean_logit" in entry
        d = recipe.distill
        expected = (d.alpha_task * entry["loss_task"] + d.alpha_feature * entry["loss_feature"]
                    + d.alpha_logit * entry["loss_logit"] + 3.0 * entry["loss_mean_logit"])
        assert entry["loss"] == pytest.approx(expected, rel=1e-5)
    finally:
        system.pm.unregister(name="extra-test")
        system.registries = system._collect()

    teacher = Qwen3ForCausalLM(tiny_qwen3_config(vocab_size=640))
    _, student = make_models()
    with pytest.raises(ValueError, match="vocabularies differ"):
        distill(teacher, student, make_dataset(), make_recipe(), tmp_path / "v", collate)
