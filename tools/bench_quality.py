"""Quality benchmark: the paper's Table 4 grid in miniature, against a teacher trained to convergence.

    python tools/bench_quality.py                      # full run (teacher cached after the first run)
    python tools/bench_quality.py --quick              # tiny smoke configuration (~2 minutes)
    python tools/bench_quality.py --cells "1.88:SG+A+E,1.88:QAT-CE" --steps 300 --lr 1e-3
    python tools/bench_quality.py --cells "1.88:SG+A+E,1.88:PT+A+E,1.88:QAT-CE" --eval-every 10

Why the teacher must be converged: with an under-trained teacher, CE-only QAT keeps learning from
the data and overtakes the teacher, while distillation is capped by it; the comparison then
measures the teacher's training budget, not quantization. So the teacher is trained with early
stopping on held-out perplexity (below), cached, and its perplexity curve is kept in the JSON.

Data (all from ``../shared/data``; nothing is copied into the repository)
  * Held-out evaluation: WikiText-2 ``valid.txt`` split by article (lines `` = Title = ``); the
    LAST ``heldout_articles`` articles (12 of 60 by default, ~20%) are never seen by the
    tokenizer, the teacher or any student. Evaluation uses a fixed slice: the first
    ``eval_blocks`` packed blocks of those articles.
  * Training: the other 48 WikiText-2 articles (in-domain text, so held-out perplexity measures
    language modelling rather than domain shift) plus Tiny Shakespeare (other real English, so the
    ~0.27M in-domain tokens are not the whole corpus): ~0.6M tokens. ``gsm8k_chars`` > 0 adds that
    many characters of GSM8K questions+solutions (off by default: it mostly lengthens each epoch).
    Training only on the other corpora would make held-out WikiText perplexity mostly a measure of
    domain shift; training on all of valid.txt would leave nothing held out.
  * A byte-level BPE (Qwen2 pre-tokenizer, ``edgerazor.demo.train_tokenizer``) trained on the
    training text only; documents are joined with EOS and cut into ``seq_len`` blocks.

Teacher: a real ``Qwen3ForCausalLM`` (default 4 layers, hidden 256, head_dim 64, tied embeddings),
AdamW with warmup then a constant learning rate, held-out perplexity every ``eval_every`` steps.
An evaluation "improves" when it beats the best so far by at least ``min_delta`` (1%). After
``patience`` evaluations without improvement the learning rate drops by ``drop_factor``; after
``max_drops`` drops and another ``patience`` non-improving evaluations training stops: held-out
perplexity has stopped improving even at a lower learning rate. The best weights are kept. The
whole state is checkpointed at every evaluation, so a run stopped by ``--teacher-max-minutes``
resumes next time; the finished teacher is cached in
``~/.cache/edgerazor/bench_quality/<hash of the settings>`` (built in ``<key>.partial`` and
renamed into place when converged).

Grid (paper Table 4, W-A-KV with 8-bit activations and KV cache):
  2.79 bits: SG+A+E, ST+A+E;  2.19 and 1.88 bits: SG+A+E, SG+A+C, SG+F+E, SG+F+F
  (SG/ST = super-group / stacked allocation, A/F = adaptive (LAFD) / fixed layers [1, 2, -1],
  E/C/F = EAKLD / CAKLD / forward KL), with alphas 0.1 / 0.1 / 2.0 (task / feature / logit).
  Beyond the paper, PT+A+E at 2.19 and 1.88 bits: the ``per_tensor`` allocation (whole tensors
  4-bit or ternary) beside SG+A+E, same selector, mixer and token budget.
Baselines at every bit-width: RTN (round-to-nearest PTQ of the teacher, super-group allocation;
at 2.79 also stacked) and QAT-CE (the same quantized student trained through the same
``DistillationTrainer`` with alpha_task=1, alpha_feature=0, alpha_logit=0). Every trained cell
uses the same steps, batch size, sequence length, learning rate, schedule and data order: the
same token budget.

Which allocation to deploy: stock llama.cpp has no GGML type for a tensor that mixes 4-bit and
ternary rows, so a super-group layer is written losslessly as Q4_0 (4.5 bits/weight), while a
``per_tensor`` tensor is TQ2_0 or Q4_0 at its own size. Every row therefore shows the decoder's
realised bits, the GGUF file's size (type auto; measured on the round-to-nearest student of that
allocation and bit-width: types and shapes, hence bytes, do not depend on training) and whether
it deploys at its true size in stock llama.cpp, or how many mixed tensors fall back and the cost.
(per_tensor realises exactly rho of each tensor kind only when layers x rho is an integer: with 4
layers, 2.19 bits is exact and 1.88 realises 1.85 bits.)

Tokens (``--eval-every N``): each cell's held-out perplexity every N steps; a second table gives
the first step (so the token budget, to within N steps) at which each distilled cell reaches
QAT-CE's final perplexity of its bit-width, and QAT-CE's budget over it: the paper's "4-10x fewer
tokens" claim in miniature. Step 0 is the cell's round-to-nearest start.

Gap closure = (log ppl_RTN - log ppl_student) / (log ppl_RTN - log ppl_teacher), with the
super-group RTN of the same bit-width as the reference for every cell (ST included), so the
closures of one bit-width rank exactly as their perplexities do.

Outputs in ``--out`` (default ``runs/bench_quality``): ``results.json``, ``results.png`` (bars with
each cell's GGUF MiB, and with ``--eval-every`` the perplexity curves against tokens) and
``cells/*.json`` (one per finished cell; a rerun with identical settings reuses them, so an
interrupted run continues where it stopped; ``--fresh`` ignores them).
Target: at 1.88 bits SG+A+E closes >= 80% of the gap and beats QAT-CE.
Reference run (2 shared CPU cores, defaults): teacher 73.1 (best at step 1000; 75.5 by 1100, so
training stopped; 44 min), RTN 1.88 82.6, SG+A+E 74.2 (88% closed), QAT-CE 77.1 (56%); the grid
takes ~40 min. ``OMP_WAIT_POLICY=PASSIVE`` is set because spinning OpenMP threads made each step
2-4x slower on a busy 2-core machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# On a shared machine, spinning OpenMP workers fight other processes for the cores: measured on
# 2 busy cores, a training step took 2.3 s with passive waiting and 4-9 s with the default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from edgerazor.demo import blocks_dataset, default_cache_root, pretraining_optimizer, pretraining_step, teacher_config
from edgerazor.recipe import DemoTeacher
from edgerazor.run import gap_closure

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = (REPO / ".." / "shared" / "data").resolve()
CACHE_FORMAT = 1
TARGET_CLOSURE = 0.80

# --------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class TeacherSettings:
    """Everything that decides the teacher (its hash names the cache directory). The shape is the
    recipe's ``demo.teacher`` section; its input dims must be multiples of the quantizer's group size (256)."""

    shape: DemoTeacher = DemoTeacher()
    # data
    vocab_size: int = 4096
    heldout_articles: int = 12
    eval_blocks: int = 128
    gsm8k_chars: int = 0
    shakespeare: bool = True
    # optimisation and convergence
    lr: float = 2e-3
    batch_size: int = 16
    warmup_steps: int = 50
    weight_decay: float = 0.1
    eval_every: int = 50
    min_delta: float = 0.01
    patience: int = 2
    max_drops: int = 1
    drop_factor: float = 0.3
    max_steps: int = 20_000
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Flat, the shape's fields beside the others (the mapping the cache key has always hashed)."""
        rest = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "shape"}
        return {**self.shape.model_dump(mode="json"), **rest}


QUICK_TEACHER = TeacherSettings(
    shape=DemoTeacher(seq_len=128, intermediate_size=512, num_layers=2),
    vocab_size=1024, heldout_articles=4, eval_blocks=16, shakespeare=False, lr=3e-3, batch_size=8, warmup_steps=10, eval_every=20, patience=1,
    max_drops=1, max_steps=400,
)

#: (bits, label) in Table 4's order. Label: allocation + selector + KL mixer, or QAT-CE.
TABLE4 = [
    (2.79, "SG+A+E"), (2.79, "ST+A+E"),
    (2.19, "SG+A+E"), (2.19, "SG+A+C"), (2.19, "SG+F+E"), (2.19, "SG+F+F"),
    (1.88, "SG+A+E"), (1.88, "SG+A+C"), (1.88, "SG+F+E"), (1.88, "SG+F+F"),
]
BITS = (2.79, 2.19, 1.88)
#: Beyond Table 4: the ``per_tensor`` allocation (whole tensors 4-bit or ternary, which stock llama.cpp
#: holds at their own size) beside super-group, with the same selector, mixer and token budget.
PER_TENSOR_CELLS = [(2.19, "PT+A+E"), (1.88, "PT+A+E")]
#: --quick runs one cell of every kind (ST, PT, fixed layers, each KL mixer, QAT-CE) to stay near 2 minutes.
QUICK_CELLS = "2.79:ST+A+E,1.88:SG+A+E,1.88:PT+A+E,1.88:SG+F+F,1.88:SG+A+C,1.88:QAT-CE"
ALLOCATIONS = {"SG": "super_group", "ST": "stacked", "PT": "per_tensor"}
SELECTORS = {"A": ("adaptive", {"k": 3}), "F": ("fixed", {"layers": [1, 2, -1]})}
MIXERS = {"E": "eakld", "C": "cakld", "F": "forward"}


# --------------------------------------------------------------------------------------------
# data


def _log(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"[bench_quality {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr)
    sys.stderr.flush()


def wikitext_articles(path: Path) -> list[str]:
    """WikiText split into articles: a new one starts at every top-level `` = Title = `` line."""
    heading = re.compile(r"^ = [^=].* = $")
    articles: list[list[str]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if heading.match(line) or not articles:
            articles.append([])
        articles[-1].append(line)
    return ["\n".join(a).strip("\n") for a in articles if any(l.strip() for l in a)]


def load_texts(settings: TeacherSettings, data_dir: Path) -> tuple[list[str], list[str], dict[str, Any]]:
    """(training documents, held-out documents, statistics)."""
    wiki = data_dir / "wikitext-2" / "valid.txt"
    if not wiki.is_file():
        raise SystemExit(f"{wiki} not found: pass --data-dir (the shared data directory)")
    articles = wikitext_articles(wiki)
    if settings.heldout_articles >= len(articles):
        raise SystemExit(f"heldout_articles={settings.heldout_articles} but valid.txt has {len(articles)} articles")
    held = articles[-settings.heldout_articles:]
    train = list(articles[: -settings.heldout_articles])
    stats: dict[str, Any] = {"wikitext_articles": len(articles), "wikitext_train_articles": len(train),
                             "wikitext_heldout_articles": len(held),
                             "wikitext_train_chars": sum(map(len, train)), "heldout_chars": sum(map(len, held))}
    if settings.shakespeare:
        text = (data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
        train.append(text)
        stats["shakespeare_chars"] = len(text)
    if settings.gsm8k_chars > 0:
        chars = 0
        with open(data_dir / "gsm8k" / "train.jsonl", encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                doc = f"{row['question']}\n{row['answer']}"
                train.append(doc)
                chars += len(doc)
                if chars >= settings.gsm8k_chars:
                    break
        stats["gsm8k_chars"] = chars
    stats["train_chars"] = sum(map(len, train))
    return train, held, stats


def build_data(settings: TeacherSettings, data_dir: Path, out: Path) -> dict[str, Any]:
    """Tokenizer (``out/tokenizer``) and packed blocks (``out/data.pt``)."""
    from edgerazor.demo import pack_blocks, train_tokenizer

    train_texts, held_texts, stats = load_texts(settings, data_dir)
    t = time.perf_counter()
    tokenizer = train_tokenizer(train_texts, settings.vocab_size)  # held-out text never reaches it
    tokenizer.model_max_length = settings.shape.seq_len
    backend = tokenizer.backend_tokenizer
    train_ids = [e.ids for e in backend.encode_batch(train_texts, add_special_tokens=False)]
    held_ids = [e.ids for e in backend.encode_batch(held_texts, add_special_tokens=False)]
    train_blocks = pack_blocks(train_ids, tokenizer.eos_token_id, settings.shape.seq_len)
    held_blocks = pack_blocks(held_ids, tokenizer.eos_token_id, settings.shape.seq_len)
    if len(held_blocks) < settings.eval_blocks:
        raise SystemExit(f"only {len(held_blocks)} held-out blocks, eval_blocks={settings.eval_blocks}")
    eval_blocks = held_blocks[: settings.eval_blocks]  # a fixed slice: the first N blocks
    stats.update(vocab=len(tokenizer), train_tokens=sum(map(len, train_ids)), train_blocks=len(train_blocks),
                 heldout_blocks=len(held_blocks), eval_blocks=len(eval_blocks),
                 eval_tokens=len(eval_blocks) * settings.shape.seq_len,
                 chars_per_token=stats["train_chars"] / max(sum(map(len, train_ids)), 1),
                 tokenize_seconds=time.perf_counter() - t)
    tokenizer.save_pretrained(out / "tokenizer")
    torch.save({"train": torch.tensor(train_blocks, dtype=torch.long),
                "eval": torch.tensor(eval_blocks, dtype=torch.long), "stats": stats}, out / "data.pt")
    _log(f"data: {stats['train_tokens'] / 1e6:.2f}M training tokens ({len(train_blocks)} blocks), "
         f"{len(eval_blocks)} held-out eval blocks of {settings.shape.seq_len}; vocab {len(tokenizer)}, "
         f"{stats['chars_per_token']:.2f} chars/token")
    return stats


# --------------------------------------------------------------------------------------------
# teacher


def teacher_key(settings: TeacherSettings, data_dir: Path) -> str:
    import tokenizers
    import transformers

    files = ["wikitext-2/valid.txt", "tinyshakespeare/input.txt", "gsm8k/train.jsonl"]
    payload = {
        "format": CACHE_FORMAT, "settings": settings.to_dict(),
        "data": {f: (data_dir / f).stat().st_size for f in files if (data_dir / f).is_file()},
        "versions": {"transformers": transformers.__version__.split(".")[0], "tokenizers": tokenizers.__version__,
                     "torch": torch.__version__.split("+")[0]},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _ppl(model, dataset) -> float:
    from edgerazor.eval.perplexity import perplexity

    return perplexity(model, dataset, batch_size=8, progress=True)


def train_teacher(settings: TeacherSettings, work: Path, max_minutes: float) -> dict[str, Any]:
    """Train (or resume) until held-out perplexity stops improving; returns the state summary."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    data = torch.load(work / "data.pt")
    train_blocks, eval_ds = data["train"], blocks_dataset(data["eval"].tolist())
    torch.manual_seed(settings.seed)
    model = Qwen3ForCausalLM(teacher_config(settings.shape, tokenizer, len(tokenizer)))
    optimizer = pretraining_optimizer(model, settings.lr, settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    state: dict[str, Any] = {"step": 0, "lr": settings.lr, "best": math.inf, "best_step": 0, "bad": 0, "drops": 0,
                             "converged": False, "curve": [], "train_seconds": 0.0, "eval_seconds": 0.0,
                             "order": torch.randperm(len(train_blocks), generator=generator), "cursor": 0,
                             "epoch": 0, "losses": []}
    best_weights = None
    progress_file = work / "progress.pt"
    if progress_file.is_file():
        saved = torch.load(progress_file, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        best_weights = saved["best_weights"]
        state = saved["state"]
        _log(f"teacher: resuming at step {state['step']} (best held-out ppl {state['best']:.2f}, "
             f"{state['train_seconds'] / 60:.1f} min trained)")
    n_params = sum(p.numel() for p in model.parameters())
    _log(f"teacher: Qwen3 {settings.shape.num_layers} layers, hidden {settings.shape.hidden_size}, "
         f"{n_params / 1e6:.2f}M parameters; batch {settings.batch_size}x{settings.shape.seq_len}; eval every {settings.eval_every} steps")

    def set_lr(step: int) -> None:
        warm = min(1.0, (step + 1) / settings.warmup_steps) if settings.warmup_steps else 1.0
        for group in optimizer.param_groups:
            group["lr"] = state["lr"] * warm

    deadline = time.perf_counter() + max_minutes * 60
    if state["step"] == 0 and not state["curve"]:
        t = time.perf_counter()
        ppl0 = _ppl(model, eval_ds)
        state["eval_seconds"] += time.perf_counter() - t
        state["curve"].append({"step": 0, "ppl": ppl0, "lr": 0.0, "tokens": 0, "minutes": 0.0})
    bar = tqdm(total=settings.max_steps, initial=state["step"], desc="teacher", unit="step", mininterval=5.0)
    model.train()
    timed_out = False
    while not state["converged"] and state["step"] < settings.max_steps:
        if time.perf_counter() > deadline:
            timed_out = True
            break
        t = time.perf_counter()
        if state["cursor"] + settings.batch_size > len(state["order"]):
            state["order"], state["cursor"] = torch.randperm(len(train_blocks), generator=generator), 0
            state["epoch"] += 1
        batch = train_blocks[state["order"][state["cursor"]: state["cursor"] + settings.batch_size]]
        state["cursor"] += settings.batch_size
        set_lr(state["step"])
        state["losses"].append(pretraining_step(model, optimizer, batch))
        state["step"] += 1
        state["train_seconds"] += time.perf_counter() - t
        bar.update(1)
        recent = state["losses"][-20:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}",
                        best=f"{state['best']:.1f}", refresh=False)
        if state["step"] % settings.eval_every:
            continue
        t = time.perf_counter()
        ppl = _ppl(model, eval_ds)
        state["eval_seconds"] += time.perf_counter() - t
        improved = ppl < state["best"] * (1 - settings.min_delta)
        if ppl < state["best"]:
            best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            state["best"], state["best_step"] = ppl, state["step"]
        note = "improved" if improved else "no 1% improvement"
        if improved:
            state["bad"] = 0
        else:
            state["bad"] += 1
            if state["bad"] >= settings.patience:
                if state["drops"] < settings.max_drops:
                    state["lr"] *= settings.drop_factor
                    state["drops"] += 1
                    state["bad"] = 0
                    note += f"; lr -> {state['lr']:.1e}"
                else:
                    state["converged"] = True
                    note += "; converged"
        state["curve"].append({"step": state["step"], "ppl": ppl, "lr": optimizer.param_groups[0]["lr"],
                               "tokens": state["step"] * settings.batch_size * settings.shape.seq_len,
                               "minutes": state["train_seconds"] / 60, "epoch": state["epoch"]})
        _log(f"teacher step {state['step']}: held-out ppl {ppl:.2f} (best {state['best']:.2f} at "
             f"{state['best_step']}; train loss {sum(recent) / len(recent):.3f}; epoch {state['epoch']}) {note}")
        _atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "generator": generator.get_state(), "best_weights": best_weights, "state": state},
                     progress_file)
        model.train()
    bar.close()
    if best_weights is not None:
        model.load_state_dict(best_weights)
    model.eval()
    if timed_out:
        _log(f"teacher: NOT converged after {state['train_seconds'] / 60:.1f} min (--teacher-max-minutes); "
             "using the best weights so far; the next run resumes from the checkpoint")
    elif not state["converged"]:
        _log(f"teacher: NOT converged within max_steps={settings.max_steps}")
    state["parameters"] = n_params
    return {"model": model, "tokenizer": tokenizer, "state": state}


@dataclass
class TeacherAssets:
    teacher_dir: Path
    train_blocks: torch.Tensor
    eval_blocks: torch.Tensor
    meta: dict[str, Any]


def prepare_teacher(settings: TeacherSettings, data_dir: Path, max_minutes: float, root: Path) -> TeacherAssets:
    key = teacher_key(settings, data_dir)
    final = root / key
    if not (final / "meta.json").is_file():
        work = root / f"{key}.partial"
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "data.pt").is_file():
            build_data(settings, data_dir, work)
        _log(f"teacher: training to convergence in {work} (at most {max_minutes:g} min this run)")
        result = train_teacher(settings, work, max_minutes)
        state = result["state"]
        data = torch.load(work / "data.pt")
        meta = {"format": CACHE_FORMAT, "key": key, "settings": settings.to_dict(), "data": data["stats"],
                "teacher_ppl": state["best"], "best_step": state["best_step"], "steps": state["step"],
                "converged": state["converged"], "curve": state["curve"], "lr_drops": state["drops"],
                "train_minutes": state["train_seconds"] / 60, "eval_minutes": state["eval_seconds"] / 60,
                "epochs": state["step"] * settings.batch_size / max(len(data["train"]), 1),
                "parameters": state["parameters"], "threads": torch.get_num_threads(), "built_at": time.time()}
        target = work / "teacher"
        result["model"].generation_config.eos_token_id = result["tokenizer"].eos_token_id
        result["model"].generation_config.pad_token_id = result["tokenizer"].pad_token_id
        result["model"].save_pretrained(target)
        result["tokenizer"].save_pretrained(target)
        if not state["converged"]:  # usable now, but never cached as final: the next run resumes
            (work / "meta.partial.json").write_text(json.dumps(meta, indent=1))
            return TeacherAssets(target, data["train"], data["eval"], meta)
        (work / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: complete
        (work / "progress.pt").unlink(missing_ok=True)  # optimizer state is not needed any more
        if final.exists():
            shutil.rmtree(final)
        os.rename(work, final)
        _log(f"teacher: converged, cached in {final}")
    else:
        _log(f"teacher: using the cached converged teacher {final}")
    meta = json.loads((final / "meta.json").read_text())
    data = torch.load(final / "data.pt")
    return TeacherAssets(final / "teacher", data["train"], data["eval"], meta)


# --------------------------------------------------------------------------------------------
# grid


@dataclass(frozen=True)
class TrainSettings:
    # Tuned on the 1.88-bit cells (SG+A+E and QAT-CE, same settings): a constant 5e-4 for 100 steps
    # closed 62% (QAT-CE 30%); a cosine decay from 1e-3 over 150 steps closed 88% (QAT-CE 56%).
    steps: int = 150
    batch_size: int = 8
    lr: float = 1e-3
    scheduler: str = "cosine"
    warmup_ratio: float = 0.05
    alpha_task: float = 0.1
    alpha_feature: float = 0.1
    alpha_logit: float = 2.0
    seed: int = 42


def quant_section(bits: float, allocation: str, head_dim: int) -> dict[str, Any]:
    return {"scheme": f"{bits:g}-8-8", "weight": {"allocation": allocation, "group_size": 256},
            "kv_cache": {"group_size": head_dim}}


def cell_allocation(label: str) -> str:
    """The weight allocation a grid cell trains (QAT-CE uses super-group, as the paper's baseline)."""
    return "super_group" if label == "QAT-CE" else ALLOCATIONS[label.split("+")[0]]


def cell_recipe(bits: float, label: str, train: TrainSettings, head_dim: int):
    from edgerazor.recipe import recipe_from_dict

    alloc = cell_allocation(label)
    if label == "QAT-CE":
        distill = {"alpha_task": 1.0, "alpha_feature": 0.0, "alpha_logit": 0.0}
    else:
        _, s, m = label.split("+")
        selector, options = SELECTORS[s]
        distill = {"alpha_task": train.alpha_task, "alpha_feature": train.alpha_feature,
                   "alpha_logit": train.alpha_logit, "selector": selector, "selector_options": options,
                   "kl_mixer": MIXERS[m]}
    return recipe_from_dict({
        "name": f"bench-quality-{bits:g}-{label}", "model": {"adapter": "qwen3"},
        "quant": quant_section(bits, alloc, head_dim), "distill": distill,
        "train": {"learning_rate": train.lr, "lr_scheduler": train.scheduler, "warmup_ratio": train.warmup_ratio,
                  "max_steps": train.steps, "per_device_batch_size": train.batch_size, "logging_steps": 10,
                  "save_steps": 10 ** 9, "seed": train.seed},
    }, source=f"bench_quality {bits:g} {label}")


def load_student(teacher_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)


def gguf_footprint(model, tokenizer, path: Path, float_type: str = "f32") -> dict[str, Any]:
    """The size of ``model``'s GGUF export (type auto) and whether stock llama.cpp holds it at its true size.

    A tensor no single GGML type stores at its own precision (a super-group layer mixing 4-bit and
    ternary rows) is written losslessly in a wider type (Q4_0); ``true_size`` is True when no tensor
    needed that. ``own_bytes`` is the file without those fallbacks' extra bytes. The file is removed
    afterwards: only its numbers are kept."""
    from edgerazor.export.gguf import write_gguf

    report = write_gguf(model, tokenizer, path, quiet=True, overwrite=True, float_type=float_type)
    path.unlink()
    fallbacks = report.fallback_summary()
    extra = sum(r["extra_bytes"] for r in fallbacks)
    types: dict[str, int] = {}
    for t in report.tensors:
        types[t.ggml_type] = types.get(t.ggml_type, 0) + 1
    return {"gguf_bytes": report.file_bytes, "true_size": not fallbacks,
            "fallback_tensors": sum(r["tensors"] for r in fallbacks), "fallback_extra_bytes": extra,
            "own_bytes": report.file_bytes - extra, "gguf_types": types}


def run_rtn(assets: TeacherAssets, bits: float, allocation: str, eval_ds, head_dim: int, tokenizer=None,
            gguf_dir: Path | None = None) -> dict[str, Any]:
    """Round-to-nearest perplexity, the decoder's effective bits and (with ``gguf_dir``) the GGUF
    footprint of this allocation: types and shapes, hence sizes, depend on the allocation and
    bit-width alone, so a trained student of the same cell exports to the same number of bytes."""
    import edgerazor
    from edgerazor.quant.bits import count_bits
    from edgerazor.recipe import recipe_from_dict

    t = time.perf_counter()
    student = load_student(assets.teacher_dir)
    edgerazor.quantize(student, recipe_from_dict({"quant": quant_section(bits, allocation, head_dim)}))
    ppl = _ppl(student, eval_ds)
    result = {"ppl": ppl, "seconds": time.perf_counter() - t, "effective_bits": count_bits(student).effective_bits}
    if gguf_dir is not None:
        result.update(gguf_footprint(student, tokenizer, gguf_dir / f"rtn-{bits:g}-{allocation}.gguf"))
    return result


def run_cell(assets: TeacherAssets, teacher, bits: float, label: str, train: TrainSettings, train_ds, eval_ds,
             head_dim: int, tokenizer, out_dir: Path, eval_every: int) -> dict[str, Any]:
    import tempfile

    from transformers import TrainerCallback

    import edgerazor
    from edgerazor.data import DistillCollator
    from edgerazor.distill import distill

    recipe = cell_recipe(bits, label, train, head_dim)
    student = load_student(assets.teacher_dir)
    edgerazor.quantize(student, recipe)
    curve: list[dict[str, float]] = []
    eval_time = [0.0]

    class EvalCallback(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if eval_every and state.global_step % eval_every == 0 and state.global_step < state.max_steps:
                t0 = time.perf_counter()
                curve.append({"step": state.global_step, "ppl": _ppl(model, eval_ds)})
                eval_time[0] += time.perf_counter() - t0
                _log(f"  {bits:g} {label} step {state.global_step}: held-out ppl {curve[-1]['ppl']:.2f}")

    _log(f"cell {bits:g}-8-8 {label}: {train.steps} steps x {train.batch_size} x {assets.eval_blocks.shape[1]} tokens, "
         f"lr {train.lr:g}")
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-quality-", dir=out_dir) as tmp:
        trainer = distill(teacher, student, train_ds, recipe, tmp, DistillCollator(tokenizer),
                          callbacks=[EvalCallback()] if eval_every else None, save_strategy="no",
                          disable_tqdm=False)
    train_seconds = time.perf_counter() - t - eval_time[0]
    t = time.perf_counter()
    ppl = _ppl(student, eval_ds)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"bits": bits, "method": label, "ppl": ppl, "train_seconds": train_seconds,
            "eval_seconds": time.perf_counter() - t, "steps": trainer.state.global_step, "curve": curve,
            "last_log": logs[-1] if logs else {}, "recipe": recipe.model_dump(mode="json")}


# --------------------------------------------------------------------------------------------
# report


def first_reach(points: list[tuple[int, float]], target: float) -> int | None:
    """The first step (points in step order) whose held-out perplexity is at or below ``target``."""
    return next((step for step, ppl in points if ppl <= target), None)


def tokens_to_match(cell: dict[str, Any], start_ppl: float, reference: dict[str, Any],
                    tokens_per_step: int) -> dict[str, Any]:
    """When ``cell`` first reaches ``reference``'s final perplexity (the paper's "fewer tokens" claim).

    The cell's points are step 0 (its round-to-nearest start, ``start_ppl``), its ``--eval-every``
    curve and its final perplexity, so the step found is exact to within one evaluation interval
    (an upper bound: it was reached at or before it). ``fewer_tokens`` is the reference's token
    budget over the cell's tokens at that step (None if never reached, or already at step 0)."""
    points = [(0, start_ppl)] + [(c["step"], c["ppl"]) for c in cell.get("curve", [])] + [(cell["steps"], cell["ppl"])]
    step = first_reach(points, reference["ppl"])
    ref_tokens = reference["steps"] * tokens_per_step
    tokens = None if step is None else step * tokens_per_step
    return {"target_ppl": reference["ppl"], "reference_tokens": ref_tokens, "step": step, "tokens": tokens,
            "fewer_tokens": ref_tokens / tokens if tokens else None, "reached": step is not None,
            "evaluated_steps": [p[0] for p in points]}


def _mib(footprint: dict[str, Any]) -> str:
    return f"{footprint['gguf_bytes'] / 2**20:.2f}"


def true_size_text(footprint: dict[str, Any]) -> str:
    """The table's deployment column: yes, or how many tensors fall back to a wider type and what it costs."""
    if "true_size" not in footprint:
        return "-"
    if footprint["true_size"]:
        return "yes"
    return (f"no: {footprint['fallback_tensors']} mixed tensors -> Q4_0 "
            f"({footprint['gguf_bytes'] / footprint['own_bytes']:.2f}x own size)")


def render_table(rows: list[dict[str, Any]], teacher_ppl: float, title: str, teacher_gguf: dict[str, Any] | None = None):
    from rich.table import Table

    table = Table(title=title)
    for col, justify in (("method", "left"), ("bits (W-A-KV)", "left"), ("decoder bits", "right"),
                         ("held-out ppl", "right"), ("gap closure", "right"), ("GGUF MiB", "right"),
                         ("true size in stock llama.cpp", "left"), ("time (s)", "right")):
        table.add_column(col, justify=justify)
    table.add_row("teacher (fp32)", "16-16-16", "16", f"{teacher_ppl:.2f}", "100% (def.)",
                  _mib(teacher_gguf) if teacher_gguf else "-", "yes (F16)" if teacher_gguf else "-", "-")
    last_bits = None
    for r in rows:
        if last_bits is not None and r["bits"] != last_bits:
            table.add_section()
        last_bits = r["bits"]
        close = r.get("closure")
        cl = "-" if close is None or math.isnan(close) else f"{close:.1%}"
        eff = r.get("effective_bits")
        table.add_row(r["method"], f"{r['bits']:g}-8-8", "-" if eff is None else f"{eff:.2f}", f"{r['ppl']:.2f}", cl,
                      _mib(r) if "gguf_bytes" in r else "-", true_size_text(r), f"{r['seconds']:.0f}")
    return table


def render_reach(reach: list[dict[str, Any]], eval_every: int):
    from rich.table import Table

    table = Table(title=f"Tokens to reach QAT-CE's final held-out perplexity (evaluated every {eval_every} steps)")
    for col in ("bits", "method", "QAT-CE final ppl", "QAT-CE tokens", "reached at step", "tokens", "fewer tokens"):
        table.add_column(col, justify="left" if col in ("bits", "method") else "right")
    for r in reach:
        fewer = "-" if r["fewer_tokens"] is None else f"{r['fewer_tokens']:.1f}x"
        table.add_row(f"{r['bits']:g}", r["method"], f"{r['target_ppl']:.2f}", f"{r['reference_tokens'] / 1e3:.0f}k",
                      "not reached" if r["step"] is None else str(r["step"]),
                      "-" if r["tokens"] is None else f"{r['tokens'] / 1e3:.0f}k", fewer)
    return table


def plot(rows: list[dict[str, Any]], teacher_ppl: float, path: Path, title: str,
         reach: list[dict[str, Any]] = (), tokens_per_step: int = 0) -> None:
    """Perplexity bars per bit-width; with ``--eval-every`` curves, a second panel of held-out
    perplexity against training tokens, QAT-CE's final perplexity dashed and each first match marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits_list = [b for b in BITS if any(r["bits"] == b for r in rows)]
    curves = [r for r in rows if r.get("curve")]
    if curves and tokens_per_step:
        fig, (ax, cx) = plt.subplots(1, 2, figsize=(18, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    else:
        fig, ax = plt.subplots(figsize=(12, 5.5))
        cx = None
    x, colours = 0.0, {}
    palette = plt.get_cmap("tab10")
    ticks, labels = [], []
    for b in bits_list:
        group = [r for r in rows if r["bits"] == b and not r["method"].startswith("RTN")]
        rtn = next((r for r in rows if r["bits"] == b and r["method"] == "RTN"), None)
        start = x
        for r in group:
            colour = colours.setdefault(r["method"], palette(len(colours) % 10))
            ax.bar(x, r["ppl"], width=0.8, color=colour, label=r["method"] if r["method"] not in ax.get_legend_handles_labels()[1] else None)
            size = f"\n{r['gguf_bytes'] / 2**20:.2f} MiB{'' if r.get('true_size') else '*'}" if "gguf_bytes" in r else ""
            ax.text(x, r["ppl"], f"{r['ppl']:.1f}{size}", ha="center", va="bottom", fontsize=7)
            x += 1
        if rtn is not None:
            ax.hlines(rtn["ppl"], start - 0.5, x - 0.5, colors="red", linestyles="--",
                      label="RTN (super-group)" if b == bits_list[0] else None)
            ax.text(x - 0.55, rtn["ppl"], f"RTN {rtn['ppl']:.1f}", color="red", fontsize=7, va="bottom", ha="right")
        ticks.append((start + x - 1) / 2)
        labels.append(f"{b:g}-8-8")
        x += 1
    ax.axhline(teacher_ppl, color="black", linestyle=":", label=f"teacher {teacher_ppl:.1f}")
    ax.set_xticks(ticks, labels)
    ax.set_ylabel("held-out perplexity (WikiText-2, log scale)")
    ax.set_yscale("log")
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_title(title + ("\n(MiB: GGUF file; *: not at true size in stock llama.cpp)" if any("gguf_bytes" in r for r in rows) else ""),
                 fontsize=10)
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    if cx is not None:
        styles = ("-", "--", ":")
        for r in curves:
            xs = [0.0] + [c["step"] * tokens_per_step / 1e3 for c in r["curve"]] + [r["steps"] * tokens_per_step / 1e3]
            ys = [r.get("start_ppl", math.nan)] + [c["ppl"] for c in r["curve"]] + [r["ppl"]]
            cx.plot(xs, ys, styles[bits_list.index(r["bits"]) % 3], color=colours.get(r["method"], "grey"),
                    marker=".", label=f"{r['method']} {r['bits']:g}")
        for m in reach:
            cx.axhline(m["target_ppl"], color="grey", linewidth=0.6, linestyle=styles[bits_list.index(m["bits"]) % 3])
            if m["tokens"]:
                cx.plot([m["tokens"] / 1e3], [m["target_ppl"]], "kx")
                cx.annotate(f"{m['fewer_tokens']:.1f}x", (m["tokens"] / 1e3, m["target_ppl"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 4))
        cx.set_xlabel("training tokens (thousands)")
        cx.set_ylabel("held-out perplexity")
        cx.set_title("held-out ppl while training; grey: QAT-CE final, x: first reached")
        cx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# main


def parse_cells(spec: str | None, qat_bits: list[float]) -> list[tuple[float, str]]:
    grid = list(TABLE4)
    for b, label in PER_TENSOR_CELLS:  # right after the super-group cell it mirrors
        grid.insert(grid.index((b, "SG+A+E")) + 1, (b, label))
    for b in qat_bits:
        # QAT-CE goes right after its bit-width's distilled cells
        index = max(i for i, (bb, _) in enumerate(grid) if bb == b) + 1
        grid.insert(index, (b, "QAT-CE"))
    if not spec:
        return grid
    wanted = []
    for item in spec.split(","):
        b, _, label = item.strip().partition(":")
        cell = (float(b), label.strip())
        if cell not in grid:
            raise SystemExit(f"--cells: {item!r} is not in the grid ({', '.join(f'{x:g}:{y}' for x, y in grid)})")
        wanted.append(cell)
    return [c for c in grid if c in wanted]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="distillation steps per cell (same for every cell)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step")
    parser.add_argument("--lr", type=float, default=None, help="student learning rate (every cell)")
    parser.add_argument("--scheduler", default=None, choices=["constant_with_warmup", "cosine", "linear", "constant"],
                        help="student learning-rate schedule (every cell)")
    parser.add_argument("--warmup-ratio", type=float, default=None)
    parser.add_argument("--alphas", default=None, help="task,feature,logit for the distilled cells (default 0.1,0.1,2.0)")
    parser.add_argument("--teacher-max-minutes", type=float, default=None,
                        help="wall-clock cap on teacher training in this run (it resumes next run)")
    parser.add_argument("--teacher-set", action="append", default=[],
                        help="TeacherSettings or demo.teacher (shape) field=value")
    parser.add_argument("--cells", default=None, help="comma list like '1.88:SG+A+E,1.88:QAT-CE' (default: all)")
    parser.add_argument("--qat-bits", default="2.79,2.19,1.88", help="bit-widths with a QAT-CE baseline")
    parser.add_argument("--eval-every", type=int, default=0, help="held-out ppl every N steps inside a cell")
    parser.add_argument("--out", default=None, help="results folder (default runs/bench_quality, quick: .../quick)")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--cache-dir", default=None, help="teacher cache root (default ~/.cache/edgerazor/bench_quality)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fresh", action="store_true", help="recompute cells even when cells/*.json match")
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration (~2 minutes)")
    args = parser.parse_args(argv)

    import yaml

    torch.set_num_threads(args.threads)
    quick = args.quick
    tsettings = QUICK_TEACHER if quick else TeacherSettings()
    if args.teacher_set:
        shape_fields = set(DemoTeacher.model_fields)
        fields = {f.name for f in dataclasses.fields(TeacherSettings)} - {"shape"} | shape_fields
        values, shape = {}, tsettings.shape.model_dump()
        for pair in args.teacher_set:
            key, sep, raw = pair.partition("=")
            if not sep or key not in fields:
                raise SystemExit(f"--teacher-set {pair!r}: expected one of {', '.join(sorted(fields))}")
            value = yaml.safe_load(raw)
            if key not in shape_fields and isinstance(getattr(tsettings, key), float) and isinstance(value, (int, str)):
                try:  # YAML 1.1 reads "3e-3" as a string
                    value = float(value)
                except ValueError:
                    raise SystemExit(f"--teacher-set {pair!r}: {key} takes a number") from None
            (shape if key in shape_fields else values)[key] = value
        tsettings = dataclasses.replace(tsettings, shape=DemoTeacher.model_validate(shape), **values)
    train = TrainSettings(steps=6, batch_size=4, lr=2e-3) if quick else TrainSettings()
    if args.steps is not None:
        train = dataclasses.replace(train, steps=args.steps)
    if args.batch_size is not None:
        train = dataclasses.replace(train, batch_size=args.batch_size)
    if args.lr is not None:
        train = dataclasses.replace(train, lr=args.lr)
    if args.scheduler is not None:
        train = dataclasses.replace(train, scheduler=args.scheduler)
    if args.warmup_ratio is not None:
        train = dataclasses.replace(train, warmup_ratio=args.warmup_ratio)
    if args.alphas:
        a = [float(v) for v in args.alphas.split(",")]
        train = dataclasses.replace(train, alpha_task=a[0], alpha_feature=a[1], alpha_logit=a[2])
    max_minutes = args.teacher_max_minutes if args.teacher_max_minutes is not None else (0.5 if quick else 40.0)
    qat_bits = [float(b) for b in args.qat_bits.split(",") if b.strip()]
    cells = parse_cells(args.cells or (QUICK_CELLS if quick else None), qat_bits)
    out = Path(args.out) if args.out else REPO / "runs" / "bench_quality" / ("quick" if quick else "")
    (out / "cells").mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir).resolve()
    cache = default_cache_root("bench_quality")
    root = Path(args.cache_dir).expanduser() if args.cache_dir else (cache / "quick" if quick else cache)
    wall = time.perf_counter()
    load_start = os.getloadavg()

    assets = prepare_teacher(tsettings, data_dir, max_minutes, root)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.teacher_dir)
    teacher = load_student(assets.teacher_dir).eval()
    train_ds, eval_ds = blocks_dataset(assets.train_blocks.tolist()), blocks_dataset(assets.eval_blocks.tolist())
    teacher_ppl = float(assets.meta["teacher_ppl"])
    measured = _ppl(teacher, eval_ds)
    _log(f"teacher: held-out ppl {teacher_ppl:.2f} (re-measured {measured:.2f}); converged: {assets.meta['converged']}")
    head_dim = tsettings.shape.head_dim

    rows: list[dict[str, Any]] = []
    bits_needed = sorted({b for b, _ in cells}, reverse=True)
    rtn: dict[tuple[float, str], dict[str, Any]] = {}
    gguf_dir = out / "gguf-sizes"
    gguf_dir.mkdir(exist_ok=True)
    teacher_gguf = gguf_footprint(teacher, tokenizer, gguf_dir / "teacher-f16.gguf", float_type="f16")
    for b in bits_needed:
        allocs = ["super_group"] + sorted({cell_allocation(label) for bb, label in cells if bb == b} - {"super_group"})
        for alloc in allocs:
            rtn[(b, alloc)] = r = run_rtn(assets, b, alloc, eval_ds, head_dim, tokenizer, gguf_dir)
            _log(f"RTN {b:g}-8-8 {alloc}: ppl {r['ppl']:.2f}, decoder {r['effective_bits']:.3f} bits, GGUF "
                 f"{r['gguf_bytes'] / 2**20:.2f} MiB ({true_size_text(r)})")
    gguf_dir.rmdir()

    from tqdm.auto import tqdm

    results: dict[tuple[float, str], dict[str, Any]] = {}
    for b, label in tqdm(cells, desc="grid", unit="cell"):
        spec = {"teacher": assets.meta["key"], "bits": b, "method": label, "train": dataclasses.asdict(train),
                "converged": assets.meta["converged"], "teacher_steps": assets.meta["steps"], "eval_every": args.eval_every}
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
        path = out / "cells" / f"{b:g}_{label.replace('+', '')}.json"
        if path.is_file() and not args.fresh:
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                _log(f"cell {b:g} {label}: reusing {path} (ppl {cached['ppl']:.2f})")
                results[(b, label)] = cached
                continue
        res = run_cell(assets, teacher, b, label, train, train_ds, eval_ds, head_dim, tokenizer, out, args.eval_every)
        res["key"] = key
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(res, indent=1, default=str))
        os.replace(tmp, path)
        results[(b, label)] = res
        _log(f"cell {b:g} {label}: ppl {res['ppl']:.2f}, closure "
             f"{gap_closure(teacher_ppl, rtn[(b, 'super_group')]['ppl'], res['ppl']):.1%}, {res['train_seconds']:.0f} s")

    def allocation_fields(b: float, alloc: str) -> dict[str, Any]:
        r = rtn[(b, alloc)]
        return {"allocation": alloc, **{k: r[k] for k in ("effective_bits", "gguf_bytes", "true_size", "fallback_tensors",
                                                          "fallback_extra_bytes", "own_bytes", "gguf_types")}}

    rtn_names = {"super_group": "RTN", "stacked": "RTN (ST)", "per_tensor": "RTN (PT)"}
    for b in bits_needed:
        ref = rtn[(b, "super_group")]["ppl"]
        for alloc in [a for (bb, a) in rtn if bb == b]:
            r = rtn[(b, alloc)]
            rows.append({"method": rtn_names[alloc], "bits": b, "ppl": r["ppl"], "closure": gap_closure(teacher_ppl, ref, r["ppl"]),
                         "seconds": r["seconds"], **allocation_fields(b, alloc)})
        for (bb, label), res in results.items():
            if bb == b:
                rows.append({"method": label, "bits": b, "ppl": res["ppl"], "closure": gap_closure(teacher_ppl, ref, res["ppl"]),
                             "seconds": res["train_seconds"] + res["eval_seconds"], "train_seconds": res["train_seconds"],
                             "steps": res["steps"], "curve": res.get("curve", []), "last_log": res.get("last_log", {}),
                             "start_ppl": rtn[(b, cell_allocation(label))]["ppl"],
                             **allocation_fields(b, cell_allocation(label))})

    # the paper's "fewer tokens" claim in miniature: when each distilled cell first matches QAT-CE's final ppl
    tokens_per_step = train.batch_size * tsettings.shape.seq_len
    reach: list[dict[str, Any]] = []
    for (b, label), res in results.items():
        qat = results.get((b, "QAT-CE"))
        if label == "QAT-CE" or qat is None or not res.get("curve"):
            continue
        start = rtn[(b, cell_allocation(label))]["ppl"]
        reach.append({"bits": b, "method": label, **tokens_to_match(res, start, qat, tokens_per_step)})

    target: dict[str, Any] = {"closure_min": TARGET_CLOSURE}
    main_cell, qat_cell = results.get((1.88, "SG+A+E")), results.get((1.88, "QAT-CE"))
    if main_cell is not None:
        target["sg_a_e_1.88_closure"] = gap_closure(teacher_ppl, rtn[(1.88, "super_group")]["ppl"], main_cell["ppl"])
        target["closure_met"] = target["sg_a_e_1.88_closure"] >= TARGET_CLOSURE
    if main_cell is not None and qat_cell is not None:
        target["beats_qat_ce"] = main_cell["ppl"] < qat_cell["ppl"]
        target["met"] = bool(target["closure_met"] and target["beats_qat_ce"] and assets.meta["converged"])

    tokens = train.steps * train.batch_size * tsettings.shape.seq_len
    title = (f"EdgeRazor quality benchmark: Table 4 in miniature ({tsettings.shape.num_layers}-layer Qwen3, "
             f"{train.steps} steps x {train.batch_size} x {tsettings.shape.seq_len} = {tokens / 1e3:.0f}k tokens per cell)")
    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=150)  # a log file: no wrapped columns
    console.print(render_table(rows, teacher_ppl, title, teacher_gguf))
    if reach:
        console.print(render_reach(reach, args.eval_every))
    curve = assets.meta["curve"]
    console.print(f"teacher: {assets.meta['parameters'] / 1e6:.2f}M params, converged={assets.meta['converged']}, "
                  f"best ppl {teacher_ppl:.2f} at step {assets.meta['best_step']} of {assets.meta['steps']} "
                  f"({assets.meta['epochs']:.1f} epochs, {assets.meta['train_minutes']:.1f} min); curve: "
                  + ", ".join(f"{c['step']}:{c['ppl']:.1f}" for c in curve))
    if "met" in target:
        console.print(f"target (1.88 SG+A+E closure >= {TARGET_CLOSURE:.0%} and beats QAT-CE, converged teacher): "
                      f"closure {target['sg_a_e_1.88_closure']:.1%}, beats QAT-CE {target['beats_qat_ce']} -> "
                      f"[bold]{'MET' if target['met'] else 'NOT MET'}[/bold]")
    result = {
        "title": title, "quick": quick, "teacher": assets.meta, "teacher_dir": str(assets.teacher_dir),
        "teacher_ppl_remeasured": measured, "train": dataclasses.asdict(train), "rows": rows, "target": target,
        "teacher_gguf_f16": teacher_gguf, "tokens_per_cell": tokens, "eval_every": args.eval_every,
        "tokens_to_match_qat_ce": reach,
        "wall_seconds": time.perf_counter() - wall, "threads": torch.get_num_threads(),
        "loadavg": {"start": load_start, "end": os.getloadavg()}, "argv": sys.argv[1:] if argv is None else argv,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    plot(rows, teacher_ppl, out / "results.png", title, reach, tokens_per_step)
    console.print(f"wrote {out / 'results.json'} and {out / 'results.png'} ({result['wall_seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
