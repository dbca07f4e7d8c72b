"""Functions the offline task configs name (``!function utils.NAME``): local documents and scoring.

lm-eval imports this file by its path; the work is done in ``edgerazor.evaluation`` modules."""

from __future__ import annotations

import re

from edgerazor.evaluation.local_data import (
    as_datasets, data_dir, gsm8k_rows, humaneval_rows, wikitext_rows,
)
from edgerazor.evaluation.sandbox import pass_at_k, run_program


def gsm8k_dataset(**metadata):
    return as_datasets(gsm8k_rows(data_dir(metadata)))


def humaneval_dataset(**metadata):
    return as_datasets(humaneval_rows(data_dir(metadata)))


def wikitext_dataset(**metadata):
    return as_datasets(wikitext_rows(data_dir(metadata)))


# -- WikiText ------------------------------------------------------------------------------------

#: WikiText's token format back to running text: (pattern, replacement), applied in order
_DETOKENIZE = [
    (r"s '", "s'"), (r" @-@ ", "-"), (r" @,@ ", ","), (r" @\.@ ", "."),
    (r" : ", ": "), (r" ; ", "; "), (r" \. ", ". "), (r" ! ", "! "), (r" \? ", "? "), (r" , ", ", "),
    (r"\(\s*([^\)]*?)\s*\)", r"(\1)"), (r"\[\s*([^\]]*?)\s*\]", r"[\1]"), (r"{\s*([^}]*?)\s*}", r"{\1}"),
    (r"\"\s*([^\"]*?)\s*\"", r'"\1"'), (r"'\s*([^']*?)\s*'", r"'\1'"),
    (r"= = = =", "===="), (r"= = =", "==="), (r"= =", "=="), (" \u00b0 ", "\u00b0"),
    (r" \n", "\n"), (r"\n ", "\n"), (r" N ", " 1 "), (r" 's", "'s"),
]


def wikitext_text(doc) -> str:
    """The text scored for one article: the same clean-up lm-eval's own wikitext task applies."""
    text = doc["page"]
    for pattern, replacement in _DETOKENIZE:
        text = re.sub(pattern, replacement, text)
    return text


def wikitext_results(doc, results):
    """Perplexities are per word and per byte of the article as written in the file (before clean-up)."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["page"]))
    n_bytes = len(doc["page"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, n_bytes),
            "bits_per_byte": (loglikelihood, n_bytes)}


# -- HumanEval -----------------------------------------------------------------------------------

def humaneval_programs(resps, docs):
    """Each completion appended to its prompt: the function the tests call."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]


def pass_at_1(references, predictions, **_):
    """pass@1 of one problem: its test suite run against each completion in a sandboxed child process."""
    (tests,) = references
    (programs,) = predictions
    correct = sum(run_program(program + "\n\n" + tests + "\n").passed for program in programs)
    return pass_at_k(len(programs), correct, 1)
