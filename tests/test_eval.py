"""``edgerazor eval``: lm-evaluation-harness in-process on our model objects, the offline tasks checked against
independent computations, a student and its packed export scoring identically, the reports."""

from __future__ import annotations

import gzip
import json
import math
import re

import pytest
import torch
from transformers import Qwen3ForCausalLM

pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed: pip install -e '.[eval]'")

import edgerazor  # noqa: E402
from edgerazor.cli import main  # noqa: E402
from edgerazor.evaluation import harness, local_data, report  # noqa: E402
from edgerazor.evaluation.families import family_of, split_by_family  # noqa: E402
from edgerazor.evaluation.sandbox import pass_at_k, run_program  # noqa: E402
from edgerazor.export.packed import export_packed  # noqa: E402
from tests.helpers import tiny_qwen3_config  # noqa: E402
from tests.tokenizer_utils import train_tiny_tokenizer  # noqa: E402

WIKI = (" \n = First Article = \n \n The cat sat on the mat , and the dog @-@ like fox ran . \n \n"
        " = = A Section = = \n \n It was 3 @.@ 5 metres long ( about 11 ft ) . \n \n"
        " = Second Article = \n \n Rain fell on the hills ; the river rose in <unk> . \n")
GSM8K_TEST = [{"question": "Tom has 70 apples and buys 2. How many now?", "answer": "70+2=72\n#### 72"},
              {"question": "A bag holds 1000 beans. How many beans?", "answer": "It holds 1,000.\n#### 1,000"},
              {"question": "It is 5 below zero. What is the temperature?", "answer": "-5\n#### -5"}]
GSM8K_TRAIN = [{"question": f"What is {i} plus {i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"} for i in range(1, 9)]
#: a HumanEval-shaped problem with a known-correct and a known-wrong completion
PROBLEM = {"task_id": "Test/0", "prompt": "def add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n",
           "canonical_solution": "    return a + b\n", "entry_point": "add",
           "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval-data")
    (folder / "wikitext-2").mkdir()
    (folder / "wikitext-2" / "test.txt").write_text(WIKI)
    (folder / "gsm8k").mkdir()
    (folder / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM8K_TEST))
    (folder / "gsm8k" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM8K_TRAIN))
    (folder / "humaneval").mkdir()
    with gzip.open(folder / "humaneval" / "HumanEval.jsonl.gz", "wt") as f:
        f.write(json.dumps(PROBLEM) + "\n")
    return folder


@pytest.fixture(scope="module")
def manager(data_dir):
    return harness.task_manager(data_dir)


@pytest.fixture(scope="module")
def tok():
    return train_tiny_tokenizer([WIKI * 4, json.dumps(GSM8K_TEST + GSM8K_TRAIN)], vocab_size=400)


def tiny(tok, quantize: bool = False):
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_qwen3_config(vocab_size=len(tok))).eval()
    if quantize:
        edgerazor.quantize(model, {"quant": {"scheme": "1.88-8-8", "weight": {"group_size": 64}}})
    return model.eval()


def rolling_loglikelihood(model, ids: list[int], prefix: int, window: int) -> float:
    """Log-likelihood of ``ids`` scored in disjoint windows of ``window`` predictions, each seeing up to
    ``window`` tokens of context (the sequence starts with ``prefix``): written from the definition."""
    seq = [prefix] + ids
    total, done = 0.0, 0
    while done < len(ids):
        end = min(done + window, len(ids))
        start = max(0, end - window)  # the model sees seq[start:end] and predicts seq[start+1:end+1]
        with torch.no_grad():
            logits = model(torch.tensor([seq[start:end]])).logits[0].double()
        logprobs = torch.log_softmax(logits, -1)
        for target in range(done + 1, end + 1):
            total += logprobs[target - 1 - start, seq[target]].item()
        done = end
    return total


def test_wikitext_is_split_into_articles_at_title_lines(shared_dir):
    pages = local_data.wikitext_documents(WIKI)
    assert [p.splitlines()[0] for p in pages] == [" = First Article = ", " = Second Article = "]
    assert " = = A Section = = " in pages[0]  # sections stay inside their article
    assert "".join(pages) == WIKI[WIKI.index(" = First"):]  # nothing lost but the text before the first title
    valid = (shared_dir / "data" / "wikitext-2" / "valid.txt").read_text()
    real = local_data.wikitext_documents(valid)
    assert len(real) == len(re.findall(r"(?m)^ = [^=].* = $", valid)) == 60
    assert real[0].startswith(" = Homarus gammarus = \n")


def test_wikitext_perplexity_equals_a_computation_by_hand(tok, data_dir, manager):
    model = tiny(tok)
    out = harness.evaluate_model(model, tok, ["wikitext"], data_dir=data_dir, max_length=8, manager=manager)
    metrics = out["results"]["wikitext"]
    from edgerazor.evaluation.tasks.utils import wikitext_text

    total_ll, words, n_bytes = 0.0, 0, 0
    for page in local_data.wikitext_documents(WIKI):
        ids = tok(wikitext_text({"page": page}), add_special_tokens=False)["input_ids"]
        assert len(ids) > 2 * 8 and len(ids) % 8  # several windows per article, the last one partial
        total_ll += rolling_loglikelihood(model, ids, tok.eos_token_id, 8)
        words += len(re.split(r"\s+", page))
        n_bytes += len(page.encode("utf-8"))
    assert metrics["word_perplexity,none"] == pytest.approx(math.exp(-total_ll / words), rel=1e-5)
    assert metrics["byte_perplexity,none"] == pytest.approx(math.exp(-total_ll / n_bytes), rel=1e-5)
    assert metrics["bits_per_byte,none"] == pytest.approx(-total_ll / n_bytes / math.log(2), rel=1e-5)
    assert out["config"]["seed"] == 42 and out["n-shot"]["wikitext"] == 0


def test_gsm8k_answers_are_extracted_and_matched_as_lm_eval_scores_them(manager):
    task = manager.load(["gsm8k"])["tasks"]["gsm8k"]
    task.set_fewshot_seed(42)
    task.build_all_requests(limit=3, rank=0, world_size=1)
    context = task.instances[0].arguments[0]
    assert context.count("Question:") == 6 and context.endswith(GSM8K_TEST[0]["question"] + "\nAnswer:")  # 5-shot
    replies = ["70 + 2 = 72 apples.\n#### 72", "The bag has 1000.", "#### 5"]
    for instance, reply in zip(task.instances, replies):
        instance.resps = [reply]
    task.apply_filters()
    scored = [{f: task.process_results(i.doc, [i.filtered_resps[f]])["exact_match"]
               for f in ("strict-match", "flexible-extract")} for i in task.instances]
    assert scored == [{"strict-match": 1.0, "flexible-extract": 1.0},   # "#### 72"
                      {"strict-match": 0.0, "flexible-extract": 1.0},   # no "####"; 1000. == 1,000 (commas, dot)
                      {"strict-match": 0.0, "flexible-extract": 0.0}]   # 5 is not -5


def test_humaneval_pass_at_1_runs_the_code_in_a_sandbox(manager):
    task = manager.load(["humaneval"])["tasks"]["humaneval"]
    task.build_all_requests(limit=1, rank=0, world_size=1)
    (instance,) = task.instances
    target = task.doc_to_target(instance.doc)

    def score(completion: str) -> float:
        instance.resps = [completion]
        task.apply_filters()  # the task's own filter: prompt + completion
        return task.process_results(instance.doc, [instance.filtered_resps["create_test"]])["pass_at_1"]

    assert score(PROBLEM["canonical_solution"]) == 1.0
    assert score("    return a - b\n") == 0.0
    assert score("    while True:\n        pass\n") == 0.0  # times out
    assert "check(add)" in target
    network = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9))\n")
    assert not network.passed and "disabled" in network.reason
    assert not run_program("import os\nos.system('true')\n").passed
    assert run_program("while True: pass\n", timeout=1).reason == "timed out"
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4) and pass_at_k(3, 3, 2) == 1.0


def test_code_execution_needs_the_opt_in_and_unknown_tasks_list_close_matches(tok, data_dir, manager):
    with pytest.raises(harness.TaskError, match="--allow-code-execution"):
        harness.evaluate_model(tiny(tok), tok, ["humaneval"], data_dir=data_dir, manager=manager)
    with pytest.raises(harness.TaskError, match=r"unknown task 'wikitxt'.*close matches: wikitext"):
        harness.check_task_names(["wikitxt"], manager)
    with pytest.raises(local_data.TaskDataError, match=r"gsm8k/test.jsonl does not exist"):
        harness.load_tasks(["gsm8k"], harness.task_manager(data_dir / "wikitext-2"))
    assert split_by_family(["wikitext", "gsm8k"]) == {"text": ["wikitext", "gsm8k"]}
    assert family_of("anything") == "text"


def test_fake_quantization_stays_active_and_weights_are_not_retied(tok, data_dir, manager):
    plain, student = tiny(tok), tiny(tok, quantize=True)
    ids = torch.randint(0, len(tok), (1, 12))
    with torch.no_grad():
        before = student(ids).logits
    lm = harness.wrap(student, tok)
    assert "tie_weights" not in vars(student)  # our guard is gone again
    with torch.no_grad():
        assert torch.equal(student(ids).logits, before)
        assert torch.equal(lm._model_call(ids), before)
    args = dict(data_dir=data_dir, max_length=16, manager=manager)
    quantized = harness.evaluate_model(student, tok, ["wikitext"], **args)["results"]["wikitext"]
    dense = harness.evaluate_model(plain, tok, ["wikitext"], **args)["results"]["wikitext"]
    assert quantized["word_perplexity,none"] != dense["word_perplexity,none"]


def test_student_and_packed_export_score_identically_through_the_cli(tok, data_dir, tmp_path, capsys):
    student = tiny(tok, quantize=True)
    student.save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")
    export_packed(student, tok, tmp_path / "packed")
    teacher = tiny(tok)
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    out = tmp_path / "eval"
    common = ["--tasks", "wikitext,gsm8k", "--data-dir", str(data_dir), "--limit", "2", "--max-length", "64",
              "--gen-kwargs", "max_gen_toks=8"]
    assert main(["eval", str(tmp_path / "teacher"), str(tmp_path / "student"), str(tmp_path / "packed"),
                 *common, "--output", str(out)]) == 0
    saved = json.loads((out / "results.json").read_text())["models"]
    assert [m["edgerazor"]["kind"] for m in saved] == ["16-bit", "student", "packed"]
    assert [m["edgerazor"]["w_a_kv"] for m in saved] == ["16-16-16", "1.88-8-8", "1.88-8-8"]
    assert saved[1]["results"] == saved[2]["results"]  # every metric, exactly
    assert saved[0]["results"]["wikitext"] != saved[1]["results"]["wikitext"]
    assert saved[1]["edgerazor"]["settings"]["limit"] == 2 and saved[1]["config"]["limit"] == 2
    table = (out / "table.md").read_text()
    assert table.splitlines()[0].startswith("| Model | W-A-KV | GSM8K | WikiText-2 ppl | Avg. (↑) | Δ16-bit (↑) |")
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main(["eval", "--compare", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Differences to teacher (16-bit)" in printed
    packed_row = next(line for line in printed.splitlines() if line.startswith("| packed (packed) | 1.88-8-8 | +"))
    student_row = next(line for line in printed.splitlines() if line.startswith("| student (student) | 1.88-8-8 | +"))
    assert packed_row.split("|")[3:] == student_row.split("|")[3:]
    assert main(["eval", str(tmp_path / "student"), *common, "--output", str(out)]) == 2  # never replaced
    assert "already exist" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "student"), *common[2:8], "--tasks", "wikitext", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)  # lm-eval's results object, and nothing else on stdout
    assert printed["results"] == {"wikitext": saved[1]["results"]["wikitext"]}


def test_report_averages_and_deltas():
    def record(name, wakv, arc, gsm, ppl):
        return {"edgerazor": {"label": name, "w_a_kv": wakv},
                "results": {"arc_easy": {"acc_norm,none": arc}, "gsm8k": {"exact_match,strict-match": gsm},
                            "wikitext": {"word_perplexity,none": ppl}},
                "higher_is_better": {"arc_easy": {"acc_norm": True}, "gsm8k": {"exact_match": True},
                                     "wikitext": {"word_perplexity": False}}}

    records = [record("student", "1.88-8-8", 0.50, 0.25, 30.0), record("teacher", "16-16-16", 0.60, 0.40, 20.0)]
    tasks, rows = report.table_rows(records)
    assert tasks == ["arc_easy", "gsm8k", "wikitext"]
    assert rows[0]["avg"] == pytest.approx(37.5) and rows[1]["avg"] == pytest.approx(50.0)
    assert rows[0]["delta"] == pytest.approx(-12.5) and rows[1]["delta"] == 0  # the 16-bit row is the reference
    table = report.markdown_table(records)
    assert "| student | 1.88-8-8 | 50.00 | 25.00 | 30.00 | 37.50 | -12.50 |" in table
    assert "Lower is better and not averaged: WikiText-2 ppl" in table
    assert "| teacher | 16-16-16 | +10.00 | +15.00 | -10.00 | +12.50 |" in report.deltas(records)


@pytest.mark.slow
def test_run_evaluates_teacher_and_student_when_the_recipe_lists_tasks(teacher_dir, data_dir, tmp_path):
    import yaml

    from edgerazor.run import run_command
    from tests.helpers import tiny_run_recipe

    path = tiny_run_recipe(teacher_dir, tmp_path / "recipe.yaml", max_steps=2, per_device_batch_size=2)
    recipe = yaml.safe_load(path.read_text())
    recipe["eval"] = {"tasks": ["wikitext"], "data_dir": str(data_dir), "max_length": 16}
    path.write_text(yaml.safe_dump(recipe))
    results = run_command(path, str(teacher_dir), None, [], tmp_path / "run", False)
    evaluation = results["evaluation"]
    saved = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())["models"]
    assert [m["edgerazor"]["label"] for m in saved] == ["teacher", "student"]
    assert evaluation["scores"]["student"]["wikitext"] == saved[1]["results"]["wikitext"]["word_perplexity,none"]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["evaluation"] == evaluation
    # the same numbers as a later `edgerazor eval RUN`
    later = harness.evaluate_model(*edgerazor.load(tmp_path / "run" / "student"), ["wikitext"], data_dir=data_dir,
                                   max_length=16)
    assert later["results"]["wikitext"] == saved[1]["results"]["wikitext"]
    bad = yaml.safe_load(path.read_text())
    bad["eval"]["tasks"] = ["wikitxt"]
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(harness.TaskError, match="close matches: wikitext"):  # before any training
        run_command(path, str(teacher_dir), None, [], tmp_path / "run2", False)
    assert not (tmp_path / "run2" / "checkpoints").exists()


def test_cli_checks_task_names_and_the_code_opt_in_before_loading(data_dir, tmp_path, capsys):
    missing = str(tmp_path / "no-model-here")  # never reached: the tasks are refused first
    assert main(["eval", missing, "--tasks", "wikitxt,gsm8k", "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgerazor: error: unknown task 'wikitxt'") and "close matches: wikitext" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["eval", missing, "--tasks", "humaneval", "--data-dir", str(data_dir)]) == 2
    assert "--allow-code-execution" in capsys.readouterr().err
    assert main(["eval", missing, "--tasks", "wikitext", "--data-dir", str(data_dir)]) == 2
    assert "no-model-here" in capsys.readouterr().err
