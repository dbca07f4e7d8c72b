"""The offline demo path on a tiny budget: stdlib corpus, tokenizer, cached teacher, RTN, distillation.

The assets are built once per module (a 2-layer, hidden-64 teacher trained for a few steps on a
slice of the standard library) and every test reads them; the end-to-end test also times the path.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import datasets
import matplotlib.image
import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer

import edgerazor
import edgerazor.demo as demo
from edgerazor.cli import main
from edgerazor.demo import collate_blocks, module_name, prepare_demo, split_corpus, stdlib_files
from edgerazor.errors import EdgeRazorError, RecipeError
from edgerazor.eval import perplexity
from edgerazor.recipe import DemoSection, load_recipe
from tests.helpers import REPO


#: configs/demo.yaml's demo section shrunk with --set overrides, as a user would.
TINY_DEMO_OVERRIDES = [
    "demo.corpus.vocab_size=384", "demo.corpus.held_out=[json, csv, textwrap]", "demo.corpus.train_chars=60000",
    "demo.corpus.eval_blocks=12", "demo.teacher.seq_len=64", "demo.teacher.hidden_size=64",
    "demo.teacher.intermediate_size=128", "demo.teacher.num_layers=2", "demo.teacher.num_heads=2",
    "demo.teacher.num_kv_heads=1", "demo.teacher.head_dim=32", "demo.pretrain.steps=4", "demo.pretrain.batch_size=4",
    "demo.pretrain.warmup_steps=1",
]
TINY = load_recipe(REPO / "configs" / "demo.yaml", TINY_DEMO_OVERRIDES).demo
#: configs/demo.yaml scaled to the tiny model: G=64 divides hidden 64 and intermediate 128.
TINY_RECIPE_OVERRIDES = [
    "quant.weight.group_size=64", "train.max_steps=2", "train.per_device_batch_size=4",
    "train.logging_steps=1", "train.save_steps=1", "train.save_total_limit=2", "train.eval_steps=1",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Build the tiny assets twice, counting teacher trainings; yields both results."""
    root = tmp_path_factory.mktemp("cache") / "demo"  # what default_cache_root() is under EDGERAZOR_CACHE
    calls = []
    real = demo.train_teacher

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo, "train_teacher", counting)
        first = prepare_demo(root, TINY, progress=False)
        entry_mtime = first.cache_dir.stat().st_mtime_ns
        weights_mtime = (first.teacher_dir / "model.safetensors").stat().st_mtime_ns
        second = prepare_demo(root, TINY, progress=False)
    return {
        "root": root, "first": first, "second": second, "calls": calls,
        "entry_mtime": entry_mtime, "weights_mtime": weights_mtime,
    }


def test_cache_is_reused(built):
    first, second = built["first"], built["second"]
    assert not first.from_cache and second.from_cache
    assert len(built["calls"]) == 1, "the second prepare_demo retrained the teacher"
    assert second.cache_dir == first.cache_dir and second.cache_dir.parent == built["root"]
    assert second.cache_dir.stat().st_mtime_ns == built["entry_mtime"]
    assert (second.teacher_dir / "model.safetensors").stat().st_mtime_ns == built["weights_mtime"]
    assert second.teacher_ppl == first.teacher_ppl
    assert second.train_dataset["input_ids"] == first.train_dataset["input_ids"]
    # only the finished entry is left: the temporary build directory was renamed into place
    assert [p.name for p in built["root"].iterdir()] == [first.cache_dir.name]
    meta = json.loads((first.cache_dir / "meta.json").read_text())
    assert meta["settings"] == TINY.model_dump(mode="json") and meta["teacher_ppl"] == first.teacher_ppl


def test_cache_key_follows_the_settings(built):
    corpus = split_corpus(TINY)
    assert demo.cache_key(TINY, corpus) == built["first"].cache_dir.name
    # the same settings reached another way (a fresh parse) give the same key: the cache is reused
    again = load_recipe(REPO / "configs" / "demo.yaml", TINY_DEMO_OVERRIDES).demo
    assert demo.cache_key(again, corpus) == demo.cache_key(TINY, corpus)
    for change in ({"pretrain": {"steps": 5}}, {"teacher": {"num_layers": 1}}, {"corpus": {"eval_blocks": 11}},
                   {"pretrain": {"learning_rate": 1e-3}}, {"seed": 1}):
        other = DemoSection.model_validate(_merged(TINY.model_dump(), change))
        assert demo.cache_key(other, split_corpus(other)) != demo.cache_key(TINY, corpus), change


def _merged(base: dict, change: dict) -> dict:
    return {k: _merged(v, change[k]) if isinstance(v, dict) and k in change else change.get(k, v) for k, v in base.items()}


def test_default_settings_hash_as_before_the_recipe_section():
    """The defaults are the teacher every earlier release built: the flat mapping the cache key hashes
    is unchanged, so an existing ~/.cache/edgerazor/demo entry is still found."""
    assert demo.key_settings(DemoSection()) == {
        "hidden_size": 256, "intermediate_size": 768, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
        "head_dim": 64, "seq_len": 256, "vocab_size": 4096,
        "held_out": ["argparse", "csv", "difflib", "fractions", "heapq", "json", "pprint", "shlex", "statistics",
                     "textwrap"],
        "train_chars": None, "eval_blocks": 192, "teacher_steps": 1000, "teacher_lr": 0.002, "teacher_batch_size": 4,
        "teacher_warmup_steps": 50, "teacher_min_lr_ratio": 0.1, "teacher_weight_decay": 0.1, "seed": 0,
    }
    # the built-in recipe spells out exactly these defaults
    assert load_recipe(REPO / "configs" / "demo.yaml").demo == DemoSection()
    assert DemoSection.model_fields["corpus"].annotation.model_fields["vocab_size"].metadata[0].ge == (
        256 + len(demo.SPECIAL_TOKENS))


def test_demo_settings_are_validated_recipe_keys():
    with pytest.raises(RecipeError, match="demo.teacher.layers: unknown key; allowed here: .*num_layers"):
        load_recipe(REPO / "configs" / "demo.yaml", ["demo.teacher.layers=2"])
    with pytest.raises(RecipeError, match="multiple of num_kv_heads"):
        load_recipe(REPO / "configs" / "demo.yaml", ["demo.teacher.num_kv_heads=3"])
    with pytest.raises(ValidationError, match="frozen"):
        TINY.teacher.num_layers = 3


def test_teacher_dir_loads_with_auto_classes(built):
    assets = built["first"]
    model = AutoModelForCausalLM.from_pretrained(assets.teacher_dir)
    tokenizer = AutoTokenizer.from_pretrained(assets.teacher_dir)
    assert model.config.model_type == "qwen3" and type(model).__name__ == "Qwen3ForCausalLM"
    assert model.config.vocab_size == len(tokenizer) == TINY.corpus.vocab_size
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (TINY.teacher.hidden_size, TINY.teacher.num_layers)
    assert tokenizer.eos_token == demo.EOS and tokenizer.pad_token == demo.PAD
    assert model.config.eos_token_id == tokenizer.eos_token_id != tokenizer.pad_token_id == model.config.pad_token_id
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    source = "def f(x):\n    return x's  + 1 # ünïcode\n"
    assert tokenizer.decode(tokenizer(source)["input_ids"]) == source  # byte-level: lossless
    spec = json.loads((assets.teacher_dir / "tokenizer.json").read_text())
    pre = spec["pre_tokenizer"]
    assert [p["type"] for p in pre["pretokenizers"]] == ["Split", "ByteLevel"]
    assert pre["pretokenizers"][0]["pattern"]["Regex"] == demo.QWEN2_PRETOKENIZE_REGEX
    assert spec["model"]["type"] == "BPE"
    # the stored teacher is the one whose perplexity was recorded
    assert perplexity(model, assets.eval_dataset, progress=False) == pytest.approx(assets.teacher_ppl, rel=1e-4)


def test_held_out_modules_are_not_in_the_training_corpus(built):
    corpus = split_corpus(TINY)
    held = set(TINY.corpus.held_out)
    assert corpus.held_out and {module_name(p) for p in corpus.held_out} == held
    assert not {module_name(p) for p in corpus.train} & held
    assert sorted(corpus.train + corpus.held_out) == stdlib_files()  # a partition of the stdlib
    assert not any(p.parts[0] in ("site-packages", "test") or "tests" in p.parts for p in corpus.train)
    meta = built["first"].meta
    assert meta["train_files"] and not {module_name(Path(p)) for p in meta["train_files"]} & held
    assert {module_name(Path(p)) for p in meta["held_out_files"]} == held
    # and the eval blocks really are held-out text, found nowhere in the training blocks
    tokenizer = AutoTokenizer.from_pretrained(built["first"].teacher_dir)
    train_text = "".join(tokenizer.decode(b) for b in built["first"].train_dataset["input_ids"])
    held_text = "".join(corpus.read(p) for p in corpus.held_out)
    for block in built["first"].eval_dataset["input_ids"][:4]:
        probe = max(tokenizer.decode(block).split(demo.EOS), key=len)  # one file's contiguous text
        assert len(probe) > 40 and probe in held_text and probe not in train_text


def test_datasets_are_packed_blocks(built):
    assets = built["first"]
    for ds in (assets.train_dataset, assets.eval_dataset):
        assert isinstance(ds, datasets.Dataset) and {"input_ids", "labels"} <= set(ds.column_names)
        assert all(len(row) == TINY.teacher.seq_len for row in ds["input_ids"])
        assert ds["labels"] == ds["input_ids"]
    assert len(assets.eval_dataset) == TINY.corpus.eval_blocks


def test_perplexity_matches_transformers_loss(built):
    model = AutoModelForCausalLM.from_pretrained(built["first"].teacher_dir).train()
    block = built["first"].eval_dataset.select([0])
    ids = torch.tensor(block["input_ids"])
    with torch.no_grad():
        reference = math.exp(float(model.eval()(input_ids=ids, labels=ids).loss))
    model.train()
    assert perplexity(model, block, progress=False) == pytest.approx(reference, rel=1e-5)
    assert model.training, "perplexity() must restore training mode"
    model.eval()
    perplexity(model, block, progress=False)
    assert not model.training


def test_perplexity_is_token_weighted(built):
    """Ragged rows and masked labels: every predicted token counts once, whatever the batching."""
    model = AutoModelForCausalLM.from_pretrained(built["first"].teacher_dir).eval()
    blocks = built["first"].eval_dataset["input_ids"][:3]
    rows = [
        {"input_ids": blocks[0], "labels": blocks[0]},
        {"input_ids": blocks[1][:20], "labels": [-100] * 10 + blocks[1][10:20]},
        {"input_ids": blocks[2][:41], "labels": blocks[2][:41]},
    ]
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            labels = torch.tensor(row["labels"])
            logits = model(input_ids=ids).logits[0, :-1].double()
            keep = labels[1:] != -100
            nll += float(torch.nn.functional.cross_entropy(logits[keep], labels[1:][keep], reduction="sum"))
            count += int(keep.sum())
    expected = math.exp(nll / count)
    ds = datasets.Dataset.from_list(rows)
    for batch_size in (1, 2, 3):
        assert perplexity(model, ds, batch_size=batch_size, progress=False) == pytest.approx(expected, rel=1e-4)
    assert perplexity(model, rows, batch_size=2, progress=False) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="no token"):
        perplexity(model, [{"input_ids": [1, 2], "labels": [-100, -100]}], progress=False)


def test_demo_recipe_validates():
    recipe = load_recipe(REPO / "configs" / "demo.yaml")
    assert recipe.name == "demo" and recipe.quant.w_a_kv == "1.88-8-8"
    assert recipe.quant.weight.allocation == "super_group" and recipe.quant.weight.rho == 0.125
    assert recipe.distill.selector == "adaptive" and recipe.distill.kl_mixer == "eakld"
    assert recipe.quant.embedding.quantizer == recipe.quant.lm_head.quantizer == "int4"
    g = recipe.quant.weight.group_size
    s = recipe.demo.teacher
    for dim in (s.hidden_size, s.intermediate_size, s.num_heads * s.head_dim):  # every input dim of the teacher
        assert dim % g == 0, f"group size {g} does not divide {dim}"
    assert s.head_dim % (recipe.quant.kv_cache.group_size or s.head_dim) == 0


@pytest.mark.slow
def test_demo_path_end_to_end(built, tmp_path):
    """prepare_demo (cached) -> RTN student -> 2 distillation steps, held-out perplexity after each."""
    from edgerazor.distill import distill

    assets = prepare_demo(built["root"], TINY, progress=False)
    assert assets.from_cache
    recipe = load_recipe(REPO / "configs" / "demo.yaml", TINY_RECIPE_OVERRIDES)
    teacher = AutoModelForCausalLM.from_pretrained(assets.teacher_dir)
    student = copy.deepcopy(teacher)
    edgerazor.quantize(student, recipe)
    rtn = perplexity(student, assets.eval_dataset, progress=False)
    trainer = distill(teacher, student, assets.train_dataset, recipe, tmp_path / "run", collate_blocks,
                      eval_dataset=assets.eval_dataset, disable_tqdm=True)
    batch = recipe.train.per_device_batch_size
    distilled = perplexity(student, assets.eval_dataset, batch, progress=False)
    assert trainer.state.global_step == 2
    # train.eval_steps=1: the student's held-out perplexity at steps 1 and 2, logged beside the losses,
    # equal to an independent perplexity() of the checkpoint saved at that step
    evals = {h["step"]: h["eval_perplexity"] for h in trainer.state.log_history if "eval_perplexity" in h}
    assert sorted(evals) == [1, 2] and evals[2] == distilled and evals[1] != evals[2]
    for step, logged in evals.items():
        saved, _ = edgerazor.load(tmp_path / "run" / f"checkpoint-{step}")
        assert perplexity(saved, assets.eval_dataset, batch, progress=False) == logged
    assert all(math.isfinite(x) and x > 1 for x in (assets.teacher_ppl, rtn, distilled))
    assert rtn != assets.teacher_ppl  # the student really is quantized
    logged = [h for h in trainer.state.log_history if "loss_logit" in h]
    assert logged and all(math.isfinite(h["loss"]) for h in logged)
    with pytest.raises(EdgeRazorError, match="train.eval_steps is set but there is no eval dataset"):
        distill(teacher, student, assets.train_dataset, recipe, tmp_path / "run2", collate_blocks)


def test_edgerazor_run_is_the_demo_recipe_reachable_with_set(built, tmp_path, monkeypatch, capsys):
    """``edgerazor run --set demo....``: configs/demo.yaml with overrides, on the cached demo teacher those
    settings name; eval_steps gives the perplexity curve, results.json and training.png hold it."""
    monkeypatch.setenv("EDGERAZOR_CACHE", str(built["root"].parent))
    out = tmp_path / "out"
    sets = [arg for o in TINY_DEMO_OVERRIDES + TINY_RECIPE_OVERRIDES for arg in ("--set", o)]
    assert main(["run", "--output", str(out), *sets]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["teacher"] == str(built["first"].teacher_dir)  # the cached teacher: nothing rebuilt
    assert [p.name for p in built["root"].iterdir()] == [built["first"].cache_dir.name]
    assert results["recipe"]["demo"] == TINY.model_dump(mode="json") and results["recipe"]["name"] == "demo"
    assert [p["step"] for p in results["eval_perplexity"]] == [1, 2]
    assert results["student_ppl"] == results["eval_perplexity"][-1]["perplexity"]
    assert results["teacher_ppl"] == pytest.approx(built["first"].teacher_ppl, rel=1e-6)
    assert [p["step"] for p in results["train_loss"]] == [1, 2]
    data = results["data"]
    assert data["eval"] == TINY.corpus.eval_blocks and data["train"] == len(built["first"].train_dataset)
    assert data["sources"][0]["records"] == len(built["first"].meta["train_files"])
    assert "eval rows 12" in capsys.readouterr().err
    image = matplotlib.image.imread(out / "training.png")
    assert image.shape[:2] == (400, 1000)  # 10 x 4 inches at 100 dpi: a PNG matplotlib reads back


def test_a_recipe_with_a_demo_section_and_data_needs_a_teacher(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\ndemo: {}\ndata:\n  sources: [{path: corpus.txt}]\n")
    assert main(["run", "--recipe", str(path)]) == 2
    assert "demo: section and data.sources but no teacher" in capsys.readouterr().err
