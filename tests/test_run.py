"""``edgerazor run`` end to end on a tiny budget: recipe -> distil -> results.json -> edgerazor.load."""

from __future__ import annotations

import json

import pytest
import yaml

import edgerazor
from edgerazor.cli import main
from edgerazor.eval.perplexity import perplexity
from edgerazor.run import builtin_recipe, gap_closure
from edgerazor.quant import QuantLinear
from edgerazor.recipe import load_recipe
from tests.helpers import tiny_run_recipe


@pytest.mark.slow
def test_run_recipe_end_to_end(teacher_dir, tmp_path, capsys):
    path = tiny_run_recipe(teacher_dir, tmp_path / "tiny.yaml", max_steps=3, per_device_batch_size=4, save_steps=2,
                           eval_steps=1)
    out = tmp_path / "out"
    assert main(["run", "--recipe", str(path), "--teacher", str(teacher_dir), "--output", str(out),
                 "--set", "train.max_steps=2"]) == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("teacher_ppl", "rtn_ppl", "student_ppl", "effective_bits", "recipe", "teacher"):
        assert key in results
    assert results["recipe"]["train"]["max_steps"] == 2 and results["train_steps"] == 2
    assert results["effective_bits"] == pytest.approx(1.8825)
    assert results["teacher"] == str(teacher_dir)
    assert results["gap_closure"] == pytest.approx(
        gap_closure(results["teacher_ppl"], results["rtn_ppl"], results["student_ppl"]))
    captured = capsys.readouterr()
    assert "held-out perplexity" in captured.out
    # the data summary: one .txt file is one document, packed into blocks, a quarter held out
    data = results["data"]
    assert data["sources"][0]["records"] == 1 and data["sources"][0]["kept"] == data["sources"][0]["drawn"]
    assert data["train"] + data["eval"] == data["sources"][0]["drawn"] and data["eval"] == round(data["mixture"] / 4)
    assert f"train rows {data['train']}, eval rows {data['eval']}" in captured.err
    # eval_steps=1: held-out perplexity after each step; the last one is the student's
    assert [p["step"] for p in results["eval_perplexity"]] == [1, 2]
    assert results["eval_perplexity"][-1]["perplexity"] == results["student_ppl"]
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    model, tokenizer = edgerazor.load(out / "student")
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    assert tokenizer is not None and len(tokenizer) == model.config.vocab_size
    # the saved student reproduces the reported perplexity (fake quantization, A8 and KV8 active)
    from edgerazor.data import build_datasets

    _, evaluation = build_datasets(load_recipe(out / "recipe.yaml").data, tokenizer)
    assert len(evaluation) == data["eval"]
    assert perplexity(model, evaluation, 4, progress=False) == results["student_ppl"]
    assert not list(out.glob("student.*")), "no temporary save directories left behind"


def test_run_without_teacher_or_eval_split_is_a_clear_error(teacher_dir, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\n")
    assert main(["run", "--recipe", str(path)]) == 2
    assert "no teacher: pass --teacher" in capsys.readouterr().err
    path.write_text(yaml.safe_dump({"data": {"sources": [{"path": str(teacher_dir / "corpus.txt")}]}}))
    assert main(["run", "--recipe", str(path), "--teacher", str(teacher_dir)]) == 2
    assert "data.eval_fraction is 0" in capsys.readouterr().err


def test_builtin_demo_recipe_is_the_papers_sg_a_e_at_1_88_8_8():
    recipe = load_recipe(builtin_recipe("demo"))
    assert recipe.quant.w_a_kv == "1.88-8-8"
    assert (recipe.quant.weight.allocation, recipe.distill.selector, recipe.distill.kl_mixer) == (
        "super_group", "adaptive", "eakld")
