"""Console output: no transformers progress bars where EdgeRazor loads or saves, and log lines as numbers."""

from __future__ import annotations

import copy

import datasets
import torch
from huggingface_hub.utils import are_progress_bars_disabled
from transformers import Qwen3ForCausalLM
from transformers.utils import logging as hf_logging

import edgerazor
from edgerazor.distill import distill
from edgerazor.distill.console import format_log_line
from edgerazor.progress import library_bars_off
from edgerazor.recipe import recipe_from_dict
from tests.helpers import tiny_qwen3_config

RECIPE = {"quant": {"weight": {"group_size": 64}},
          "train": {"max_steps": 2, "logging_steps": 1, "save_steps": 2, "per_device_batch_size": 4}}


def test_load_and_save_show_no_transformers_bars(tmp_path, capfd):
    model = Qwen3ForCausalLM(tiny_qwen3_config())
    edgerazor.quantize(model, RECIPE)
    model.save_pretrained(tmp_path / "plain")
    assert "Writing model shards" in capfd.readouterr().err  # what the wrapper must hide
    rows = datasets.Dataset.from_list([{"x": i} for i in range(4)])
    rows.save_to_disk(tmp_path / "rows")
    assert "Saving the dataset" in capfd.readouterr().err
    with library_bars_off():
        model.save_pretrained(tmp_path / "quiet")
        rows.save_to_disk(tmp_path / "rows-quiet")
        assert not hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()  # downloads keep theirs
    err = capfd.readouterr().err
    assert "Writing model shards" not in err and "Saving the dataset" not in err
    assert hf_logging.is_progress_bar_enabled() and datasets.is_progress_bar_enabled()  # back on afterwards
    edgerazor.load(tmp_path / "quiet")
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()


def test_log_line_formats_numbers():
    logs = {"loss": 4.213456, "grad_norm": torch.tensor(1.25), "learning_rate": 0.0009, "epoch": 0.3,
            "lafd_layers": "1,2", "lafd_layer_1": 1.0, "lafd_layer_2": 0.5, "total_flos": 3.0, "kept": 7}
    assert format_log_line(logs, 3, 10) == (
        "step 3/10 | loss 4.213 | grad_norm 1.25 | lr 9.00e-04 | epoch 0.30 | kept 7 | lafd 1:1 2:0.5")


def test_trainer_prints_numbers_and_saves_without_bars(tmp_path, capfd):
    torch.manual_seed(0)
    teacher = Qwen3ForCausalLM(tiny_qwen3_config())
    student = copy.deepcopy(teacher)
    recipe = recipe_from_dict(RECIPE)
    edgerazor.quantize(student, recipe)
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 512, (8, 16), generator=g).tolist()]

    def collate(batch):
        return {k: torch.tensor([r[k] for r in batch]) for k in ("input_ids", "labels")}

    trainer = distill(teacher, student, datasets.Dataset.from_list(rows), recipe, tmp_path / "run", collate,
                      disable_tqdm=True)
    out, err = capfd.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    first = next(h for h in trainer.state.log_history if "loss_logit" in h)
    assert lines[0].startswith(f"step 1/2 | loss {first['loss']:.4g} | ") and "'" not in lines[0]
    assert f"loss_logit {first['loss_logit']:.4g}" in lines[0] and " lafd " in lines[0]
    assert "Writing model shards" not in err and (tmp_path / "run" / "checkpoint-2").is_dir()
