"""``edgerazor run``'s output folder: refusals, --overwrite, --resume against a changed recipe, checks
before any weights load, and file modes."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from transformers import Qwen3Config

from edgerazor.cli import main
from edgerazor.errors import EdgeRazorError, OutputExistsError, QuantizationError
from edgerazor.run import run_command
from edgerazor.run_folder import SAFE_RESUME_CHANGES, check_resume, prepare_output, recipe_changes
from tests.helpers import tiny_qwen3_config, tiny_run_recipe

from tests.helpers import TINY_TEXT as TEXT


def recipe_file(tmp_path, teacher_dir, **train):
    return tiny_run_recipe(teacher_dir, tmp_path / "tiny.yaml",
                           **{"max_steps": 2, "per_device_batch_size": 4, "save_steps": 1, **train})


# -------------------------------------------------------------------------------------- units


def test_recipe_changes_name_every_dotted_key():
    old = {"train": {"max_steps": 2, "learning_rate": 1e-3}, "quant": {"weight": {"rho": 0.125}}, "data": {"sources": [1]}}
    new = {"train": {"max_steps": 5, "learning_rate": 1e-3}, "quant": {"weight": {"rho": 0.5}}, "data": {"sources": [2]}}
    assert recipe_changes(old, new) == {"data.sources": ([1], [2]), "quant.weight.rho": (0.125, 0.5),
                                        "train.max_steps": (2, 5)}
    assert "train.max_steps" in SAFE_RESUME_CHANGES and "train.learning_rate" not in SAFE_RESUME_CHANGES


def test_a_folder_that_is_not_a_run_is_never_replaced(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="already holds files; pass --resume"):
        prepare_output(folder, {}, resume=False, overwrite=False)
    with pytest.raises(OutputExistsError, match="is not a previous EdgeRazor run"):
        prepare_output(folder, {}, resume=False, overwrite=True)
    assert (folder / "notes.txt").read_text() == "precious" and sorted(os.listdir(tmp_path)) == ["mine"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputExistsError, match="exists and is not a folder"):
        prepare_output(tmp_path / "afile", {}, resume=False, overwrite=True)
    assert prepare_output(tmp_path / "new", {}, resume=False, overwrite=False).replaced is None


def test_overwrite_moves_a_previous_run_aside_and_restores_it_on_failure(tmp_path):
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"teacher": "t", "adapter": "qwen3"}))
    plan = prepare_output(folder, {}, resume=False, overwrite=True)
    assert not folder.exists() and (plan.replaced / "run.json").is_file()
    folder.mkdir()
    (folder / "partial").write_text("half a new run")
    plan.abort()  # the new run failed: its files go, the old run is back
    assert sorted(os.listdir(folder)) == ["checkpoints", "run.json"] and len(os.listdir(tmp_path)) == 1
    plan = prepare_output(folder, {}, resume=False, overwrite=True)
    folder.mkdir()
    plan.finish()  # the new run completed: the old one is gone
    assert os.listdir(tmp_path) == ["run"]


def test_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(EdgeRazorError, match="does not exist"):
        prepare_output(tmp_path / "none", {}, resume=True, overwrite=False)
    (tmp_path / "run").mkdir()
    with pytest.raises(EdgeRazorError, match="has no complete checkpoint"):
        check_resume(tmp_path / "run", {}, accept_changes=False)


# -------------------------------------------------------------------------------------- runs


def test_group_size_is_checked_before_any_weights_load(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    Qwen3Config(**tiny_qwen3_config().to_dict()).save_pretrained(teacher)  # a config, no weights, no tokenizer
    (tmp_path / "c.txt").write_text(TEXT)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"quant": {"weight": {"group_size": 96}},
                                      "data": {"sources": [{"path": str(tmp_path / "c.txt")}], "eval_fraction": 0.1}}))
    with pytest.raises(QuantizationError, match="group size 96 does not divide its input dimension 128"):
        run_command(recipe, str(teacher), None, [], tmp_path / "out", False)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_resume_refuses_changes_it_cannot_honour_and_accepts_safe_ones(teacher_dir, tmp_path, capsys):
    recipe = recipe_file(tmp_path, teacher_dir)
    out = tmp_path / "out"
    old_umask = os.umask(0o027)
    try:
        assert main(["run", "--recipe", str(recipe), "--teacher", str(teacher_dir), "--output", str(out)]) == 0
    finally:
        os.umask(old_umask)
    # files follow the umask (safetensors alone would be 0600)
    assert (out / "student" / "model.safetensors").stat().st_mode & 0o777 == 0o640
    assert (out / "checkpoints" / "checkpoint-2" / "model.safetensors").stat().st_mode & 0o777 == 0o640
    assert json.loads((out / "run.json").read_text()) == {"teacher": str(teacher_dir), "adapter": "qwen3"}
    capsys.readouterr()

    def run(*args):
        code = main(["run", "--output", str(out), *args])
        return code, capsys.readouterr().err

    # a rerun into the folder without --resume or --overwrite is refused; nothing of the run is lost
    code, err = run("--recipe", str(recipe), "--teacher", str(teacher_dir))
    assert code == 2 and "already holds files; pass --resume" in err
    # a changed learning rate or allocation cannot continue this checkpoint
    code, err = run("--recipe", str(recipe), "--resume", "--set", "train.learning_rate=5e-3",
                    "--set", "quant.weight.allocation=random")
    assert code == 2 and "cannot continue with changed quant.weight.allocation" in err and "train.learning_rate" in err
    # more steps are safe, but only when accepted
    code, err = run("--recipe", str(recipe), "--resume", "--set", "train.max_steps=3")
    assert code == 2 and "pass --accept-changes" in err and "train.max_steps (2 -> 3)" in err
    code, err = run("--resume", "--accept-changes", "--recipe", str(recipe), "--set", "train.max_steps=3")
    assert code == 0, err
    assert "resuming" in err and "checkpoint-2" in err
    results = json.loads((out / "results.json").read_text())
    assert results["train_steps"] == 3 and results["recipe"]["train"]["max_steps"] == 3
    # a bare --resume finds the run's own recipe and teacher (nothing changed: nothing to accept)
    code, err = run("--resume")
    assert code == 0, err
    assert "checkpoint-3" in err
    # --overwrite replaces the previous run (and only because it is one)
    code, err = run("--recipe", str(recipe), "--teacher", str(teacher_dir), "--overwrite")
    assert code == 0, err
    assert json.loads((out / "results.json").read_text())["train_steps"] == 2
    assert not list(tmp_path.glob(".out.replaced-*"))


def test_a_missing_teacher_is_one_line_before_anything_else(tmp_path, capsys):
    (tmp_path / "c.txt").write_text(TEXT)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"sources": [{"path": str(tmp_path / "c.txt")}], "eval_fraction": 0.1}}))
    code = main(["run", "--recipe", str(recipe), "--teacher", str(tmp_path / "no-teacher"), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"edgerazor: error: model directory '{tmp_path / 'no-teacher'}' does not exist "
                                 "(nor is it a hub id like Qwen/Qwen3-0.6B)"]


def test_kv_group_error_does_not_suggest_padding(tiny_qwen3):
    import edgerazor

    with pytest.raises(QuantizationError) as info:
        edgerazor.quantize(tiny_qwen3, {"quant": {"weight": {"group_size": 64}, "kv_cache": {"group_size": 24}}})
    message = str(info.value)
    assert "quant.kv_cache.group_size 24 does not divide its head_dim 32" in message and "pad" not in message
