"""Results people can read: per-model JSON, a table in the layout of the paper's Table 2 (W-A-KV, per-task
scores, average, delta to the 16-bit teacher), a bar plot of the models side by side, and deltas.

A *record* is what ``edgerazor eval`` saves per model: lm-eval's results object with an ``edgerazor``
entry (the model, its kind and W-A-KV, the compute dtype, every setting of the evaluation).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgerazor.errors import EdgeRazorError

#: the metric the paper reports per task (Table 7), lm-eval's key, and a short column name (Table 10's)
PRIMARY: dict[str, tuple[str, str]] = {
    "arc_easy": ("acc_norm,none", "ARC-e"), "arc_challenge": ("acc_norm,none", "ARC-c"),
    "hellaswag": ("acc_norm,none", "HellaS."), "boolq": ("acc,none", "BoolQ"), "piqa": ("acc_norm,none", "PIQA"),
    "winogrande": ("acc,none", "WinoG."), "social_iqa": ("acc,none", "SIQA"), "openbookqa": ("acc_norm,none", "OBQA"),
    "ethics_cm": ("acc,none", "Ethics"), "truthfulqa_mc2": ("acc,none", "Tr.QA2"), "mmlu": ("acc,none", "MMLU"),
    "ifeval": ("prompt_level_strict_acc,none", "IFEval"), "gsm8k": ("exact_match,strict-match", "GSM8K"),
    "humaneval": ("pass_at_1,create_test", "HumanE."), "wikitext": ("word_perplexity,none", "WikiText-2 ppl"),
}


@dataclass
class Score:
    value: float  # as shown: accuracies in percent, perplexities as they are
    metric: str
    higher_is_better: bool


def load_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(Path(path).read_text())
    except ValueError as exc:
        raise EdgeRazorError(f"{path}: not JSON ({exc})") from None
    if not isinstance(record, dict) or not isinstance(record.get("results"), dict):
        raise EdgeRazorError(f"{path}: not an evaluation result (no 'results' object; write one with "
                             "`edgerazor eval MODEL --output DIR`)")
    return record


def label(record: dict[str, Any]) -> str:
    info = record.get("edgerazor", {})
    return info.get("label") or info.get("model") or "model"


def w_a_kv(record: dict[str, Any]) -> str:
    return record.get("edgerazor", {}).get("w_a_kv", "?")


def scores(record: dict[str, Any]) -> dict[str, Score]:
    """The reported score of every task in a record (its group's score for a group such as mmlu)."""
    higher = record.get("higher_is_better", {})
    out = {}
    top = list(record.get("group_subtasks", {}) or record["results"])
    for task in top or record["results"]:
        metrics = record["results"].get(task) or {}
        key = PRIMARY.get(task, (None,))[0]
        if key not in metrics:  # a task the paper does not list: its first numeric metric
            key = next((k for k, v in metrics.items() if "," in k and "_stderr" not in k
                        and isinstance(v, (int, float)) and not isinstance(v, bool)), None)
        if key is None or not isinstance(metrics.get(key), (int, float)):
            continue
        name = key.split(",")[0]
        better = higher.get(task, {}).get(name, "perplexity" not in name and name != "bits_per_byte")
        value = float(metrics[key])
        out[task] = Score(value * 100 if better else value, key, bool(better))
    return out


def column(task: str) -> str:
    return PRIMARY.get(task, (None, task))[1]


def reference_index(records: list[dict[str, Any]]) -> int:
    """The 16-bit teacher's row (the first 16-16-16 model), else the first."""
    return next((i for i, r in enumerate(records) if w_a_kv(r) == "16-16-16"), 0)


def table_rows(records: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Task columns (in the paper's order, then the others) and one row per record: scores, Avg. over the
    higher-is-better tasks every model has, and its delta to the reference (16-bit) model's Avg."""
    per_model = [scores(r) for r in records]
    seen = [t for t in PRIMARY if any(t in s for s in per_model)]
    seen += sorted({t for s in per_model for t in s} - set(seen))
    averaged = [t for t in seen if all(t in s and s[t].higher_is_better for s in per_model)]
    rows = []
    for record, s in zip(records, per_model):
        avg = sum(s[t].value for t in averaged) / len(averaged) if averaged else None
        rows.append({"label": label(record), "w_a_kv": w_a_kv(record), "scores": s, "avg": avg})
    ref = rows[reference_index(records)]["avg"] if rows else None
    for row in rows:
        row["delta"] = row["avg"] - ref if row["avg"] is not None and ref is not None else None
    return seen, rows


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def markdown_table(records: list[dict[str, Any]]) -> str:
    """The paper's Table 2 layout with Table 10's per-task columns: Method | W-A-KV | tasks | Avg. | delta."""
    tasks, rows = table_rows(records)
    ref = rows[reference_index(records)]["label"] if rows else ""
    header = ["Model", "W-A-KV", *[column(t) for t in tasks], "Avg. (↑)", "Δ16-bit (↑)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["label"], row["w_a_kv"], *[_number(row["scores"][t].value) if t in row["scores"] else "-"
                                                 for t in tasks], _number(row["avg"]), _number(row["delta"], True)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"Accuracies in %; Avg. over the tasks where higher is better; Δ16-bit: Avg. minus {ref}'s."]
    lower = [column(t) for t in tasks if rows and not next(iter(r["scores"][t] for r in rows if t in r["scores"])).higher_is_better]
    if lower:
        notes.append(f"Lower is better and not averaged: {', '.join(lower)}.")
    return "\n".join(lines) + "\n\n" + " ".join(notes) + "\n"


def deltas(records: list[dict[str, Any]]) -> str:
    """Every model's per-task difference to the first one (``edgerazor eval --compare A B ...``)."""
    tasks, rows = table_rows(records)
    base = rows[0]
    header = ["Model", "W-A-KV", *[column(t) for t in tasks], "Avg."]
    lines = [f"Differences to {base['label']} ({base['w_a_kv']}); accuracies in points, perplexities as they are.",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows[1:]:
        cells = [row["label"], row["w_a_kv"]]
        for t in tasks:
            here, there = row["scores"].get(t), base["scores"].get(t)
            cells.append(_number(here.value - there.value, True) if here and there else "-")
        cells.append(_number(row["avg"] - base["avg"], True) if row["avg"] is not None and base["avg"] is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_plot(records: list[dict[str, Any]], path: Path) -> Path:
    """Grouped bars per task (and Avg.), one colour per model; perplexity tasks in a panel of their own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks, rows = table_rows(records)
    up = [t for t in tasks if all(r["scores"][t].higher_is_better for r in rows if t in r["scores"])]
    down = [t for t in tasks if t not in up]
    panels = [("score (%)", up + ["Avg."])] + ([("perplexity (lower is better)", down)] if down else [])
    widths = [max(2, len(p[1])) for p in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 + 1.2 * sum(widths), 4.2),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    width = 0.8 / max(1, len(rows))
    for ax, (ylabel, names) in zip(axes[0], panels):
        x = np.arange(len(names))
        for i, row in enumerate(rows):
            values = [row["avg"] if t == "Avg." else row["scores"][t].value if t in row["scores"] else np.nan
                      for t in names]
            values = [np.nan if v is None else v for v in values]
            bars = ax.bar(x + (i - (len(rows) - 1) / 2) * width, values, width, label=f"{row['label']} ({row['w_a_kv']})")
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(x, [column(t) if t != "Avg." else t for t in names], rotation=20)
        ax.set_ylabel(ylabel)
        if ylabel.startswith("score"):
            ax.set_ylim(0, 100)
    axes[0][0].legend(fontsize=8, loc="best")
    fig.suptitle("teacher vs students")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
