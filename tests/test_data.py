"""Data pipeline: sources, mixture ratios, response masks, think stripping, packing, collation, errors.

Every test runs a real byte-level BPE tokenizer (tests/tokenizer_utils.py) on real text, and checks
masks by decoding exactly the labelled tokens, not by counting them.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch
from pydantic import ValidationError

from edgerazor.data import (
    IGNORE_INDEX,
    DataError,
    DataSection,
    DataSource,
    DistillCollator,
    build_dataset,
    build_datasets,
    split_eval,
    strip_think,
)
from edgerazor.data.sources import is_local, quotas
from edgerazor.errors import EdgeRazorError
from edgerazor.recipe import load_recipe
from tests.helpers import REPO, SHARED, require_shared
from tests.tokenizer_utils import CHATML_TEMPLATE, IM_END, train_tiny_tokenizer

GSM8K = SHARED / "data" / "gsm8k" / "train.jsonl"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"


@pytest.fixture(scope="module", autouse=True)
def private_datasets_cache(tmp_path_factory):
    """Builders cache every local file they read: keep the tests' throwaway files out of ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-datasets-cache")))
        yield


@pytest.fixture(scope="module")
def shakespeare() -> str:
    require_shared()
    return SHAKESPEARE.read_text()


@pytest.fixture(scope="module")
def tok(shakespeare):
    return train_tiny_tokenizer([shakespeare[:8000]], vocab_size=512)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def section(*sources: DataSource, **kwargs) -> DataSection:
    return DataSection(sources=list(sources), **kwargs)


def runs(labels: list[int]) -> list[list[int]]:
    """Maximal stretches of labelled (not -100) tokens."""
    out, cur = [], []
    for x in labels:
        if x == IGNORE_INDEX:
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append(x)
    return out + ([cur] if cur else [])


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------ prompt / response

PAIRS = [
    ("First Citizen: Before we proceed any further, hear me speak.", "Speak, speak."),
    ("You are all resolved rather to die than to famish?", "Resolved. resolved."),
    ("We know't, we know't.", "Let us kill him, and we'll have corn at our own price."),
]


def test_prompt_response_masks_exactly_the_response_tokens(tmp_path, tok):
    path = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": p, "response": r} for p, r in PAIRS])
    ds = build_dataset(section(DataSource(path=str(path), format="prompt_response"), seed=3), tok)
    assert ds.column_names == ["input_ids", "labels"] and len(ds) == len(PAIRS)
    by_prompt = {tuple(encode(tok, p)): r for p, r in PAIRS}
    for row in ds:
        ids, labels = row["input_ids"], row["labels"]
        n_prompt = next(k for k, x in enumerate(labels) if x != IGNORE_INDEX)
        response = by_prompt[tuple(ids[:n_prompt])]  # everything before the first label is the prompt
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert labels[n_prompt:] == ids[n_prompt:] == encode(tok, response) + [tok.eos_token_id]
        assert tok.decode(labels[n_prompt:]) == response + tok.eos_token


def test_prompt_separator_is_part_of_the_prompt_and_response_only_false_trains_everything(tmp_path, tok):
    path = write_jsonl(tmp_path / "pr.jsonl", [{"q": PAIRS[0][0], "a": PAIRS[0][1]}])
    src = dict(path=str(path), format="prompt_response", prompt_field="q", response_field="a", prompt_separator="\n")
    row = build_dataset(section(DataSource(**src)), tok)[0]
    assert tok.decode(row["input_ids"]) == f"{PAIRS[0][0]}\n{PAIRS[0][1]}{tok.eos_token}"
    assert tok.decode([x for x in row["labels"] if x != IGNORE_INDEX]) == PAIRS[0][1] + tok.eos_token
    row = build_dataset(section(DataSource(**src), response_only=False), tok)[0]
    assert row["labels"] == row["input_ids"]


def test_gsm8k_as_a_real_prompt_response_source(tok):
    require_shared()
    src = DataSource(
        path=str(GSM8K), format="prompt_response", prompt_field="question", response_field="answer",
        prompt_separator="\n", max_samples=24,
    )
    ds = build_dataset(section(src, max_length=1024, seed=1), tok)
    assert len(ds) == 24
    answers = {json.loads(line)["answer"] for line in GSM8K.read_text().splitlines()}
    for row in ds:
        assert len(row["input_ids"]) <= 1024
        labelled = runs(row["labels"])
        assert len(labelled) == 1  # one contiguous response at the end
        text = tok.decode(labelled[0])
        assert text.endswith(tok.eos_token) and text[: -len(tok.eos_token)] in answers
        assert "####" in text
    again = build_dataset(section(src, max_length=1024, seed=1), tok)
    assert again["input_ids"] == ds["input_ids"]
    other = build_dataset(section(src, max_length=1024, seed=2), tok)
    assert other["input_ids"] != ds["input_ids"]


# ------------------------------------------------------------------------------------------- chat

CHAT = [
    {"role": "system", "content": "You speak as a Roman citizen."},
    {"role": "user", "content": "What say you of Caius Marcius?"},
    {"role": "assistant", "content": "He is chief enemy to the people."},
    {"role": "user", "content": "Would you proceed especially against him?"},
    {"role": "assistant", "content": "Against him first: he's a very dog to the commonalty."},
]


def test_chat_masks_exactly_the_assistant_turns_and_their_end_token(tmp_path, tok):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    row = build_dataset(section(DataSource(path=str(path), format="chat")), tok)[0]
    assert tok.decode(row["input_ids"]) == tok.apply_chat_template(CHAT, tokenize=False)
    # Documented choice: assistant content plus the end-of-turn token (<|im_end|>) that follows
    # it, so the student learns to stop; role headers and the newline after <|im_end|> carry no loss.
    assert [tok.decode(r) for r in runs(row["labels"])] == [CHAT[2]["content"] + IM_END, CHAT[4]["content"] + IM_END]
    labelled = [x for x in row["labels"] if x != IGNORE_INDEX]
    assert labelled == encode(tok, CHAT[2]["content"] + IM_END) + encode(tok, CHAT[4]["content"] + IM_END)
    for ids, lab in zip(row["input_ids"], row["labels"]):
        assert lab in (IGNORE_INDEX, ids)


def test_sharegpt_conversations_map_onto_chat_roles(tmp_path, tok):
    """Infinity-Instruct style rows: ``conversations`` of ``{"from": "human"|"gpt", "value": ...}``."""
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"from": names[m["role"]], "value": m["content"]} for m in CHAT]
    path = write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": sharegpt}])
    row = build_dataset(section(DataSource(path=str(path), format="chat", messages_field="conversations")), tok)[0]
    assert tok.decode(row["input_ids"]) == tok.apply_chat_template(CHAT, tokenize=False)
    assert [tok.decode(r) for r in runs(row["labels"])] == [CHAT[2]["content"] + IM_END, CHAT[4]["content"] + IM_END]


def test_chat_mask_lands_on_the_assistant_turn_even_when_the_user_said_the_same(tmp_path, tok):
    chat = [{"role": "user", "content": "Say: speak"}, {"role": "assistant", "content": "speak"}]
    path = write_jsonl(tmp_path / "echo.jsonl", [{"messages": chat}])
    row = build_dataset(section(DataSource(path=str(path), format="chat")), tok)[0]
    first = next(k for k, x in enumerate(row["labels"]) if x != IGNORE_INDEX)
    assert tok.decode(row["input_ids"][:first]).endswith("<|im_start|>assistant\n")
    assert [tok.decode(r) for r in runs(row["labels"])] == ["speak" + IM_END]


def test_chat_response_only_false_trains_every_token(tmp_path, tok):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"conv": CHAT}])
    src = DataSource(path=str(path), format="chat", messages_field="conv")
    row = build_dataset(section(src, response_only=False), tok)[0]
    assert row["labels"] == row["input_ids"]


LLAMA_LIKE = (  # trims content, as Llama-3's template does
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n\n{{ m['content'] | trim }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n\n{% endif %}"
)
QWEN3_LIKE = (  # the last assistant turn gets an empty think block, earlier ones do not
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


STRICT = (  # rejects conversations that do not end with an assistant turn, so no prefix renders
    "{% if messages[-1]['role'] != 'assistant' %}{{ raise_exception('must end with assistant') }}{% endif %}"
    + CHATML_TEMPLATE
)


@pytest.mark.parametrize(
    "template, padding",
    [(LLAMA_LIKE, "  "), (QWEN3_LIKE, ""), (STRICT, "")],
    ids=["trimming", "last-turn-think", "no-prefix-rendering"],
)
def test_chat_masks_survive_templates_that_rewrite_turns(tmp_path, shakespeare, template, padding):
    chat = [dict(m) for m in CHAT]
    chat[2]["content"] = padding + chat[2]["content"] + padding  # whitespace a trimming template drops
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}])
    tok = train_tiny_tokenizer([shakespeare[:8000]])
    tok.chat_template = template
    row = build_dataset(section(DataSource(path=str(path), format="chat")), tok)[0]
    assert tok.decode(row["input_ids"]).count("<think>") == (template == QWEN3_LIKE)
    assert [tok.decode(r) for r in runs(row["labels"])] == [
        CHAT[2]["content"] + IM_END, CHAT[4]["content"] + IM_END
    ]


def test_strip_think_function():
    assert strip_think("<think>\nstep 1\nstep 2\n</think>\n\nThe answer is 4.") == "The answer is 4."
    assert strip_think("<think></think>\n\nHi") == "Hi"
    assert strip_think("<think>\n\n</think>\n\nHi") == "Hi"
    assert strip_think("A <think>x</think> B <think>y</think>C") == "A B C"
    assert strip_think("no tags here") == "no tags here"


def test_strip_think_in_chat_and_prompt_response(tmp_path, tok):
    chat = [dict(m) for m in CHAT]
    chat[2]["content"] = "<think>\nThe people hate him.\n</think>\n\n" + chat[2]["content"]
    chat[4]["content"] = "<think></think>\n" + chat[4]["content"]
    chat_path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}])
    pr_path = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "Q: ", "response": "<think>hmm</think>  42"}])
    sources = [DataSource(path=str(chat_path), format="chat"), DataSource(path=str(pr_path), format="prompt_response")]
    kept = build_dataset(section(*sources, num_samples=2), tok)
    assert sum("<think>" in tok.decode(r["input_ids"]) for r in kept) == 2  # off by default
    ds = build_dataset(section(*sources, strip_think=True, num_samples=2), tok)
    texts = sorted((tok.decode(r["input_ids"]) for r in ds), key=len)
    assert texts == ["Q: 42" + tok.eos_token, tok.apply_chat_template(CHAT, tokenize=False)]
    assert not any("think" in t for t in texts)
    chat_row = next(r for r in ds if IM_END in tok.decode(r["input_ids"]))
    assert [tok.decode(r) for r in runs(chat_row["labels"])] == [
        CHAT[2]["content"] + IM_END, CHAT[4]["content"] + IM_END
    ]


# ------------------------------------------------------------------------------ text and packing


def test_plain_text_packs_into_full_blocks(tmp_path, tok, shakespeare):
    docs = [shakespeare[:3000], shakespeare[3000:5000]]
    folder = tmp_path / "corpus"
    folder.mkdir()
    for k, doc in enumerate(docs):
        (folder / f"part{k}.txt").write_text(doc)
    (folder / "README.md").write_text("ignored: not a data file")
    ds = build_dataset(section(DataSource(path=str(folder)), max_length=64), tok)
    stream = [t for doc in docs for t in encode(tok, doc) + [tok.eos_token_id]]  # one document per file
    assert len(ds) == len(stream) // 64
    for row in ds:
        assert len(row["input_ids"]) == 64 and row["labels"] == row["input_ids"]
    blocks = sorted(tuple(stream[i * 64 : (i + 1) * 64]) for i in range(len(ds)))
    assert sorted(tuple(r) for r in ds["input_ids"]) == blocks  # the same blocks, shuffled


def test_text_max_samples_caps_blocks_and_jsonl_text_field(tmp_path, tok, shakespeare):
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": shakespeare[i : i + 500]} for i in range(0, 8000, 500)])
    ds = build_dataset(section(DataSource(path=str(path), text_field="body", max_samples=5), max_length=32), tok)
    assert len(ds) == 5 and all(len(r) == 32 for r in ds["input_ids"])


def test_parquet_source(tmp_path, tok):
    path = tmp_path / "pairs.parquet"
    datasets.Dataset.from_dict({"prompt": [p for p, _ in PAIRS], "response": [r for _, r in PAIRS]}).to_parquet(path)
    ds = build_dataset(section(DataSource(path=str(path), format="prompt_response")), tok)
    responses = sorted(tok.decode([x for x in r if x != IGNORE_INDEX]) for r in ds["labels"])
    assert responses == sorted(r + tok.eos_token for _, r in PAIRS)


def test_save_to_disk_directory_source(tmp_path, tok):
    pairs = {"prompt": [p for p, _ in PAIRS], "response": [r for _, r in PAIRS]}
    datasets.Dataset.from_dict(pairs).save_to_disk(tmp_path / "saved")
    datasets.DatasetDict({"dev": datasets.Dataset.from_dict(pairs)}).save_to_disk(tmp_path / "saved_dict")
    assert len(build_dataset(section(DataSource(path=str(tmp_path / "saved"), format="prompt_response")), tok)) == 3
    src = DataSource(path=str(tmp_path / "saved_dict"), format="prompt_response", split="dev")
    assert len(build_dataset(section(src), tok)) == 3
    with pytest.raises(DataError, match="split='train' is not in the saved dataset; it has: dev"):
        build_dataset(section(src.model_copy(update={"split": "train"})), tok)


# ------------------------------------------------------------------------------------------ mixture


def _ab_sources(tmp_path, n_a: int = 400, n_b: int = 400, ratio_a: float = 3.0) -> list[DataSource]:
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "alpha ", "response": f"a{i}"} for i in range(n_a)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "beta ", "response": f"b{i}"} for i in range(n_b)])
    return [
        DataSource(path=str(a), format="prompt_response", ratio=ratio_a),
        DataSource(path=str(b), format="prompt_response", ratio=1.0),
    ]


def _origins(tok, ds) -> list[str]:
    return [tok.decode(ids)[0] for ids in ds["input_ids"]]  # 'a' (alpha) or 'b' (beta)


def test_mixture_follows_ratios_and_is_deterministic(tmp_path, tok):
    sources = _ab_sources(tmp_path)
    ds = build_dataset(section(*sources, num_samples=400, seed=7), tok)
    counts = Counter(_origins(tok, ds))
    assert len(ds) == 400 and abs(counts["a"] - 300) <= 10 and abs(counts["b"] - 100) <= 10
    assert build_dataset(section(*sources, num_samples=400, seed=7), tok)["input_ids"] == ds["input_ids"]
    other = build_dataset(section(*sources, num_samples=400, seed=8), tok)
    assert other["input_ids"] != ds["input_ids"]
    assert set(_origins(tok, ds.select(range(40)))) == {"a", "b"}  # shuffled together, not concatenated


def test_mixture_default_size_uses_each_row_at_most_once_and_upsamples_on_request(tmp_path, tok):
    sources = _ab_sources(tmp_path, n_a=90, n_b=100)
    ds = build_dataset(section(*sources), tok)  # A is the limit: 90 rows = 3/4 of 120
    assert Counter(_origins(tok, ds)) == {"a": 90, "b": 30}
    assert len({tuple(r) for r in ds["input_ids"]}) == len(ds)
    big = build_dataset(section(*sources, num_samples=400), tok)  # A repeats: 300 rows from 90
    assert Counter(_origins(tok, big)) == {"a": 300, "b": 100}
    a_rows = Counter(tuple(r) for r, o in zip(big["input_ids"], _origins(tok, big)) if o == "a")
    assert len(a_rows) == 90 and max(a_rows.values()) - min(a_rows.values()) <= 1  # whole passes first


def test_quotas_sum_to_the_total_and_respect_sizes():
    assert quotas([300, 500], [3, 1], None) == [300, 100]
    assert sum(quotas([1000, 1000, 1000], [1, 1, 1], 100)) == 100
    assert quotas([7, 10], [1, 1], None) == [7, 7]


def test_max_samples_is_a_seeded_subset(tmp_path, tok):
    src = _ab_sources(tmp_path)[0].model_copy(update={"max_samples": 10})
    ds = build_dataset(section(src), tok)
    assert len(ds) == 10 and len(set(map(tuple, ds["input_ids"]))) == 10


def test_split_eval(tmp_path, tok):
    sources = _ab_sources(tmp_path, n_a=60, n_b=20)
    train, held = build_datasets(section(*sources, eval_fraction=0.1), tok)
    assert (len(train), len(held)) == (72, 8)
    assert not {tuple(r) for r in train["input_ids"]} & {tuple(r) for r in held["input_ids"]}
    assert split_eval(train, 0.0) == (train, None)
    again, held2 = split_eval(train, 0.25, seed=1)
    assert held2["input_ids"] == split_eval(train, 0.25, seed=1)[1]["input_ids"] and len(held2) == 18


# --------------------------------------------------------------------------------------- truncation


def test_rows_are_truncated_to_max_length_and_prompt_only_rows_dropped(tmp_path, tok, shakespeare):
    rows = [{"prompt": "Speak:", "response": shakespeare[:2000]}, {"prompt": shakespeare[:2000], "response": "x"}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    ds = build_dataset(section(DataSource(path=str(path), format="prompt_response"), max_length=48), tok)
    assert len(ds) == 1  # the second row's response lies beyond max_length
    row = ds[0]
    assert len(row["input_ids"]) == len(row["labels"]) == 48
    assert row["input_ids"] == (encode(tok, "Speak:") + encode(tok, shakespeare[:2000]))[:48]


def test_build_datasets_counts_what_happened_to_every_row(tmp_path, tok, shakespeare):
    """Known rows through read, max_samples, drops (and why), truncation, mixture and eval split."""
    long = shakespeare[:2000]
    pr_rows = [{"prompt": p, "response": r} for p, r in PAIRS[:2]] + [
        {"prompt": "Speak:", "response": long},  # kept, cut at max_length
        {"prompt": long, "response": "x"},  # the response lies beyond max_length: dropped
        {"prompt": "Silence?", "response": ""},  # empty: dropped
        {"prompt": "Think.", "response": "<think>hmm</think>"},  # empty after strip_think: dropped
    ]
    pr = write_jsonl(tmp_path / "pr.jsonl", pr_rows)
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": long}, {"text": ""}, {"text": long}])
    fine = write_jsonl(tmp_path / "fine.jsonl", [{"prompt": p, "response": r} for p, r in PAIRS + PAIRS[:2]])
    sources = (DataSource(path=str(pr), format="prompt_response"), DataSource(path=str(text)),
               DataSource(path=str(fine), format="prompt_response", max_samples=2))
    built = build_datasets(section(*sources, max_length=48, strip_think=True, eval_fraction=0.5), tok)
    pr_stats, text_stats, fine_stats = built.stats.sources
    assert (pr_stats.records, pr_stats.capped, pr_stats.empty, pr_stats.no_response, pr_stats.truncated,
            pr_stats.kept) == (6, 0, 2, 1, 1, 3)
    assert pr_stats.dropped == 3 and pr_stats.source == f"data.sources[0] ({str(pr)!r})"
    assert tok.bos_token_id is None and tok.eos_token_id is not None  # documents are ids + eos, no bos
    blocks = 2 * (len(encode(tok, long)) + 1) // 48
    assert (text_stats.records, text_stats.empty, text_stats.kept, text_stats.truncated) == (3, 1, blocks, 0)
    assert (fine_stats.records, fine_stats.capped, fine_stats.kept, fine_stats.dropped) == (5, 3, 2, 0)
    # equal ratios: the smallest source (2 rows) sets 2 rows each; half of the 6 held out
    assert [s.drawn for s in built.stats.sources] == [2, 2, 2]
    train, held = built
    assert (built.stats.train, built.stats.eval) == (len(train), len(held)) == (3, 3)
    as_json = json.loads(json.dumps(built.stats.to_dict()))
    assert as_json["sources"][0]["dropped"] == 3 and as_json["max_length"] == 48 and as_json["eval"] == 3


def test_example_own_model_recipe_stays_valid():
    """configs/example-own-model.yaml, the README's complete example, validates and shows each kind of source."""
    recipe = load_recipe(REPO / "configs" / "example-own-model.yaml")
    sources = recipe.data.sources
    assert [s.format for s in sources] == ["chat", "prompt_response", "text"]
    assert [is_local(s.path) for s in sources] == [True, True, False]  # two local paths, one hub id
    assert sources[1].prompt_separator == "\n" and sources[1].max_samples == 20000 and sources[2].name
    assert recipe.data.eval_fraction > 0 and recipe.train.eval_steps and recipe.model.teacher
    assert recipe.quant.w_a_kv == "1.88-8-8"


# ----------------------------------------------------------------------------------------- collator


def test_collator_right_pads_with_pad_id_and_masks_labels(tok):
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = DistillCollator(tok)(rows)
    assert batch["input_ids"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, tok.pad_token_id, tok.pad_token_id]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    padded = DistillCollator(tok, pad_to_multiple_of=8)(rows)
    assert {k: tuple(v.shape) for k, v in padded.items()} == dict.fromkeys(batch, (2, 8))
    assert padded["labels"][0, 3:].eq(-100).all() and padded["attention_mask"][0, 3:].eq(0).all()


def test_collator_falls_back_to_eos_and_accepts_rows_without_labels(shakespeare):
    tok = train_tiny_tokenizer([shakespeare[:4000]])
    tok.pad_token = None
    batch = DistillCollator(tok)([{"input_ids": [5, 6]}, {"input_ids": [9]}])
    assert batch["input_ids"].tolist() == [[5, 6], [9, tok.eos_token_id]]
    assert batch["labels"].tolist() == [[5, 6], [9, -100]]


def test_collator_on_a_built_dataset(tmp_path, tok):
    ds = build_dataset(section(*_ab_sources(tmp_path, 30, 10)), tok)
    batch = DistillCollator(tok)(ds.select(range(4)).to_list())
    lengths = [len(r) for r in ds.select(range(4))["input_ids"]]
    assert batch["attention_mask"].sum(1).tolist() == lengths


# ------------------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path, tok):
    src = DataSource(path=str(tmp_path / "nope.jsonl"), format="prompt_response")
    with pytest.raises(DataError, match=r"data.sources\[0\] .*nope.jsonl.*path does not exist"):
        build_dataset(section(src), tok)
    assert issubclass(DataError, EdgeRazorError)
    with pytest.raises(DataError, match="path does not exist"):  # a relative path is local, not a hub id
        build_dataset(section(DataSource(path="data/missing.jsonl")), tok)


def test_missing_field_names_the_field_and_the_available_ones(tok):
    require_shared()
    src = DataSource(path=str(GSM8K), format="prompt_response", response_field="answer", max_samples=5)
    with pytest.raises(DataError, match=r"prompt_field='prompt' is not a column.*the rows have: question, answer"):
        build_dataset(section(src), tok)


def test_empty_after_filtering(tmp_path, tok):
    path = write_jsonl(tmp_path / "think.jsonl", [{"prompt": "Q", "response": "<think>only thoughts</think>\n"}] * 3)
    with pytest.raises(DataError, match=r"think.jsonl.*empty after filtering.*3 have an empty response after strip"):
        build_dataset(section(DataSource(path=str(path), format="prompt_response"), strip_think=True), tok)
    chat = write_jsonl(tmp_path / "nochat.jsonl", [{"messages": CHAT[:2]}])
    with pytest.raises(DataError, match="empty after filtering"):
        build_dataset(section(DataSource(path=str(chat), format="chat")), tok)
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    with pytest.raises(DataError, match="empty after packing"):
        build_dataset(section(DataSource(path=str(short))), tok)


def test_unknown_extension(tmp_path, tok):
    path = tmp_path / "data.csv"
    path.write_text("prompt,response\na,b\n")
    with pytest.raises(DataError, match=r"data.csv.*unknown file extension '.csv'; supported: .json, .jsonl"):
        build_dataset(section(DataSource(path=str(path))), tok)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(DataError, match="holds no data files"):
        build_dataset(section(DataSource(path=str(empty_dir))), tok)


def test_no_chat_template(tmp_path, shakespeare):
    tok = train_tiny_tokenizer([shakespeare[:4000]])
    tok.chat_template = None
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    with pytest.raises(DataError, match=r"data.sources\[0\].*format 'chat' but the tokenizer .* has no chat template"):
        build_dataset(section(DataSource(path=str(path), format="chat")), tok)


def test_malformed_sources(tmp_path, tok):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"content": "no role"}]}])
    with pytest.raises(DataError, match="row 0, message 0: every message needs a 'role' and a string 'content'"):
        build_dataset(section(DataSource(path=str(bad), format="chat")), tok)
    txt = tmp_path / "t.txt"
    txt.write_text("hello")
    with pytest.raises(DataError, match="format must be 'text'"):
        build_dataset(section(DataSource(path=str(txt), format="chat")), tok)
    with pytest.raises(DataError, match="data.sources is empty"):
        build_dataset(DataSection(), tok)


# ------------------------------------------------------------------------------ schema and hub ids


def test_schema_validation():
    with pytest.raises(ValidationError):
        DataSource(path="x.jsonl", ratio=0)
    with pytest.raises(ValidationError, match="Extra inputs"):
        DataSource(path="x.jsonl", prompt_feild="q")
    with pytest.raises(ValidationError):
        DataSource(path="x.jsonl", format="audio")
    assert DataSource(path="x.jsonl", format="video").format == "video"  # built by a video-capable adapter
    sec = DataSection.model_validate({"sources": [{"path": "x.jsonl", "format": "chat"}]})
    assert sec.max_length == 1024 and sec.response_only and not sec.strip_think and sec.sources[0].split == "train"


def test_hub_ids_take_the_load_dataset_path(monkeypatch, tok):
    assert not is_local("allenai/tulu-3-sft-mixture")
    assert not is_local("a-m-team/AM-DeepSeek-R1-Distilled-1.4M")
    assert is_local("data/train.jsonl") and is_local("./corpus") and is_local("/abs/dir")
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split, kwargs))
        return datasets.Dataset.from_dict({"prompt": ["Hi "], "response": ["there"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    src = DataSource(path="org/some-set", name="main", split="train[:1%]", format="prompt_response")
    ds = build_dataset(section(src), tok)
    assert calls == [("org/some-set", "main", "train[:1%]", {})] and len(ds) == 1
