"""``edgerazor run`` on 2 CPU ranks (torchrun, gloo, DS_ACCELERATOR=cpu) against one process.

ZeRO-3 student and teacher, and a ZeRO-2 student beside a ZeRO-3 teacher: the same per-step losses as one
process with the double micro-batch, each rank holding about half of the teacher, the consolidated
student exporting to the same packed codes, the measured model states against ``plan``, and a run
killed mid-training resumed to the losses of an uninterrupted one. Only rank 0 writes the run folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edgerazor.plan import resident_model_state_bytes
from tests.helpers import console_script, tiny_run_recipe

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "deepspeed"
pytestmark = pytest.mark.slow
FALLBACK = "using the unfused logit loss"


def _needs_launcher() -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    if shutil.which("torchrun") is None or subprocess.run(
            [sys.executable, "-c", "import deepspeed"], env=env, capture_output=True, timeout=300).returncode:
        pytest.skip("needs torchrun and an importable deepspeed (DS_ACCELERATOR=cpu)")


def _env() -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "COLUMNS": "200",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _command(out: Path, recipe: Path, teacher: Path, ranks: int, port: int, *extra: str) -> list[str]:
    run = [console_script(), "run", "--recipe", str(recipe), "--teacher", str(teacher), "--output", str(out), *extra]
    if ranks == 1:
        return run
    return ["torchrun", "--nproc_per_node", str(ranks), "--master_port", str(port), *run]


def _run(cmd: list[str], out: Path) -> tuple[dict, str]:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((out / "results.json").read_text()), proc.stdout + proc.stderr


def _export(source: Path, out: Path) -> dict[str, torch.Tensor]:
    proc = subprocess.run([console_script(), "export", str(source), "--format", "packed", "--out", str(out)],
                          env=_env(), capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(out / "model.safetensors")


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _losses(results: dict) -> list[float]:
    return [p["loss"] for p in results["train_loss"]]


@pytest.fixture(scope="module")
def one_process(teacher_dir, tmp_path_factory):
    """The reference: one process, micro-batch 4, no DeepSpeed; and its packed export."""
    _needs_launcher()
    root = tmp_path_factory.mktemp("scale")
    recipe = tiny_run_recipe(teacher_dir, root / "tiny.yaml", max_steps=3, per_device_batch_size=2, save_steps=100,
                             warmup_ratio=0.0, lr_scheduler="constant")
    out = root / "one"
    results, _ = _run(_command(out, recipe, teacher_dir, 1, 0, "--set", "train.per_device_batch_size=4"), out)
    return {"root": root, "recipe": recipe, "results": results, "packed": _export(out, root / "one-packed")}


def _same_training(ranks: dict, one: dict) -> None:
    """2 ranks x 2 == 1 x 4: the rows agree by construction (rank r reads the r-th consecutive batch of the
    same seeded shuffle), so only the reduction order differs: rtol 1e-5 on losses and perplexities."""
    assert [p["step"] for p in ranks["train_loss"]] == [p["step"] for p in one["train_loss"]] == [1, 2, 3]
    assert _losses(ranks) == pytest.approx(_losses(one), rel=1e-5)
    assert _losses(one)[-1] < _losses(one)[0]  # it trains: a wrong update would not match steps 2-3
    for key in ("teacher_ppl", "rtn_ppl", "student_ppl"):
        assert ranks[key] == pytest.approx(one[key], rel=1e-5), key


def _same_codes(packed: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> int:
    """Integer tensors (codes, masks) bit-exact, floating ones (norms, scales) within the training's 1e-5."""
    assert set(packed) == set(reference)
    codes = 0
    for name, tensor in reference.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(packed[name], tensor, rtol=1e-4, atol=1e-4, msg=name)
        else:
            assert torch.equal(packed[name], tensor), name
            codes += 1
    return codes


def _teacher_halved(memory: dict) -> None:
    """Each rank holds about half of the teacher's parameters (small, persistent ones are whole on both)."""
    whole = memory["teacher_whole"]
    assert len(memory["teacher_parameters"]) == 2
    for held in memory["teacher_parameters"]:
        assert 0.45 * whole <= held <= 0.56 * whole, (held, whole)


def _states_match_plan(memory: dict, zero: int) -> None:
    """Measured per-rank student parameters, fp32 master partition and Adam moments against plan's resident
    model states for float32 parameters: within 5% (DeepSpeed pads partitions; under ZeRO-3 the parameters
    below the persistence threshold stay whole on every rank)."""
    params = memory["student_whole"] // 4
    expected = resident_model_state_bytes(params, 2, zero, param_bytes=4)
    for key, value in expected.items():
        for measured in memory[key]:
            assert measured == pytest.approx(value, rel=0.05), (key, measured, value)


def test_zero3_student_and_sharded_teacher_match_one_process(teacher_dir, one_process):
    root = one_process["root"]
    out = root / "zero3"
    results, log = _run(_command(out, one_process["recipe"], teacher_dir, 2, 29651,
                                 "--deepspeed", str(CONFIGS / "zero3.json")), out)
    assert results["ranks"]["world_size"] == 2 and results["ranks"]["teacher"] == "zero3"
    assert results["ranks"]["student_zero3"] is True
    _same_training(results, one_process["results"])
    memory = results["ranks"]["bytes"]
    _teacher_halved(memory)
    _states_match_plan(memory, 3)
    # the student rank 0 saved is the gathered one: the same packed codes as the one-process student
    assert _same_codes(_export(out, root / "zero3-packed"), one_process["packed"]) > 30
    # and so is the Trainer's checkpoint (consolidated at save: stage3_gather_16bit_weights_on_model_save)
    checkpoint = out / "checkpoints" / "checkpoint-3"
    assert (checkpoint / "edgerazor_checkpoint_complete").is_file()
    assert _same_codes(_export(checkpoint, root / "zero3-ckpt-packed"), one_process["packed"]) > 30
    assert log.count("loading teacher") == 1  # rank 0 alone reports (and writes)
    assert FALLBACK in log  # the fused head is refused under a ZeRO-3 student, with its reason
    print("zero3 bytes per rank:", json.dumps(memory))


def test_zero2_student_beside_a_zero3_teacher_matches_one_process(teacher_dir, one_process):
    """The 7B pair's combination: two DeepSpeed engines of different stages in one process."""
    root = one_process["root"]
    out = root / "zero2-t3"
    results, log = _run(_command(out, one_process["recipe"], teacher_dir, 2, 29652,
                                 "--deepspeed", str(CONFIGS / "zero2-teacher-zero3.json")), out)
    assert results["ranks"]["teacher"] == "zero3" and results["ranks"]["student_zero3"] is False
    _same_training(results, one_process["results"])
    memory = results["ranks"]["bytes"]
    _teacher_halved(memory)
    _states_match_plan(memory, 2)
    assert FALLBACK not in log  # the fused loss reads the sharded teacher's head through a gather
    assert _same_codes(_export(out, root / "zero2-t3-packed"), one_process["packed"]) > 30
    print("zero2 + zero3 teacher bytes per rank:", json.dumps(memory))


def test_a_two_rank_run_killed_mid_training_resumes_to_the_same_losses(teacher_dir, tmp_path):
    """Killed (SIGKILL to both ranks and the launcher) once a checkpoint is committed, then
    ``--resume``: every step's loss equals an uninterrupted one-process run's (rtol 1e-5)."""
    _needs_launcher()
    recipe = tiny_run_recipe(teacher_dir, tmp_path / "tiny.yaml", max_steps=14, per_device_batch_size=2,
                             save_steps=2, warmup_ratio=0.0, lr_scheduler="constant")
    one, _ = _run(_command(tmp_path / "one", recipe, teacher_dir, 1, 0, "--set", "train.per_device_batch_size=4"),
                  tmp_path / "one")
    out = tmp_path / "killed"
    cmd = _command(out, recipe, teacher_dir, 2, 29653, "--deepspeed", str(CONFIGS / "zero3.json"))
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "checkpoints" / "checkpoint-2" / "edgerazor_checkpoint_complete"
    deadline = time.monotonic() + 240
    try:
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        for pid in [*_descendants(proc.pid), proc.pid]:  # the ranks (own sessions) first, then torchrun
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=60)
    assert marker.exists(), "the run ended or stalled before its first checkpoint"
    assert not (out / "results.json").exists(), "the run finished before it could be killed"
    done = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*")
                  if (p / "edgerazor_checkpoint_complete").is_file())
    assert done and done[-1] < 14
    time.sleep(2)  # the ranks are gone: no checkpoint beyond the one being written when they were killed
    assert max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*")) <= done[-1] + 2
    resumed, log = _run(["torchrun", "--nproc_per_node", "2", "--master_port", "29654", console_script(), "run",
                         "--resume", "--output", str(out)], out)
    assert f"resuming from checkpoint-{done[-1]}" in " ".join(log.split())
    assert [p["step"] for p in resumed["train_loss"]] == list(range(1, 15))
    assert _losses(resumed) == pytest.approx(_losses(one), rel=1e-5)
    assert resumed["student_ppl"] == pytest.approx(one["student_ppl"], rel=1e-5)


@pytest.mark.parametrize("launcher", ["deepspeed", "accelerate"])
def test_the_deepspeed_and_accelerate_launchers_train_alike(teacher_dir, one_process, launcher):
    """The same run under ``deepspeed`` and ``accelerate launch`` (ZeRO-2 student, ZeRO-3 teacher)."""
    if shutil.which(launcher) is None:
        pytest.skip(f"needs the {launcher} launcher")
    out = one_process["root"] / f"by-{launcher}"
    port = {"deepspeed": "29655", "accelerate": "29656"}[launcher]
    start = {"deepspeed": ["deepspeed", "--num_gpus", "2", "--no_local_rank", "--master_port", port],
             "accelerate": ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port,
                            "--no_python"]}[launcher]
    results, log = _run([*start, *_command(out, one_process["recipe"], teacher_dir, 1, 0, "--deepspeed",
                                           str(CONFIGS / "zero2-teacher-zero3.json"))], out)
    assert results["ranks"]["world_size"] == 2 and results["ranks"]["teacher"] == "zero3"
    _same_training(results, one_process["results"])
    assert "is deprecated" not in log  # DeepSpeed's calls of torch's old collective names are not repeated


def test_plain_torchrun_without_deepspeed_is_data_parallel(teacher_dir, one_process):
    """No DeepSpeed: DDP over gloo. On CPU the Trainer would otherwise let every rank train alone as world
    size 1 (step 1's loss would then be that of 2 rows, not 4)."""
    out = one_process["root"] / "ddp"
    results, _ = _run(_command(out, one_process["recipe"], teacher_dir, 2, 29657), out)
    assert results["ranks"]["world_size"] == 2 and results["ranks"]["teacher"] == "replicated"
    _same_training(results, one_process["results"])
