"""``train.deepspeed`` / ``edgerazor run --deepspeed``: a ZeRO-2 student on 2 CPU ranks (gloo) trains like one
process; the shipped configs and the teacher's placement; a rank-0 failure stops every rank
(tests/test_deepspeed_scale.py: ZeRO-3, the sharded teacher, launchers, kill and resume)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgerazor.cli import main
from tests.helpers import tiny_run_recipe

ROOT = Path(__file__).resolve().parent.parent
ZERO2 = ROOT / "configs" / "deepspeed" / "zero2.json"

# Distils the teacher for the recipe's steps; rank 0 writes the logged per-step losses and the engine used.
DRIVER = '''
import copy, json, sys
from pathlib import Path
from transformers import TrainerCallback
import edgerazor
from edgerazor.distill import distill
from edgerazor.recipe import load_recipe
from edgerazor.run import load_inputs

recipe_path, teacher, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
recipe = load_recipe(Path(recipe_path), sys.argv[4:])
inputs = load_inputs(recipe, teacher)
inputs.teacher.float()
student = copy.deepcopy(inputs.teacher)
edgerazor.quantize(student, recipe, adapter=inputs.adapter)
losses = {}

class Losses(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            losses[state.global_step] = logs["loss"]

trainer = distill(inputs.teacher, student, inputs.train_dataset, recipe, out / "checkpoints",
                  inputs.adapter.collator(inputs.tokenizer), adapter=inputs.adapter, callbacks=[Losses()],
                  disable_tqdm=True)
engine = trainer.model_wrapped
if trainer.args.process_index == 0:
    (out / "losses.json").write_text(json.dumps({
        "world_size": trainer.args.world_size, "losses": losses, "engine": type(engine).__name__,
        "zero_stage": engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None}))
'''


def _deepspeed_importable() -> bool:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-c", "import deepspeed"], env=env, capture_output=True, timeout=300).returncode == 0


def _recipe(teacher_dir: Path, tmp_path: Path) -> Path:
    return tiny_run_recipe(teacher_dir, tmp_path / "tiny.yaml", max_steps=3, per_device_batch_size=2, save_steps=100,
                           warmup_ratio=0.0)


def _train(cmd: list[str], out: Path) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((out / "losses.json").read_text())


@pytest.mark.slow
def test_zero2_on_two_cpu_ranks_matches_one_process_with_the_double_batch(teacher_dir, tmp_path):
    """2 ranks x micro-batch 2 under ZeRO-2 == 1 process x batch 4 without DeepSpeed, step by step.

    The rows agree by construction: accelerate hands rank r the r-th consecutive batch of the same
    seeded shuffle, so one step of 2 ranks x 2 reads the rows one process reads at batch 4. The packed
    text blocks all hold the same number of response tokens, so the mean over ranks of each rank's loss
    is the single-process loss. float32; tolerance rtol 1e-5 (reduction order only)."""
    if shutil.which("torchrun") is None or not _deepspeed_importable():
        pytest.skip("needs torchrun and an importable deepspeed (DS_ACCELERATOR=cpu)")
    recipe = _recipe(teacher_dir, tmp_path)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    ranks = _train(["torchrun", "--nproc_per_node", "2", "--master_port", "29631", str(driver), str(recipe),
                    str(teacher_dir), str(tmp_path / "zero2"), f"train.deepspeed={ZERO2}"], tmp_path / "zero2")
    single = _train([sys.executable, str(driver), str(recipe), str(teacher_dir), str(tmp_path / "one"),
                     "train.per_device_batch_size=4"], tmp_path / "one")
    assert ranks["world_size"] == 2 and ranks["engine"] == "DeepSpeedEngine" and ranks["zero_stage"] == 2
    assert single["world_size"] == 1 and single["engine"] != "DeepSpeedEngine"
    assert list(ranks["losses"]) == list(single["losses"]) == ["1", "2", "3"]
    steps = list(single["losses"])
    assert [ranks["losses"][s] for s in steps] == pytest.approx([single["losses"][s] for s in steps], rel=1e-5)
    assert single["losses"]["3"] < single["losses"]["1"]  # it trains: a wrong update would not match step 2-3


def test_shipped_zero2_config_leaves_batch_and_clipping_to_the_recipe():
    config = json.loads(ZERO2.read_text())
    assert config["zero_optimization"]["stage"] == 2
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert config[key] == "auto"
    assert config["bf16"]["enabled"] == "auto"
    assert "optimizer" not in config and "scheduler" not in config  # the Trainer's AdamW and schedule


@pytest.mark.parametrize("content, message", [
    (None, "DeepSpeed config"), ("{not json", "is not valid JSON"), ("[1, 2]", "must be a JSON object, not list"),
])
def test_missing_or_invalid_deepspeed_config_is_a_one_line_error(teacher_dir, tmp_path, capsys, content, message):
    config = tmp_path / "ds.json"
    if content is not None:
        config.write_text(content)
    out = tmp_path / "out"
    assert main(["run", "--recipe", str(_recipe(teacher_dir, tmp_path)), "--teacher", str(teacher_dir),
                 "--output", str(out), "--deepspeed", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgerazor: error:") and message in err and str(config) in err
    assert len(err.splitlines()) == 1
    assert not out.exists()  # checked before the output folder or the teacher is touched


ZERO3 = ROOT / "configs" / "deepspeed" / "zero3.json"
ZERO2_TEACHER3 = ROOT / "configs" / "deepspeed" / "zero2-teacher-zero3.json"


def test_teacher_placement_follows_the_config():
    """ZeRO-3 student: the teacher is sharded alike; ZeRO-2: replicated unless the config's own "teacher"
    section asks for stage 3; the teacher's inference config has no optimizer and no "auto" left."""
    from edgerazor.distill.placement import teacher_placement

    assert teacher_placement(None, 2, 128).kind == "replicated"
    assert teacher_placement(ZERO2, 2, 128).kind == "replicated"
    for path in (ZERO3, ZERO2_TEACHER3):
        placement = teacher_placement(path, 3, 128, "bfloat16")
        assert placement.sharded
        config = placement.config
        assert config["zero_optimization"]["stage"] == 3 and config["train_micro_batch_size_per_gpu"] == 3
        assert config["gradient_accumulation_steps"] == 1 and config["bf16"] == {"enabled": True}
        assert "optimizer" not in config and "teacher" not in config and "gradient_clipping" not in config
        assert "auto" not in json.dumps(config)
        assert config["zero_optimization"]["stage3_param_persistence_threshold"] == 1280  # 10 x hidden
        assert config["zero_optimization"]["stage3_prefetch_bucket_size"] == int(0.9 * 128 * 128)


def test_the_student_engine_never_sees_the_teacher_section():
    from edgerazor.distill.trainer import deepspeed_config

    student = deepspeed_config(ZERO2_TEACHER3)
    assert "teacher" not in student and student["zero_optimization"]["stage"] == 2
    assert json.loads(ZERO3.read_text())["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("teacher, message", [
    ("[1]", "\"teacher\" must be a JSON object"),
    ('{"zero_optimization": {"stage": 2}}', "teacher.zero_optimization.stage is 2"),
])
def test_a_bad_teacher_section_is_a_one_line_error(teacher_dir, tmp_path, capsys, teacher, message):
    config = tmp_path / "ds.json"
    config.write_text('{"zero_optimization": {"stage": 2}, "teacher": ' + teacher + "}")
    out = tmp_path / "out"
    assert main(["run", "--recipe", str(_recipe(teacher_dir, tmp_path)), "--teacher", str(teacher_dir),
                 "--output", str(out), "--deepspeed", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgerazor: error:") and message in err and str(config) in err
    assert not out.exists()


def test_a_rank_0_failure_stops_every_rank_with_its_message(teacher_dir, tmp_path):
    """Only rank 0 prepares the output folder; when it refuses (here: an occupied folder), rank 1 is told
    and stops with the same message instead of waiting in a barrier."""
    if shutil.which("torchrun") is None:
        pytest.skip("needs torchrun")
    out = tmp_path / "occupied"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    from tests.helpers import console_script

    proc = subprocess.run(["torchrun", "--nproc_per_node", "2", "--master_port", "29661", console_script(), "run",
                           "--recipe", str(_recipe(teacher_dir, tmp_path)), "--teacher", str(teacher_dir),
                           "--output", str(out)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("edgerazor: error:")]
    assert len(lines) == 2, proc.stderr[-3000:]
    assert any("already holds files" in line and "rank 0 failed" not in line for line in lines)
    assert any("rank 0 failed" in line and "already holds files" in line for line in lines)
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
